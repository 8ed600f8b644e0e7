//! `${VAR}` substitution in string values.

use super::ConfigError;

/// Substitutes in every string of `table`, recording errors with the value's path.
pub(super) fn substitute_table(
    table: &mut toml::Table,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    for (key, value) in table.iter_mut() {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        substitute_value(value, &here, env, errors);
    }
}

fn substitute_value(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    match value {
        toml::Value::String(s) => match substitute(s, env) {
            Ok(Some(new)) => *s = new,
            Ok(None) => {}
            Err(e) => errors.push(e.at(path)),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{path}[{i}]"), env, errors);
            }
        }
        toml::Value::Table(t) => substitute_table(t, path, env, errors),
        _ => {}
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum SubstError {
    Unset(String),
    Unclosed,
    Nested,
}

impl SubstError {
    fn at(self, path: &str) -> ConfigError {
        match self {
            SubstError::Unset(name) => {
                ConfigError::new(path, format!("environment variable `{name}` is not set"))
                    .hint(format!("export {name}=..., or write ${{{name}:-default}}"))
            }
            SubstError::Unclosed => ConfigError::new(path, "`${` without a closing `}`")
                .hint("write $${ for a literal ${"),
            SubstError::Nested => {
                ConfigError::new(path, "a default value may not contain another `${...}`")
                    .hint("set the variable itself, or use a literal default")
            }
        }
    }
}

/// The string with `${NAME}` / `${NAME:-default}` replaced and `$${` unescaped, or `None`
/// when it holds neither.
pub(super) fn substitute(
    input: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, SubstError> {
    if !input.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            // `$${` is an escaped literal `${`.
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(SubstError::Unclosed)?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if default.is_some_and(|d| d.contains("${")) {
            return Err(SubstError::Nested);
        }
        match (
            env(name).filter(|v| !v.is_empty() || default.is_none()),
            default,
        ) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(SubstError::Unset(name.to_owned())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME_DIR" => Some("/home/ops".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitution_rules() {
        let s = |i: &str| substitute(i, &env);
        assert_eq!(s("plain"), Ok(None));
        assert_eq!(s("${HOME_DIR}/x"), Ok(Some("/home/ops/x".into())));
        assert_eq!(s("${NOPE:-/tmp}/x"), Ok(Some("/tmp/x".into())));
        assert_eq!(s("${EMPTY:-fallback}"), Ok(Some("fallback".into())));
        assert_eq!(s("${EMPTY}"), Ok(Some(String::new())));
        assert_eq!(s("cost $${HOME_DIR}"), Ok(Some("cost ${HOME_DIR}".into())));
        assert_eq!(s("${NOPE}"), Err(SubstError::Unset("NOPE".into())));
        assert_eq!(s("${HOME_DIR"), Err(SubstError::Unclosed));
        assert_eq!(s("${A:-${HOME_DIR}}"), Err(SubstError::Nested));
    }
}

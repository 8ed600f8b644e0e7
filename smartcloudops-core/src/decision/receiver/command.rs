//! Guarded commands: remediation that runs a program, safely.
//!
//! - **Allowlist**: the program (`argv[0]`, an absolute path) must be listed in
//!   `[decision] allowed_commands`.
//! - **No shell**: the command runs as an argument vector. Event data only reaches it through
//!   typed **parameters**, each taken from a label shared by every alert of the group and
//!   validated (a string against an anchored pattern, an integer within bounds, or one of a
//!   list of values) before it replaces its `{name}` placeholder. A value that fails validation
//!   blocks the execution, with the reason in the audit log.
//! - **Controlled environment**: the environment is cleared except for `env`, the working
//!   directory is `cwd`, standard input is empty, the run is killed after `timeout`, and
//!   standard output and error are kept up to `max_output` bytes each.
//! - **Modes**: `dry_run` records the argv it would run; `suggest` records it as a suggestion
//!   for a person to confirm; `auto` runs it. A remediation runs at most once per firing
//!   episode of a group (an idempotency key), is never retried, and never runs for resolved
//!   alerts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::{BuildContext, Built, DeliveryError, ExecutionMode, Receiver};
use crate::decision::Notification;

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// Text matching `pattern` (anchored).
    #[default]
    String,
    /// A whole number within `min` … `max`.
    Integer,
    /// One of `values`.
    Enum,
}

/// One command parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The label the value comes from; the parameter's name by default.
    #[serde(default)]
    pub label: Option<String>,
    /// The value's type.
    #[serde(default, rename = "type")]
    pub kind: ParamType,
    /// For strings: the pattern the whole value must match.
    #[serde(default)]
    pub pattern: Option<String>,
    /// For integers: the smallest value allowed.
    #[serde(default)]
    pub min: Option<i64>,
    /// For integers: the largest value allowed.
    #[serde(default)]
    pub max: Option<i64>,
    /// For enums: the values allowed.
    #[serde(default)]
    pub values: Vec<String>,
}

/// `type = "command"` settings: the `command` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandReceiverConfig {
    /// What to run and how (required).
    pub command: Option<CommandConfig>,
}

impl CommandReceiverConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let c = self
            .command
            .clone()
            .ok_or("a `command` table is required")?;
        CommandReceiver::new(c, ctx.allowed_commands, ctx.timeout)
            .map(|c| Box::new(c) as Box<dyn Receiver>)
    }
}

/// The `command` table of a `type = "command"` receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The program (absolute path, allowlisted) and its arguments, with `{param}` placeholders.
    pub argv: Vec<String>,
    /// The parameters the placeholders name.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// `dry_run` (the default), `suggest` or `auto`.
    #[serde(default = "default_mode")]
    pub mode: ExecutionMode,
    /// Working directory.
    #[serde(default = "default_cwd")]
    pub cwd: PathBuf,
    /// The whole environment of the command.
    #[serde(default = "default_env")]
    pub env: BTreeMap<String, String>,
    /// Bytes of standard output (and of standard error) kept.
    #[serde(default = "default_max_output")]
    pub max_output: usize,
}

fn default_mode() -> ExecutionMode {
    ExecutionMode::DryRun
}
fn default_cwd() -> PathBuf {
    PathBuf::from("/")
}
fn default_env() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "PATH".to_owned(),
        "/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
    )])
}
fn default_max_output() -> usize {
    64 * 1024
}

/// A validated parameter.
#[derive(Debug)]
enum Check {
    Pattern(Regex),
    Range(i64, i64),
    OneOf(Vec<String>),
}

/// One piece of an argument: literal text or a parameter's value.
#[derive(Debug)]
enum Piece {
    Text(String),
    Param(String),
}

/// Runs allowlisted commands. See the [module docs](self).
#[derive(Debug)]
pub struct CommandReceiver {
    config: CommandConfig,
    params: BTreeMap<String, (String, Check)>,
    /// `argv` split into literal text and parameters once, so a value is never scanned
    /// for placeholders again.
    template: Vec<Vec<Piece>>,
    timeout: Duration,
}

/// `arg` as literal text and `{param}` pieces.
fn pieces(arg: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        if open > 0 {
            out.push(Piece::Text(rest[..open].to_owned()));
        }
        out.push(Piece::Param(rest[open + 1..open + close].to_owned()));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(Piece::Text(rest.to_owned()));
    }
    out
}

/// Placeholders `{name}` in `arg`.
fn placeholders(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    out
}

impl CommandReceiver {
    /// A receiver for `config`; `allowed` is the allowlist of programs.
    pub fn new(
        config: CommandConfig,
        allowed: &[PathBuf],
        timeout: Duration,
    ) -> Result<Self, String> {
        let program = config.argv.first().ok_or("argv must name a program")?;
        if !program.starts_with('/') {
            return Err(format!("`{program}`: the program must be an absolute path"));
        }
        if !placeholders(program).is_empty() {
            return Err("the program itself cannot be a parameter".into());
        }
        if !allowed.iter().any(|a| a.as_os_str() == program.as_str()) {
            return Err(format!("`{program}` is not in [decision] allowed_commands"));
        }
        let mut params = BTreeMap::new();
        for (name, spec) in &config.params {
            let check = match spec.kind {
                ParamType::String => {
                    let pattern = spec
                        .pattern
                        .as_deref()
                        .ok_or_else(|| format!("parameter `{name}`: a string needs a `pattern`"))?;
                    Check::Pattern(
                        Regex::new(&format!("^(?:{pattern})$"))
                            .map_err(|e| format!("parameter `{name}`: {e}"))?,
                    )
                }
                ParamType::Integer => {
                    // Non-negative unless asked: a negative number reads as an option, and
                    // to `kill` a negative pid is a process group.
                    let (min, max) = (spec.min.unwrap_or(0), spec.max.unwrap_or(i64::MAX));
                    if min > max {
                        return Err(format!("parameter `{name}`: min is above max"));
                    }
                    Check::Range(min, max)
                }
                ParamType::Enum => {
                    if spec.values.is_empty() {
                        return Err(format!("parameter `{name}`: an enum needs `values`"));
                    }
                    Check::OneOf(spec.values.clone())
                }
            };
            params.insert(
                name.clone(),
                (spec.label.clone().unwrap_or_else(|| name.clone()), check),
            );
        }
        for arg in &config.argv {
            for p in placeholders(arg) {
                if !params.contains_key(p) {
                    return Err(format!("`{{{p}}}` in argv is not a declared parameter"));
                }
            }
        }
        let template = config.argv.iter().map(|a| pieces(a)).collect();
        Ok(Self {
            config,
            params,
            template,
            timeout,
        })
    }

    /// The argv for `n`, with every parameter validated.
    fn argv(&self, n: &Notification) -> Result<Vec<String>, String> {
        let labels = n.common_labels();
        let mut values = BTreeMap::new();
        for (name, (label, check)) in &self.params {
            let value = labels.get(label).ok_or_else(|| {
                format!(
                    "parameter `{name}`: label `{label}` is not shared by every alert of the group"
                )
            })?;
            let valid = match check {
                // A leading `-` would read as an option, whatever the pattern allows.
                Check::Pattern(re) => {
                    (!value.starts_with('-') && re.is_match(value)).then(|| value.clone())
                }
                Check::Range(min, max) => value
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|v| (*min..=*max).contains(v))
                    .map(|v| v.to_string()),
                Check::OneOf(allowed) => allowed.contains(value).then(|| value.clone()),
            };
            let valid = valid
                .ok_or_else(|| format!("parameter `{name}`: {value:?} is not a valid value"))?;
            values.insert(name.as_str(), valid);
        }
        Ok(self
            .template
            .iter()
            .map(|arg| {
                arg.iter()
                    .map(|piece| match piece {
                        Piece::Text(t) => t.as_str(),
                        Piece::Param(p) => values.get(p.as_str()).map_or("", String::as_str),
                    })
                    .collect()
            })
            .collect())
    }
}

/// Reads `pipe` to the end, keeping the first `cap` bytes (reading on, so the child never
/// blocks on a full pipe).
async fn capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>, cap: usize) -> (String, usize) {
    let Some(mut pipe) = pipe else {
        return (String::new(), 0);
    };
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    let mut buf = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        dropped += n.saturating_sub(room);
    }
    (String::from_utf8_lossy(&kept).into_owned(), dropped)
}

impl Receiver for CommandReceiver {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn target(&self) -> String {
        self.config.argv.first().cloned().unwrap_or_default()
    }

    fn is_remediation(&self) -> bool {
        true
    }

    fn mode(&self) -> ExecutionMode {
        self.config.mode
    }

    fn prepare(&self, n: &Notification) -> Result<Value, String> {
        let argv = self.argv(n)?;
        Ok(json!({ "argv": argv, "cwd": self.config.cwd }))
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let argv = self.argv(n).map_err(DeliveryError::permanent)?;
            let mut child = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env_clear()
                .envs(&self.config.env)
                .current_dir(&self.config.cwd)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| DeliveryError::permanent(format!("cannot start {}: {e}", argv[0])))?;
            let cap = self.config.max_output;
            let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
            let run = async {
                let ((out, out_dropped), (err, err_dropped), status) =
                    tokio::join!(capped(stdout, cap), capped(stderr, cap), child.wait());
                (out, out_dropped, err, err_dropped, status)
            };
            let (out, out_dropped, err, err_dropped, status) =
                match tokio::time::timeout(self.timeout, run).await {
                    Ok(done) => done,
                    Err(_) => {
                        // Dropping the future dropped the child: kill_on_drop ends it.
                        return Err(DeliveryError::permanent(format!(
                            "killed after the {:?} timeout",
                            self.timeout
                        )));
                    }
                };
            let status = status
                .map_err(|e| DeliveryError::permanent(format!("waiting for the command: {e}")))?;
            let report = json!({
                "exit": status.code(),
                "stdout": out,
                "stderr": err,
                "truncated_bytes": out_dropped + err_dropped,
            })
            .to_string();
            if status.success() {
                Ok(report)
            } else {
                Err(DeliveryError::permanent(format!(
                    "command failed: {report}"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(argv: &[&str]) -> CommandConfig {
        CommandConfig {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            params: BTreeMap::from([(
                "service".to_owned(),
                ParamSpec {
                    label: None,
                    kind: ParamType::String,
                    pattern: Some("[a-z][a-z0-9-]*".into()),
                    min: None,
                    max: None,
                    values: vec![],
                },
            )]),
            mode: ExecutionMode::Auto,
            cwd: default_cwd(),
            env: default_env(),
            max_output: 16,
        }
    }

    #[test]
    fn programs_must_be_absolute_allowlisted_and_placeholders_declared() {
        let allowed = [PathBuf::from("/bin/echo")];
        let t = Duration::from_secs(1);
        assert!(CommandReceiver::new(config(&["/bin/echo", "{service}"]), &allowed, t).is_ok());
        let err = CommandReceiver::new(config(&["echo", "x"]), &allowed, t).unwrap_err();
        assert!(err.contains("absolute"), "{err}");
        let err = CommandReceiver::new(config(&["/bin/sh", "-c", "x"]), &allowed, t).unwrap_err();
        assert!(err.contains("allowed_commands"), "{err}");
        let err = CommandReceiver::new(config(&["/bin/echo", "{host}"]), &allowed, t).unwrap_err();
        assert!(err.contains("not a declared parameter"), "{err}");
    }

    #[test]
    fn values_are_validated_normalised_and_never_options() {
        use crate::decision::rule::Severity;
        use crate::decision::{AlertRecord, AlertStatus, Notification, NotificationKind};
        let mut c = config(&["/bin/echo", "--unit={service}.service", "{pid}"]);
        c.params.insert(
            "pid".into(),
            ParamSpec {
                label: None,
                kind: ParamType::Integer,
                pattern: None,
                min: None,
                max: Some(99_999),
                values: vec![],
            },
        );
        let r =
            CommandReceiver::new(c, &[PathBuf::from("/bin/echo")], Duration::from_secs(1)).unwrap();
        let notification = |service: &str, pid: &str| {
            let alert = AlertRecord {
                fingerprint: "f".into(),
                rule: "r".into(),
                status: AlertStatus::Firing,
                severity: Severity::Warning,
                labels: BTreeMap::from([
                    ("service".to_owned(), service.to_owned()),
                    ("pid".to_owned(), pid.to_owned()),
                ]),
                annotations: BTreeMap::new(),
                starts_at_ms: 0,
                ends_at_ms: None,
                series_id: 1,
            };
            Notification::new(
                "x",
                "r",
                "g",
                BTreeMap::new(),
                vec![alert],
                0,
                0,
                NotificationKind::Alerts,
            )
        };
        assert_eq!(
            r.argv(&notification("api", "+0042")).unwrap(),
            vec!["/bin/echo", "--unit=api.service", "42"]
        );
        assert!(
            r.argv(&notification("api", "-1")).is_err(),
            "negative: a process group to kill"
        );
        assert!(r.argv(&notification("-rf", "1")).is_err(), "leading dash");
        // A value holding another placeholder is not expanded again.
        let mut c = config(&["/bin/echo", "{service}"]);
        c.params.get_mut("service").unwrap().pattern = Some("[a-z{}]+".into());
        let r =
            CommandReceiver::new(c, &[PathBuf::from("/bin/echo")], Duration::from_secs(1)).unwrap();
        assert_eq!(
            r.argv(&notification("a{service}", "1")).unwrap(),
            vec!["/bin/echo", "a{service}"]
        );
    }

    #[test]
    fn placeholders_are_found_inside_arguments() {
        assert_eq!(placeholders("--unit={service}.service"), vec!["service"]);
        assert_eq!(placeholders("{a}-{b}"), vec!["a", "b"]);
        assert!(placeholders("plain").is_empty());
    }
}

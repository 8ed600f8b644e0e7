//! Text from the data (label values, reasons) made safe for a line-oriented output.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with its control characters written out (`\n`, `\r`, `\t`, `\x1b`, `\u{85}` …), so
/// a label value printed in a log line can neither start a new line (forging one) nor send a
/// terminal escape sequence. Everything else, backslashes included, is kept as is.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_written_out_and_the_rest_kept() {
        assert_eq!(
            escape_control("a\nALERT forged\r\t\u{1b}[31m\u{7f}\u{85}\u{2028}"),
            "a\\nALERT forged\\r\\t\\x1b[31m\\x7f\\u{85}\\u{2028}"
        );
        assert!(matches!(
            escape_control("host=web-1 é \\n"),
            Cow::Borrowed("host=web-1 é \\n")
        ));
    }
}

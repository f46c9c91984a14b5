//! The one way a value a client sent reaches a log line: bounded, escaped and with anything
//! shaped like a credential redacted. A client controls headers of hundreds of KiB, paths and
//! query strings; logged verbatim they flood the log, forge log lines (newlines, escape codes)
//! or leak a file token from a mistyped URL into log storage.

use std::fmt::Write;

/// Characters of the input looked at; the rest is only counted.
const MAX_INPUT_BYTES: usize = 256;

/// Characters kept in the log (after escaping, before the truncation note).
const MAX_LOGGED_CHARS: usize = 96;

/// Runs of URL-token characters at least this long are redacted: file tokens (about 80
/// characters, `.`-separated parts included) and client secrets (43) are longer; client ids (19)
/// and UUIDs (36) are shorter.
const REDACT_RUN: usize = 40;

/// `value` made safe for a log line: control and non-ASCII characters escaped, runs of 40 or
/// more token characters (`[A-Za-z0-9_.~%-]`) replaced by `<redacted N chars>`, and at most
/// 96 characters kept, followed by how many bytes were cut.
pub fn log_value(value: &str) -> String {
    let mut end = value.len().min(MAX_INPUT_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let head = &value[..end];
    let mut out = String::new();
    let mut run_start: Option<usize> = None;
    for (at, c) in head.char_indices() {
        if is_token_char(c) {
            run_start.get_or_insert(at);
            continue;
        }
        if let Some(start) = run_start.take() {
            push_run(&mut out, &head[start..at], false);
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            _ => {
                let _ = write!(out, "{}", c.escape_unicode());
            }
        }
    }
    if let Some(start) = run_start {
        push_run(&mut out, &head[start..], end < value.len());
    }
    let mut logged: String = out.chars().take(MAX_LOGGED_CHARS).collect();
    let cut = value.len() - end + out[logged.len()..].len();
    if cut > 0 {
        let _ = write!(logged, "…(+{cut} bytes)");
    }
    logged
}

fn push_run(out: &mut String, run: &str, ended_at_cut: bool) {
    // A run cut by the input bound may be longer than it looks: redact at the bound too.
    if run.len() >= REDACT_RUN || (ended_at_cut && run.len() >= REDACT_RUN / 2) {
        let _ = write!(out, "<redacted {} chars>", run.len());
    } else {
        out.push_str(run);
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '~' | '%')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn short_values_pass_unchanged() {
        assert_eq!(log_value("bh_0123456789abcdef"), "bh_0123456789abcdef");
        assert_eq!(log_value("6f1e2c0a-1111-4a8e-9d6b-000000000001"), "6f1e2c0a-1111-4a8e-9d6b-000000000001");
        assert_eq!(log_value("no operation 'x' on Patient"), "no operation 'x' on Patient");
    }

    #[test]
    fn tokens_and_secrets_are_redacted() {
        let token = format!("eyJhbGciOiJIUzI1NiJ9.{}.sig", "a".repeat(300));
        let logged = log_value(&format!("no operation '{token}.ndjson' on $export"));
        assert!(!logged.contains("eyJhbGci"), "{logged}");
        assert!(logged.contains("<redacted"), "{logged}");
        let secret = "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE";
        assert_eq!(log_value(secret), "<redacted 43 chars>");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(log_value("a\nb\u{1b}[31m\"c\\"), "a\\u{a}b\\u{1b}[31m\\\"c\\\\");
        assert_eq!(log_value("é"), "\\u{e9}");
    }

    #[test]
    fn long_values_are_cut() {
        let value = "a b ".repeat(100_000);
        let logged = log_value(&value);
        assert!(logged.len() < 200, "{}", logged.len());
        assert!(logged.ends_with("bytes)"), "{logged}");
    }

    proptest! {
        #[test]
        fn output_is_bounded_printable_ascii(value in any::<String>()) {
            let logged = log_value(&value);
            prop_assert!(logged.chars().count() <= MAX_LOGGED_CHARS + 24);
            prop_assert!(logged.chars().all(|c| (' '..='~').contains(&c) || c == '…'));
        }

        #[test]
        fn no_long_token_run_survives(prefix in "[ /']{0,3}", run in "[A-Za-z0-9_.-]{40,400}") {
            let logged = log_value(&format!("{prefix}{run}"));
            prop_assert!(!logged.contains(&run[..40]));
        }
    }
}

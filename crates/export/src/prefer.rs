//! The `Prefer` request header (RFC 7240) as the Bulk Data kick-off uses it.
//!
//! Only `respond-async` and `handling=lenient|strict` matter here. Unknown preferences are
//! ignored, as RFC 7240 requires, so a client sending e.g. `return=minimal` or STU3's
//! `separate-export-status` still gets a normal answer.

/// The preferences the export kick-off honours.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Preferences {
    /// `respond-async` was asked for. (The server answers asynchronously either way.)
    pub respond_async: bool,
    /// `handling=lenient`: ignore unsupported parameters instead of failing.
    /// `false` means `handling=strict`, the default.
    pub lenient: bool,
}

/// Parses every `Prefer` header value of a request.
///
/// There may be several header lines, each a comma-separated list of preferences. Names and
/// values are case-insensitive, whitespace around tokens and `=` is optional, values may be
/// quoted (`handling="lenient"`) and preference parameters after `;` are ignored. When
/// `handling` appears more than once only the first counts (RFC 7240 §2); an unrecognised
/// `handling` value means strict.
pub fn parse_prefer<'a>(values: impl IntoIterator<Item = &'a str>) -> Preferences {
    let mut preferences = Preferences::default();
    let mut handling_seen = false;
    for (name, value) in values.into_iter().flat_map(|line| line.split(',')).filter_map(preference) {
        if name.eq_ignore_ascii_case("respond-async") {
            preferences.respond_async = true;
        } else if name.eq_ignore_ascii_case("handling") && !handling_seen {
            handling_seen = true;
            preferences.lenient = value.eq_ignore_ascii_case("lenient");
        }
    }
    preferences
}

/// Splits one list element into its name and (unquoted, possibly empty) value; `None` for an
/// empty element such as the one `a,,b` contains.
fn preference(element: &str) -> Option<(&str, &str)> {
    // `;` starts preference parameters (`respond-async; wait=10`), which we do not use.
    let head = element.split(';').next().unwrap_or_default();
    let (name, value) = head.split_once('=').unwrap_or((head, ""));
    let name = name.trim();
    (!name.is_empty()).then(|| (name, unquote(value.trim())))
}

/// Strips one pair of surrounding double quotes (a quoted-string without escapes).
fn unquote(value: &str) -> &str {
    value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefs(lines: &[&str]) -> Preferences {
        parse_prefer(lines.iter().copied())
    }

    const ASYNC_LENIENT: Preferences = Preferences { respond_async: true, lenient: true };

    #[test]
    fn nothing_means_strict_and_sync() {
        assert_eq!(prefs(&[]), Preferences::default());
        assert_eq!(prefs(&[""]), Preferences::default());
        assert_eq!(prefs(&[" , ,"]), Preferences::default());
    }

    #[test]
    fn single_respond_async() {
        let expected = Preferences { respond_async: true, lenient: false };
        assert_eq!(prefs(&["respond-async"]), expected);
    }

    #[test]
    fn comma_list_on_one_line() {
        assert_eq!(prefs(&["respond-async,handling=lenient"]), ASYNC_LENIENT);
        assert_eq!(prefs(&["handling=lenient, respond-async"]), ASYNC_LENIENT);
    }

    #[test]
    fn several_header_lines() {
        assert_eq!(prefs(&["respond-async", "handling=lenient"]), ASYNC_LENIENT);
        assert_eq!(prefs(&["return=minimal", "handling=lenient,respond-async"]), ASYNC_LENIENT);
    }

    #[test]
    fn case_insensitive() {
        assert_eq!(prefs(&["Respond-Async, HANDLING=Lenient"]), ASYNC_LENIENT);
    }

    #[test]
    fn optional_whitespace() {
        assert_eq!(prefs(&["  respond-async  ,   handling = lenient  "]), ASYNC_LENIENT);
        assert_eq!(prefs(&["respond-async,\thandling=lenient"]), ASYNC_LENIENT);
    }

    #[test]
    fn quoted_value() {
        assert_eq!(prefs(&["respond-async, handling=\"lenient\""]), ASYNC_LENIENT);
        assert_eq!(prefs(&["respond-async, handling = \"LENIENT\" "]), ASYNC_LENIENT);
    }

    #[test]
    fn preference_parameters_are_ignored() {
        assert_eq!(prefs(&["respond-async; wait=10, handling=lenient;foo"]), ASYNC_LENIENT);
    }

    #[test]
    fn strict_and_unknown_handling_values_are_strict() {
        assert!(!prefs(&["handling=strict"]).lenient);
        assert!(!prefs(&["handling=bogus"]).lenient);
        assert!(!prefs(&["handling"]).lenient);
        assert!(!prefs(&["handling=lenientx"]).lenient);
        assert!(!prefs(&["xhandling=lenient"]).lenient);
    }

    #[test]
    fn first_handling_wins() {
        assert!(!prefs(&["handling=strict", "handling=lenient"]).lenient);
        assert!(prefs(&["handling=lenient, handling=strict"]).lenient);
    }

    #[test]
    fn unknown_preferences_are_ignored() {
        assert_eq!(
            prefs(&["return=representation, separate-export-status, wait=5, respond-async, handling=lenient"]),
            ASYNC_LENIENT
        );
        assert_eq!(prefs(&["respond-asyncx, async"]), Preferences::default());
    }
}

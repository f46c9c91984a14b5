//! R4 primitive types: their JSON representation and lexical formats (the regexes of the R4
//! 4.0.1 StructureDefinitions, `http://hl7.org/fhir/StructureDefinition/regex`), matched by hand
//! on bytes so that checking a valid value never allocates.

use crate::json_view::{JsonType, JsonView};

/// The R4 primitive types, in the type-number order of the generated table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Base64Binary,
    Boolean,
    Canonical,
    Code,
    Date,
    DateTime,
    Decimal,
    Id,
    Instant,
    Integer,
    Markdown,
    Oid,
    PositiveInt,
    String,
    Time,
    UnsignedInt,
    Uri,
    Url,
    Uuid,
    Xhtml,
}

impl Primitive {
    /// Every primitive, in type-number order.
    pub const ALL: [Primitive; 20] = [
        Primitive::Base64Binary,
        Primitive::Boolean,
        Primitive::Canonical,
        Primitive::Code,
        Primitive::Date,
        Primitive::DateTime,
        Primitive::Decimal,
        Primitive::Id,
        Primitive::Instant,
        Primitive::Integer,
        Primitive::Markdown,
        Primitive::Oid,
        Primitive::PositiveInt,
        Primitive::String,
        Primitive::Time,
        Primitive::UnsignedInt,
        Primitive::Uri,
        Primitive::Url,
        Primitive::Uuid,
        Primitive::Xhtml,
    ];

    /// The FHIR name of the type (`dateTime`).
    pub fn name(self) -> &'static str {
        match self {
            Primitive::Base64Binary => "base64Binary",
            Primitive::Boolean => "boolean",
            Primitive::Canonical => "canonical",
            Primitive::Code => "code",
            Primitive::Date => "date",
            Primitive::DateTime => "dateTime",
            Primitive::Decimal => "decimal",
            Primitive::Id => "id",
            Primitive::Instant => "instant",
            Primitive::Integer => "integer",
            Primitive::Markdown => "markdown",
            Primitive::Oid => "oid",
            Primitive::PositiveInt => "positiveInt",
            Primitive::String => "string",
            Primitive::Time => "time",
            Primitive::UnsignedInt => "unsignedInt",
            Primitive::Uri => "uri",
            Primitive::Url => "url",
            Primitive::Uuid => "uuid",
            Primitive::Xhtml => "xhtml",
        }
    }

    /// The JSON type the value must have (FHIR JSON §2.6.2).
    fn json_kind(self) -> JsonKind {
        match self {
            Primitive::Boolean => JsonKind::Boolean,
            Primitive::Integer | Primitive::PositiveInt | Primitive::UnsignedInt | Primitive::Decimal => {
                JsonKind::Number
            }
            _ => JsonKind::String,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum JsonKind {
    Boolean,
    Number,
    String,
}

/// What is wrong with a primitive value.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PrimitiveError {
    /// The JSON type is wrong (a string where a number belongs); the text says what was expected.
    JsonType(&'static str),
    /// The JSON type is right but the lexical form or range is not; the text describes the format.
    Format(&'static str),
}

/// Checks one primitive value (never `null`, arrays or objects: the caller reports those).
pub(super) fn check<'a, J: JsonView<'a>>(primitive: Primitive, value: J) -> Result<(), PrimitiveError> {
    let kind = primitive.json_kind();
    match (kind, value.json_type()) {
        (JsonKind::Boolean, JsonType::Bool) => Ok(()),
        (JsonKind::Number, JsonType::Number) => check_number(primitive, value.number_text().unwrap_or_default()),
        (JsonKind::String, JsonType::String) => check_string(primitive, value.as_str().unwrap_or_default()),
        (JsonKind::Boolean, _) => Err(PrimitiveError::JsonType("a JSON boolean (true or false)")),
        (JsonKind::Number, _) => Err(PrimitiveError::JsonType("a JSON number")),
        (JsonKind::String, _) => Err(PrimitiveError::JsonType("a JSON string")),
    }
}

/// The JSON type name of a value, for messages.
pub(super) fn json_type_name<'a, J: JsonView<'a>>(value: J) -> &'static str {
    match value.json_type() {
        JsonType::Null => "null",
        JsonType::Bool => "a boolean",
        JsonType::Number => "a number",
        JsonType::String => "a string",
        JsonType::Array => "an array",
        JsonType::Object => "an object",
    }
}

fn check_number(primitive: Primitive, text: &str) -> Result<(), PrimitiveError> {
    // serde_json keeps the number's text (arbitrary_precision), so the check is on what was sent.
    let (min, max, what) = match primitive {
        Primitive::Decimal => {
            return if is_decimal(text) { Ok(()) } else { Err(PrimitiveError::Format("a decimal")) };
        }
        Primitive::Integer => (i64::from(i32::MIN), i64::from(i32::MAX), "an integer from -2147483648 to 2147483647"),
        Primitive::PositiveInt => (1, i64::from(i32::MAX), "a positiveInt from 1 to 2147483647"),
        _ => (0, i64::from(i32::MAX), "an unsignedInt from 0 to 2147483647"),
    };
    if !is_integer(text) {
        return Err(PrimitiveError::Format(what));
    }
    match text.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(()),
        _ => Err(PrimitiveError::Format(what)),
    }
}

fn check_string(primitive: Primitive, text: &str) -> Result<(), PrimitiveError> {
    let (valid, what) = match primitive {
        Primitive::Base64Binary => (is_base64(text), "base64Binary (base64 in groups of 4 characters)"),
        Primitive::Canonical | Primitive::Uri | Primitive::Url => (is_uri(text), "a uri (no whitespace)"),
        Primitive::Code => (is_code(text), "a code (no leading, trailing or double whitespace)"),
        Primitive::Date => (is_date(text.as_bytes()), "a date (YYYY, YYYY-MM or YYYY-MM-DD)"),
        Primitive::DateTime => {
            (is_date_time(text.as_bytes()), "a dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.f]+zz:zz)")
        }
        Primitive::Id => (crate::is_valid_id(text), "an id (1 to 64 of A-Z a-z 0-9 - .)"),
        Primitive::Instant => (is_instant(text.as_bytes()), "an instant (YYYY-MM-DDThh:mm:ss[.f] with a time zone)"),
        Primitive::Markdown | Primitive::String | Primitive::Xhtml => (!text.is_empty(), "a non-empty string"),
        Primitive::Oid => (is_oid(text), "an oid (urn:oid:1.2.3…)"),
        Primitive::Time => (is_time(text.as_bytes()), "a time (hh:mm:ss[.f])"),
        Primitive::Uuid => (is_uuid(text.as_bytes()), "a uuid (urn:uuid: and 36 lower-case hex characters)"),
        Primitive::Boolean | Primitive::Decimal | Primitive::Integer | Primitive::PositiveInt => (true, ""),
        Primitive::UnsignedInt => (true, ""),
    };
    if valid {
        Ok(())
    } else {
        Err(PrimitiveError::Format(what))
    }
}

/// `-?(0|[1-9][0-9]*)`
fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text).as_bytes();
    match digits {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn is_decimal(text: &str) -> bool {
    let bytes = text.strip_prefix('-').unwrap_or(text).as_bytes();
    let int_end = bytes.iter().position(|b| !b.is_ascii_digit()).unwrap_or(bytes.len());
    let (int, rest) = bytes.split_at(int_end);
    if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
        return false;
    }
    let rest = match rest {
        [b'.', fraction @ ..] => {
            let end = fraction.iter().position(|b| !b.is_ascii_digit()).unwrap_or(fraction.len());
            if end == 0 {
                return false;
            }
            &fraction[end..]
        }
        _ => rest,
    };
    match rest {
        [] => true,
        [b'e' | b'E', exponent @ ..] => {
            let digits = match exponent {
                [b'+' | b'-', digits @ ..] => digits,
                digits => digits,
            };
            !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
        }
        _ => false,
    }
}

/// `\S*` (and, as for every primitive, not empty); `\s` is the ASCII whitespace of the regex.
fn is_uri(text: &str) -> bool {
    !text.is_empty() && !text.bytes().any(|b| b.is_ascii_whitespace() || b == 0x0b)
}

/// `[^\s]+(\s[^\s]+)*`
fn is_code(text: &str) -> bool {
    let mut previous_space = true;
    for c in text.chars() {
        let space = c.is_whitespace();
        if space && previous_space {
            return false;
        }
        previous_space = space;
    }
    !previous_space
}

/// `(\s*([0-9a-zA-Z\+/=]){4}\s*)+`
fn is_base64(text: &str) -> bool {
    let mut count = 0usize;
    for b in text.bytes() {
        match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'+' | b'/' | b'=' => count += 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => return false,
        }
    }
    count > 0 && count.is_multiple_of(4)
}

/// `urn:oid:[0-2](\.(0|[1-9][0-9]*))+`
fn is_oid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut arcs = rest.split('.');
    let first_ok = matches!(arcs.next(), Some("0" | "1" | "2"));
    let mut count = 0;
    first_ok
        && arcs.all(|arc| {
            count += 1;
            is_integer(arc) && !arc.starts_with('-')
        })
        && count > 0
}

/// `urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`
fn is_uuid(text: &[u8]) -> bool {
    let Some(rest) = text.strip_prefix(b"urn:uuid:") else {
        return false;
    };
    rest.len() == 36
        && rest.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

fn digits(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_digit)
}

fn two_digits(bytes: &[u8], max: u8) -> bool {
    bytes.len() == 2 && digits(bytes) && (bytes[0] - b'0') * 10 + (bytes[1] - b'0') <= max
}

/// A year, `([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)`: four digits, not 0000.
fn is_year(bytes: &[u8]) -> bool {
    bytes.len() == 4 && digits(bytes) && bytes != b"0000"
}

fn is_month(bytes: &[u8]) -> bool {
    two_digits(bytes, 12) && bytes != b"00"
}

fn is_day(bytes: &[u8]) -> bool {
    two_digits(bytes, 31) && bytes != b"00"
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
fn is_date(bytes: &[u8]) -> bool {
    match bytes.len() {
        4 => is_year(bytes),
        7 => is_year(&bytes[..4]) && bytes[4] == b'-' && is_month(&bytes[5..7]),
        10 => is_full_date(bytes),
        _ => false,
    }
}

fn is_full_date(bytes: &[u8]) -> bool {
    bytes.len() == 10
        && is_year(&bytes[..4])
        && bytes[4] == b'-'
        && is_month(&bytes[5..7])
        && bytes[7] == b'-'
        && is_day(&bytes[8..10])
}

/// `([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?`
fn is_time(bytes: &[u8]) -> bool {
    if bytes.len() < 8 {
        return false;
    }
    let (hms, fraction) = bytes.split_at(8);
    two_digits(&hms[0..2], 23)
        && hms[2] == b':'
        && two_digits(&hms[3..5], 59)
        && hms[5] == b':'
        && two_digits(&hms[6..8], 60)
        && match fraction {
            [] => true,
            [b'.', rest @ ..] => !rest.is_empty() && digits(rest),
            _ => false,
        }
}

/// `Z` or `(+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)`
fn is_zone(bytes: &[u8]) -> bool {
    match bytes {
        b"Z" => true,
        [b'+' | b'-', b'1', b'4', b':', b'0', b'0'] => true,
        [b'+' | b'-', hours @ .., b':', m1, m2] if hours.len() == 2 => {
            two_digits(hours, 13) && two_digits(&[*m1, *m2], 59)
        }
        _ => false,
    }
}

/// A full date, `T`, a time and a time zone.
fn is_instant(bytes: &[u8]) -> bool {
    if bytes.len() < 20 || bytes[10] != b'T' || !is_full_date(&bytes[..10]) {
        return false;
    }
    let rest = &bytes[11..];
    let zone_start = rest.iter().position(|b| matches!(b, b'Z' | b'+' | b'-')).unwrap_or(rest.len());
    is_time(&rest[..zone_start]) && is_zone(&rest[zone_start..])
}

/// A date, or a full date with a time and a time zone.
fn is_date_time(bytes: &[u8]) -> bool {
    if bytes.len() <= 10 {
        is_date(bytes)
    } else {
        is_instant(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn ok(primitive: Primitive, value: Value) -> bool {
        check(primitive, &value).is_ok()
    }

    fn number(text: &str) -> Value {
        serde_json::from_str(text).expect("JSON number")
    }

    #[test]
    fn decimals_keep_their_text() {
        for good in ["-0.0", "1e2", "1.50", "0.010", "112.41600000000001", "3.14159265358979323846264338", "1E-7"] {
            assert!(ok(Primitive::Decimal, number(good)), "{good}");
        }
        assert!(!ok(Primitive::Decimal, json!("1.5")));
        assert!(!is_decimal("01") && !is_decimal("1.") && !is_decimal(".5") && !is_decimal("1e"));
    }

    #[test]
    fn integer_ranges() {
        assert!(ok(Primitive::Integer, number("2147483647")));
        assert!(ok(Primitive::Integer, number("-2147483648")));
        assert!(!ok(Primitive::Integer, number("2147483648")));
        assert!(!ok(Primitive::Integer, number("12345678901234567890")));
        assert!(!ok(Primitive::Integer, number("1.0")));
        assert!(!ok(Primitive::Integer, number("1e2")));
        assert!(!ok(Primitive::PositiveInt, number("0")));
        assert!(ok(Primitive::UnsignedInt, number("0")));
        assert!(!ok(Primitive::UnsignedInt, number("-1")));
        assert!(!ok(Primitive::Integer, json!("1")));
    }

    #[test]
    fn dates_and_times() {
        for good in ["2020", "2020-02", "2020-02-29", "2020-02-29T10:11:12Z", "2020-02-29T10:11:12.345+14:00"] {
            assert!(ok(Primitive::DateTime, json!(good)), "{good}");
        }
        for bad in ["0000", "2020-13", "2020-02-29T10:11", "2020-02-29T10:11:12", "20200229", "2020-02-29T24:00:00Z"] {
            assert!(!ok(Primitive::DateTime, json!(bad)), "{bad}");
        }
        assert!(ok(Primitive::Date, json!("1987-04-01")));
        assert!(!ok(Primitive::Date, json!("not-a-date")));
        assert!(!ok(Primitive::Date, json!("2020-02-29T10:11:12Z")));
        assert!(ok(Primitive::Instant, json!("2020-02-29T10:11:12.1-05:30")));
        assert!(!ok(Primitive::Instant, json!("2020-02-29")));
        assert!(ok(Primitive::Time, json!("23:59:60.5")));
        assert!(!ok(Primitive::Time, json!("23:59")));
    }

    #[test]
    fn strings_codes_and_identifiers() {
        assert!(ok(Primitive::Code, json!("a b")) && !ok(Primitive::Code, json!("a  b")));
        assert!(!ok(Primitive::Code, json!(" a")) && !ok(Primitive::Code, json!("")));
        assert!(!ok(Primitive::String, json!("")) && ok(Primitive::String, json!(" ")));
        assert!(ok(Primitive::Uri, json!("urn:x")) && !ok(Primitive::Uri, json!("a b")));
        assert!(ok(Primitive::Oid, json!("urn:oid:2.16.840")) && !ok(Primitive::Oid, json!("urn:oid:3.1")));
        assert!(!ok(Primitive::Oid, json!("urn:oid:1")) && !ok(Primitive::Oid, json!("urn:oid:1.01")));
        assert!(ok(Primitive::Uuid, json!("urn:uuid:c757873d-ec9a-4326-a141-556f43239520")));
        assert!(!ok(Primitive::Uuid, json!("urn:uuid:C757873D-EC9A-4326-A141-556F43239520")));
        assert!(ok(Primitive::Base64Binary, json!("aGVsbG8=\n")) && !ok(Primitive::Base64Binary, json!("abc")));
        assert!(!ok(Primitive::Base64Binary, json!("ab$d")));
        assert!(ok(Primitive::Id, json!("a-1.B")) && !ok(Primitive::Id, json!("a_1")));
        assert!(ok(Primitive::Boolean, json!(false)) && !ok(Primitive::Boolean, json!("true")));
    }
}

//! Parsing JSON so that every number keeps the characters it was written with.
//!
//! FHIR decimals carry their precision (`1.50` is not `1.5`), so a server must give numbers back
//! exactly as they arrived. serde_json's `arbitrary_precision` keeps a number's text, with one
//! exception: an exponent is normalised (`1e2` and `1E2` become `1e+2`). [`parse_exact`] puts
//! the written text back in that rare case, from the input itself.

use serde_json::{Number, Value};

/// Parses JSON text; every number of the result serialises exactly as it was written.
pub fn parse_exact(text: &[u8]) -> serde_json::Result<Value> {
    let mut value: Value = serde_json::from_slice(text)?;
    if has_exponent(&value) {
        restore_written_numbers(&mut value, text);
    }
    Ok(value)
}

fn has_exponent(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.as_str().contains('e'),
        Value::Array(items) => items.iter().any(has_exponent),
        Value::Object(object) => object.values().any(has_exponent),
        _ => false,
    }
}

/// Replaces each number of `value` by its literal in `text`, pairing them in document order.
/// The pairing is checked (same count, each literal reads as the same number); when it does not
/// hold (an object with a repeated key keeps one of its values) the parsed numbers stay.
fn restore_written_numbers(value: &mut Value, text: &[u8]) {
    let literals = number_literals(text);
    let mut numbers = Vec::with_capacity(literals.len());
    collect_numbers(value, &mut numbers);
    if numbers.len() != literals.len() {
        return;
    }
    let aligned = numbers
        .iter()
        .zip(&literals)
        .all(|(number, literal)| literal.parse::<Number>().is_ok_and(|written| written.as_str() == number.as_str()));
    if aligned {
        for (number, literal) in numbers.into_iter().zip(literals) {
            if number.as_str() != literal {
                *number = Number::from_string_unchecked(literal.to_owned());
            }
        }
    }
}

fn collect_numbers<'a>(value: &'a mut Value, numbers: &mut Vec<&'a mut Number>) {
    match value {
        Value::Number(number) => numbers.push(number),
        Value::Array(items) => items.iter_mut().for_each(|item| collect_numbers(item, numbers)),
        Value::Object(object) => object.values_mut().for_each(|item| collect_numbers(item, numbers)),
        _ => {}
    }
}

/// The number literals of valid JSON text, in document order (strings skipped).
fn number_literals(text: &[u8]) -> Vec<&str> {
    let mut literals = Vec::new();
    let (mut index, mut in_string) = (0, false);
    while index < text.len() {
        let byte = text[index];
        if in_string {
            match byte {
                b'\\' => index += 1,
                b'"' => in_string = false,
                _ => {}
            }
            index += 1;
        } else if byte == b'"' {
            in_string = true;
            index += 1;
        } else if byte == b'-' || byte.is_ascii_digit() {
            let start = index;
            while index < text.len() && matches!(text[index], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                index += 1;
            }
            // The text parsed as JSON, so the literal is ASCII.
            literals.push(std::str::from_utf8(&text[start..index]).unwrap_or_default());
        } else {
            index += 1;
        }
    }
    literals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_characters() {
        let text = r#"{"a":[1.50,0.010,1e2,1E2,1e+2,2E-3,-0.0,12345678901234567890,3.14159265358979323846264338],"s":"1e2 \" 5","b":{"c":112.41600000000001,"d":-1e-7}}"#;
        assert_eq!(parse_exact(text.as_bytes()).unwrap().to_string(), text);
    }

    #[test]
    fn a_repeated_key_keeps_the_parsed_numbers() {
        // The first `a` is dropped by the parser; the pairing fails and nothing is misplaced.
        let parsed = parse_exact(br#"{"a":1e2,"a":2E3,"b":5}"#).unwrap();
        assert_eq!(parsed.to_string(), r#"{"a":2e+3,"b":5}"#);
    }

    #[test]
    fn invalid_json_is_an_error() {
        assert!(parse_exact(b"{\"a\":1e}").is_err());
    }
}

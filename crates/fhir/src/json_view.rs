//! Read access to a parsed JSON value, whatever holds it: a `serde_json::Value` (REST bodies,
//! Bundle entries) or a [`crate::json_tape::JsonTape`] borrowing from the text (bulk loads).
//!
//! The validator, the compartment and reference extraction and the search tokens are written
//! once against [`JsonView`], so every way in runs the same checks and words the same messages.

use serde_json::Value;

/// The JSON type of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

/// A borrowed JSON value (`Copy`, like a reference). Objects behave as serde_json's map does:
/// one entry per key, in the order written.
pub trait JsonView<'a>: Copy + 'a {
    fn json_type(self) -> JsonType;
    fn as_str(self) -> Option<&'a str>;
    fn as_bool(self) -> Option<bool>;
    /// A number's text, as written (`1.50` stays `1.50`).
    fn number_text(self) -> Option<&'a str>;
    /// The items of an array (nothing for any other value).
    fn items(self) -> impl Iterator<Item = Self> + 'a;
    /// The number of items of an array.
    fn array_len(self) -> Option<usize>;
    /// The entries of an object, in order (nothing for any other value).
    fn entries(self) -> impl Iterator<Item = (&'a str, Self)> + 'a;
    /// The value of `key` in an object (`None` for any other value).
    fn get(self, key: &str) -> Option<Self>;
    /// An owned copy, for the rare messages that quote a whole value.
    fn to_value(self) -> Value;
    /// Appends the value as serde_json's compact serialisation writes it.
    fn write_compact(self, out: &mut Vec<u8>);

    fn is_object(self) -> bool {
        self.json_type() == JsonType::Object
    }

    fn is_array(self) -> bool {
        self.json_type() == JsonType::Array
    }

    fn is_null(self) -> bool {
        self.json_type() == JsonType::Null
    }
}

impl<'a> JsonView<'a> for &'a Value {
    fn json_type(self) -> JsonType {
        match self {
            Value::Null => JsonType::Null,
            Value::Bool(_) => JsonType::Bool,
            Value::Number(_) => JsonType::Number,
            Value::String(_) => JsonType::String,
            Value::Array(_) => JsonType::Array,
            Value::Object(_) => JsonType::Object,
        }
    }

    fn as_str(self) -> Option<&'a str> {
        Value::as_str(self)
    }

    fn as_bool(self) -> Option<bool> {
        Value::as_bool(self)
    }

    fn number_text(self) -> Option<&'a str> {
        match self {
            Value::Number(number) => Some(number.as_str()),
            _ => None,
        }
    }

    fn items(self) -> impl Iterator<Item = Self> + 'a {
        self.as_array().into_iter().flatten()
    }

    fn array_len(self) -> Option<usize> {
        self.as_array().map(Vec::len)
    }

    fn entries(self) -> impl Iterator<Item = (&'a str, Self)> + 'a {
        self.as_object().into_iter().flatten().map(|(key, value)| (key.as_str(), value))
    }

    fn get(self, key: &str) -> Option<Self> {
        self.as_object()?.get(key)
    }

    fn to_value(self) -> Value {
        self.clone()
    }

    fn write_compact(self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(out, self);
    }
}

//! A JSON object parsed into a flat list of nodes that borrow from its text: no allocation per
//! node, no key hashing, nothing to free but two reused buffers. Bulk loads parse each line this
//! way and validate, index and store it from the tape (see [`JsonView`]).
//!
//! The tape takes a subset of JSON and leaves the rest to `serde_json` ([`crate::parse_exact`]),
//! so that a line reads the same whichever parser reads it: [`JsonTape::parse`] returns `None`
//! for text that is not JSON (serde_json words the error), a root that is not an object, an
//! object with a repeated key (serde_json keeps one of the values), a number with an exponent
//! (whose written form `parse_exact` restores), a lone surrogate escape, or nesting deeper than
//! [`MAX_DEPTH`]. What it accepts, it reads exactly as serde_json would.

use serde_json::Value;

use crate::json_view::{JsonType, JsonView};

/// Deepest nesting of arrays and objects the tape takes (serde_json refuses past 128).
pub const MAX_DEPTH: u32 = 64;

/// Objects up to this many keys are checked for a repeated key pair by pair, without allocating.
const SMALL_OBJECT: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    False,
    True,
    Number,
    /// A string without escapes: its text is the span inside the quotes.
    Plain,
    /// A string with escapes, decoded into `decoded[aux..aux + len]`.
    Escaped,
    Array,
    Object,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    kind: Kind,
    /// The value's bytes in the text (strings with their quotes).
    start: u32,
    end: u32,
    /// Arrays and objects: the index of the node after the subtree. Escaped strings: where the
    /// decoded text starts in `decoded`.
    aux: u32,
    /// Arrays: items; objects: entries (each a key node then its value's nodes); escaped
    /// strings: decoded length.
    len: u32,
}

/// The buffers a tape is built in, kept from one parse to the next.
#[derive(Default)]
pub struct TapeBuffers {
    nodes: Vec<Node>,
    decoded: String,
}

/// A parsed JSON object (see the module documentation).
pub struct JsonTape<'t> {
    text: &'t str,
    nodes: &'t [Node],
    decoded: &'t str,
    /// The text has no whitespace between tokens and every escape is one serde_json writes, so
    /// a value's compact serialisation is its span of the text.
    canonical: bool,
}

/// A value in a tape.
#[derive(Clone, Copy)]
pub struct TapeValue<'a> {
    tape: &'a JsonTape<'a>,
    index: u32,
}

impl<'t> JsonTape<'t> {
    /// Parses `text` (one JSON object); `None` for text the tape leaves to serde_json.
    pub fn parse(text: &'t str, buffers: &'t mut TapeBuffers) -> Option<JsonTape<'t>> {
        buffers.nodes.clear();
        buffers.decoded.clear();
        u32::try_from(text.len()).ok()?;
        let mut parser = Parser {
            bytes: text.as_bytes(),
            text,
            at: 0,
            nodes: &mut buffers.nodes,
            decoded: &mut buffers.decoded,
            canonical: true,
        };
        parser.skip_space();
        if parser.peek() != Some(b'{') {
            return None;
        }
        parser.value(0)?;
        parser.skip_space();
        if parser.at != text.len() {
            return None;
        }
        let canonical = parser.canonical;
        Some(JsonTape { text, nodes: &buffers.nodes, decoded: &buffers.decoded, canonical })
    }

    /// The root object.
    pub fn root(&self) -> TapeValue<'_> {
        TapeValue { tape: self, index: 0 }
    }
}

impl<'a> TapeValue<'a> {
    fn node(self) -> Node {
        self.tape.nodes[self.index as usize]
    }

    /// The index of the node after this value's subtree.
    fn after(self) -> u32 {
        let node = self.node();
        match node.kind {
            Kind::Array | Kind::Object => node.aux,
            _ => self.index + 1,
        }
    }

    fn at(self, index: u32) -> TapeValue<'a> {
        TapeValue { tape: self.tape, index }
    }
}

/// Entries of an object or items of an array: `step` nodes per member before the value.
struct Members<'a> {
    tape: &'a JsonTape<'a>,
    next: u32,
    remaining: u32,
}

impl<'a> Members<'a> {
    fn of(value: TapeValue<'a>, kind: Kind) -> Members<'a> {
        let node = value.node();
        let remaining = if node.kind == kind { node.len } else { 0 };
        Members { tape: value.tape, next: value.index + 1, remaining }
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = TapeValue<'a>;

    fn next(&mut self) -> Option<TapeValue<'a>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let value = TapeValue { tape: self.tape, index: self.next };
        self.next = value.after();
        Some(value)
    }
}

impl<'a> JsonView<'a> for TapeValue<'a> {
    fn json_type(self) -> JsonType {
        match self.node().kind {
            Kind::Null => JsonType::Null,
            Kind::False | Kind::True => JsonType::Bool,
            Kind::Number => JsonType::Number,
            Kind::Plain | Kind::Escaped => JsonType::String,
            Kind::Array => JsonType::Array,
            Kind::Object => JsonType::Object,
        }
    }

    fn as_str(self) -> Option<&'a str> {
        let node = self.node();
        match node.kind {
            Kind::Plain => Some(&self.tape.text[node.start as usize + 1..node.end as usize - 1]),
            Kind::Escaped => Some(&self.tape.decoded[node.aux as usize..(node.aux + node.len) as usize]),
            _ => None,
        }
    }

    fn as_bool(self) -> Option<bool> {
        match self.node().kind {
            Kind::True => Some(true),
            Kind::False => Some(false),
            _ => None,
        }
    }

    fn number_text(self) -> Option<&'a str> {
        let node = self.node();
        (node.kind == Kind::Number).then(|| &self.tape.text[node.start as usize..node.end as usize])
    }

    fn items(self) -> impl Iterator<Item = Self> + 'a {
        Members::of(self, Kind::Array)
    }

    fn array_len(self) -> Option<usize> {
        let node = self.node();
        (node.kind == Kind::Array).then_some(node.len as usize)
    }

    fn entries(self) -> impl Iterator<Item = (&'a str, Self)> + 'a {
        // Each member is a key node followed by its value.
        let mut members = Members::of(self, Kind::Object);
        std::iter::from_fn(move || {
            if members.remaining == 0 {
                return None;
            }
            members.remaining -= 1;
            let key = TapeValue { tape: members.tape, index: members.next };
            let value = key.at(members.next + 1);
            members.next = value.after();
            Some((key.as_str().unwrap_or_default(), value))
        })
    }

    fn get(self, key: &str) -> Option<Self> {
        self.entries().find(|(name, _)| *name == key).map(|(_, value)| value)
    }

    fn to_value(self) -> Value {
        match self.node().kind {
            Kind::Null => Value::Null,
            Kind::False => Value::Bool(false),
            Kind::True => Value::Bool(true),
            Kind::Number => {
                Value::Number(serde_json::Number::from_string_unchecked(self.number_text().unwrap_or("0").to_owned()))
            }
            Kind::Plain | Kind::Escaped => Value::String(self.as_str().unwrap_or_default().to_owned()),
            Kind::Array => Value::Array(self.items().map(TapeValue::to_value).collect()),
            Kind::Object => {
                Value::Object(self.entries().map(|(key, value)| (key.to_owned(), value.to_value())).collect())
            }
        }
    }

    fn write_compact(self, out: &mut Vec<u8>) {
        let node = self.node();
        if self.tape.canonical {
            out.extend_from_slice(&self.tape.text.as_bytes()[node.start as usize..node.end as usize]);
            return;
        }
        match node.kind {
            // Re-escaped as serde_json escapes (only quotes, backslashes and control characters).
            Kind::Escaped => write_string(out, self.as_str().unwrap_or_default()),
            Kind::Array => {
                out.push(b'[');
                for (index, item) in self.items().enumerate() {
                    if index > 0 {
                        out.push(b',');
                    }
                    item.write_compact(out);
                }
                out.push(b']');
            }
            Kind::Object => {
                out.push(b'{');
                for (index, (key, value)) in self.entries().enumerate() {
                    if index > 0 {
                        out.push(b',');
                    }
                    write_string(out, key);
                    out.push(b':');
                    value.write_compact(out);
                }
                out.push(b'}');
            }
            // Literals, numbers and strings without escapes are written as they were.
            _ => out.extend_from_slice(&self.tape.text.as_bytes()[node.start as usize..node.end as usize]),
        }
    }
}

/// A string as serde_json writes it.
fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

struct Parser<'t, 'b> {
    bytes: &'t [u8],
    text: &'t str,
    at: usize,
    nodes: &'b mut Vec<Node>,
    decoded: &'b mut String,
    canonical: bool,
}

impl Parser<'_, '_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Skips JSON whitespace; true when there was some.
    fn skip_space(&mut self) -> bool {
        let start = self.at;
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
        self.at != start
    }

    /// Whitespace inside the root: the text is no longer its own compact form.
    fn space(&mut self) {
        if self.skip_space() {
            self.canonical = false;
        }
    }

    fn push(&mut self, kind: Kind, start: usize) -> usize {
        self.nodes.push(Node { kind, start: start as u32, end: self.at as u32, aux: 0, len: 0 });
        self.nodes.len() - 1
    }

    fn value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string(),
            b't' => self.literal(b"true", Kind::True),
            b'f' => self.literal(b"false", Kind::False),
            b'n' => self.literal(b"null", Kind::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8], kind: Kind) -> Option<()> {
        let start = self.at;
        if !self.bytes[start..].starts_with(word) {
            return None;
        }
        self.at += word.len();
        self.push(kind, start);
        Some(())
    }

    fn number(&mut self) -> Option<()> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            return None;
        }
        self.push(Kind::Number, start);
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let start = self.at;
        let index = self.push(Kind::Array, start);
        self.at += 1;
        self.space();
        let mut count = 0u32;
        if self.peek()? == b']' {
            self.at += 1;
        } else {
            loop {
                self.space();
                self.value(depth)?;
                count += 1;
                self.space();
                match self.peek()? {
                    b',' => self.at += 1,
                    b']' => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.close(index, count);
        Some(())
    }

    fn object(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let start = self.at;
        let index = self.push(Kind::Object, start);
        self.at += 1;
        self.space();
        let mut count = 0u32;
        if self.peek()? == b'}' {
            self.at += 1;
        } else {
            loop {
                self.space();
                if self.peek()? != b'"' {
                    return None;
                }
                self.string()?;
                self.space();
                if self.peek()? != b':' {
                    return None;
                }
                self.at += 1;
                self.space();
                self.value(depth)?;
                count += 1;
                self.space();
                match self.peek()? {
                    b',' => self.at += 1,
                    b'}' => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.close(index, count);
        if count > 1 && self.has_repeated_key(index) {
            return None;
        }
        Some(())
    }

    fn close(&mut self, index: usize, count: u32) {
        let after = self.nodes.len() as u32;
        let node = &mut self.nodes[index];
        node.end = self.at as u32;
        node.aux = after;
        node.len = count;
    }

    fn key(&self, index: usize) -> &str {
        let node = self.nodes[index];
        match node.kind {
            Kind::Escaped => &self.decoded[node.aux as usize..(node.aux + node.len) as usize],
            _ => &self.text[node.start as usize + 1..node.end as usize - 1],
        }
    }

    /// Whether the object at `index` (closed) has a key twice.
    fn has_repeated_key(&self, index: usize) -> bool {
        let count = self.nodes[index].len as usize;
        let mut next = index + 1;
        let mut keys = (0..count).map(move |_| {
            let key = next;
            let value = self.nodes[key + 1];
            next = match value.kind {
                Kind::Array | Kind::Object => value.aux as usize,
                _ => key + 2,
            };
            key
        });
        if count <= SMALL_OBJECT {
            let mut small = [0usize; SMALL_OBJECT];
            for slot in small.iter_mut().take(count) {
                *slot = keys.next().unwrap_or_default();
            }
            let small = &small[..count];
            (0..count).any(|i| {
                let key = self.key(small[i]);
                small[i + 1..].iter().any(|&other| self.key(other) == key)
            })
        } else {
            let mut names: Vec<&str> = keys.map(|key| self.key(key)).collect();
            names.sort_unstable();
            names.windows(2).any(|pair| pair[0] == pair[1])
        }
    }

    fn string(&mut self) -> Option<()> {
        let start = self.at;
        self.at += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    self.push(Kind::Plain, start);
                    return Some(());
                }
                b'\\' => break,
                0..=0x1f => return None,
                _ => self.at += 1,
            }
        }
        // Escapes: the string is decoded into `decoded`.
        let decoded_start = self.decoded.len();
        self.decoded.push_str(&self.text[start + 1..self.at]);
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    break;
                }
                b'\\' => self.escape()?,
                0..=0x1f => return None,
                _ => {
                    // A run of plain characters (it starts and ends at ASCII bytes).
                    let run = self.at;
                    while self.peek().is_some_and(|byte| !matches!(byte, b'"' | b'\\' | 0..=0x1f)) {
                        self.at += 1;
                    }
                    self.decoded.push_str(&self.text[run..self.at]);
                }
            }
        }
        let index = self.push(Kind::Escaped, start);
        self.nodes[index].aux = decoded_start as u32;
        self.nodes[index].len = (self.decoded.len() - decoded_start) as u32;
        Some(())
    }

    /// One escape sequence (at a backslash), decoded.
    fn escape(&mut self) -> Option<()> {
        let escaped = *self.bytes.get(self.at + 1)?;
        self.at += 2;
        let decoded = match escaped {
            b'"' => '"',
            b'\\' => '\\',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'/' => {
                // serde_json writes a plain `/`.
                self.canonical = false;
                '/'
            }
            b'u' => return self.unicode_escape(),
            _ => return None,
        };
        self.decoded.push(decoded);
        Some(())
    }

    /// `\uXXXX` (the `\u` already read), with a surrogate pair as one character.
    fn unicode_escape(&mut self) -> Option<()> {
        let hex = self.bytes.get(self.at..self.at + 4)?;
        let code = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        // serde_json writes `\u00xx` (lower-case hex) for control characters without a short
        // escape, and every other character as itself.
        let written = code < 0x20 && !matches!(code, 0x8 | 0x9 | 0xa | 0xc | 0xd);
        if !(written && hex[..2] == *b"00" && !hex.iter().any(u8::is_ascii_uppercase)) {
            self.canonical = false;
        }
        self.at += 4;
        let character = match code {
            0xD800..=0xDBFF => {
                if self.bytes.get(self.at..self.at + 2)? != b"\\u" {
                    return None;
                }
                let low_hex = self.bytes.get(self.at + 2..self.at + 6)?;
                if !low_hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let low = u32::from_str_radix(std::str::from_utf8(low_hex).ok()?, 16).ok()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                self.at += 6;
                char::from_u32(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))?
            }
            _ => char::from_u32(code)?,
        };
        self.decoded.push(character);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(text: &str) -> (Option<Value>, Result<Value, String>) {
        let mut buffers = TapeBuffers::default();
        let tape = JsonTape::parse(text, &mut buffers).map(|tape| tape.root().to_value());
        (tape, crate::parse_exact(text.as_bytes()).map_err(|error| error.to_string()))
    }

    /// What the tape takes it reads as serde_json does, and it writes serde_json's compact text.
    #[test]
    fn the_tape_reads_what_serde_json_reads() {
        let accepted = [
            r#"{"a":1,"b":[1.50,-0.0,0,12345678901234567890,true,false,null,{}],"c":{"d":[]},"e":""}"#,
            r#"{"s":"a \"q\" \\ \n \t \r \b \f \u0001 \u001f"}"#,
            r#"{"s":"\/ \u00e9 \u00E9 \u0041 \ud83d\ude00 é 😀", "t" : [ 1 , 2 ] }"#,
            "  {\"a\":\t{\"b\"\n:\r\"c\"}}\n",
            r#"{"k\u0041":1,"kA ":2}"#,
        ];
        for text in accepted {
            let (tape, serde) = both(text);
            let serde = serde.unwrap();
            assert_eq!(tape.as_ref(), Some(&serde), "{text}");
            let mut buffers = TapeBuffers::default();
            let parsed = JsonTape::parse(text, &mut buffers).unwrap();
            let mut written = Vec::new();
            parsed.root().write_compact(&mut written);
            assert_eq!(String::from_utf8(written).unwrap(), serde.to_string(), "{text}");
        }
    }

    /// What the tape leaves to serde_json: errors, repeated keys, exponents, lone surrogates,
    /// deep nesting, a root that is not an object.
    #[test]
    fn the_tape_leaves_the_rest_to_serde_json() {
        let deep = format!("{}1{}", "{\"a\":".repeat(70), "}".repeat(70));
        let left = [
            "{",
            "{}x",
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":1e2}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\q"}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"a":tru}"#,
            "[1]",
            r#""s""#,
            r#"{"a":[1,]}"#,
            r#"{"a":1,}"#,
            deep.as_str(),
        ];
        for text in left {
            let (tape, _) = both(text);
            assert!(tape.is_none(), "{text}");
        }
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        assert!(both(&format!("{{{},\"k7\":1}}", many.join(","))).0.is_none(), "a repeat among many keys");
        assert!(both(&format!("{{{}}}", many.join(","))).0.is_some());
    }

    #[test]
    fn views_agree() {
        let text = r#"{"a":[1,"x",{"b":true}],"c":{"d":null},"e":"\u00e9"}"#;
        let mut buffers = TapeBuffers::default();
        let tape = JsonTape::parse(text, &mut buffers).unwrap();
        let value: Value = serde_json::from_str(text).unwrap();
        let root = tape.root();
        assert_eq!(root.get("a").and_then(JsonView::array_len), Some(3));
        assert_eq!(root.get("e").and_then(JsonView::as_str), Some("é"));
        let keys: Vec<&str> = root.entries().map(|(key, _)| key).collect();
        let expected: Vec<&str> = (&value).entries().map(|(key, _)| key).collect();
        assert_eq!(keys, expected);
        let items: Vec<JsonType> = root.get("a").unwrap().items().map(JsonView::json_type).collect();
        assert_eq!(items, [JsonType::Number, JsonType::String, JsonType::Object]);
        assert!(root.get("c").unwrap().get("d").unwrap().is_null());
        assert!(root.get("zz").is_none() && root.get("a").unwrap().get("b").is_none());
    }
}

//! A minimal compact-JSON writer over a byte buffer.
//!
//! Resources are written field by field straight into a reused buffer instead of building
//! `serde_json::Value` trees: generation of millions of resources is then dominated by the
//! disk, and key order is fixed by the code (which keeps the output byte-stable).

/// Writes compact JSON into `buf`, inserting commas automatically.
pub(crate) struct JsonWriter {
    pub(crate) buf: Vec<u8>,
    /// Whether the next value or key inside the current container needs a leading comma.
    needs_comma: bool,
    /// In a transaction Bundle, references to resources of the same Bundle are written as
    /// `urn:uuid:<id>` (Synthea style) rather than `Type/id`.
    pub(crate) local_refs_as_urn: bool,
}

impl JsonWriter {
    pub(crate) fn new(local_refs_as_urn: bool) -> JsonWriter {
        JsonWriter { buf: Vec::with_capacity(64 * 1024), needs_comma: false, local_refs_as_urn }
    }

    /// Empties the buffer for the next document.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.needs_comma = false;
    }

    fn sep(&mut self) {
        if self.needs_comma {
            self.buf.push(b',');
        }
    }

    /// Starts an object as a value (array element or after `key`).
    pub(crate) fn begin_obj(&mut self) {
        self.sep();
        self.buf.push(b'{');
        self.needs_comma = false;
    }

    pub(crate) fn end_obj(&mut self) {
        self.buf.push(b'}');
        self.needs_comma = true;
    }

    /// Starts an array as a value.
    pub(crate) fn begin_arr(&mut self) {
        self.sep();
        self.buf.push(b'[');
        self.needs_comma = false;
    }

    pub(crate) fn end_arr(&mut self) {
        self.buf.push(b']');
        self.needs_comma = true;
    }

    /// Writes `"k":`; the next call writes the value.
    pub(crate) fn key(&mut self, k: &str) {
        self.sep();
        self.buf.push(b'"');
        self.buf.extend_from_slice(k.as_bytes());
        self.buf.extend_from_slice(b"\":");
        self.needs_comma = false;
    }

    /// A string value, escaped per RFC 8259.
    pub(crate) fn str(&mut self, s: &str) {
        self.sep();
        self.buf.push(b'"');
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"\\u0000",
                _ => continue,
            };
            self.buf.extend_from_slice(&bytes[start..i]);
            if esc == b"\\u0000" {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.buf.extend_from_slice(b"\\u00");
                self.buf.push(HEX[(b >> 4) as usize]);
                self.buf.push(HEX[(b & 15) as usize]);
            } else {
                self.buf.extend_from_slice(esc);
            }
            start = i + 1;
        }
        self.buf.extend_from_slice(&bytes[start..]);
        self.buf.push(b'"');
        self.needs_comma = true;
    }

    /// A string value assembled from parts (avoids a temporary `String`); parts must not need
    /// escaping (ids, codes, digits).
    pub(crate) fn str_parts(&mut self, parts: &[&str]) {
        self.sep();
        self.buf.push(b'"');
        for p in parts {
            debug_assert!(!p.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
            self.buf.extend_from_slice(p.as_bytes());
        }
        self.buf.push(b'"');
        self.needs_comma = true;
    }

    /// Raw JSON text (a number or literal produced by this crate).
    pub(crate) fn raw(&mut self, text: &str) {
        self.sep();
        self.buf.extend_from_slice(text.as_bytes());
        self.needs_comma = true;
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.sep();
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        let mut v = v;
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.buf.extend_from_slice(&tmp[i..]);
        self.needs_comma = true;
    }

    /// A decimal with exactly `places` fractional digits (FHIR keeps decimal precision, so
    /// `37.0` and `37` mean different things; we always write the measured precision).
    pub(crate) fn decimal(&mut self, v: f64, places: usize) {
        use std::io::Write;
        self.sep();
        // Writing into a Vec cannot fail.
        let _ = write!(self.buf, "{v:.places$}");
        self.needs_comma = true;
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.raw(if v { "true" } else { "false" });
    }

    // Field shorthands: key + value.

    pub(crate) fn field_str(&mut self, k: &str, v: &str) {
        self.key(k);
        self.str(v);
    }

    pub(crate) fn field_u64(&mut self, k: &str, v: u64) {
        self.key(k);
        self.u64(v);
    }

    pub(crate) fn field_bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.bool(v);
    }

    pub(crate) fn field_obj(&mut self, k: &str) {
        self.key(k);
        self.begin_obj();
    }

    pub(crate) fn field_arr(&mut self, k: &str) {
        self.key(k);
        self.begin_arr();
    }
}

/// Standard base64 (RFC 4648, padded), as FHIR `base64Binary` requires.
pub(crate) fn base64_encode(input: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { ALPHABET[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { ALPHABET[n as usize & 63] as char } else { '=' });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_valid_compact_json_with_escapes() {
        let mut w = JsonWriter::new(false);
        w.begin_obj();
        w.field_str("a", "x\"y\\z\n\u{1}");
        w.field_arr("b");
        w.u64(0);
        w.u64(1234567890);
        w.decimal(36.65, 1);
        w.begin_obj();
        w.end_obj();
        w.end_arr();
        w.field_bool("c", true);
        w.end_obj();
        let text = String::from_utf8(w.buf.clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["a"], "x\"y\\z\n\u{1}");
        assert_eq!(v["b"][1], 1234567890);
        assert!(text.contains("[0,1234567890,36."));
        assert_eq!(v["c"], true);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expect) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            let mut out = String::new();
            base64_encode(input.as_bytes(), &mut out);
            assert_eq!(out, expect);
        }
    }
}

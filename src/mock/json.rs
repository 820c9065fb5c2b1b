//! JSON as Dify writes it with Python's `json.dumps`: `", "` and `": "` separators, everything
//! outside ASCII as `\uXXXX`, object keys in the order Dify's code gives them.
//!
//! Invariant: the mock's bodies and event frames are byte-for-byte what that serialiser would
//! produce for the same values (client-sent objects keep their values, with keys sorted).

use std::fmt::Write as _;

use serde_json::Value;

/// An object written key by key, in order.
pub(super) struct Obj(String);

impl Obj {
    pub(super) fn new() -> Obj {
        Obj(String::from("{"))
    }

    /// A member whose value is already JSON.
    pub(super) fn raw(mut self, key: &str, raw: &str) -> Obj {
        if self.0.len() > 1 {
            self.0.push_str(", ");
        }
        push_str(&mut self.0, key);
        self.0.push_str(": ");
        self.0.push_str(raw);
        self
    }

    pub(super) fn str(self, key: &str, v: &str) -> Obj {
        self.raw(key, &string(v))
    }

    /// A string, or `null`.
    pub(super) fn opt_str(self, key: &str, v: Option<&str>) -> Obj {
        match v {
            Some(v) => self.str(key, v),
            None => self.raw(key, "null"),
        }
    }

    pub(super) fn int(self, key: &str, v: u64) -> Obj {
        self.raw(key, &v.to_string())
    }

    /// An integer, or `null`.
    pub(super) fn opt_int(self, key: &str, v: Option<u64>) -> Obj {
        match v {
            Some(v) => self.int(key, v),
            None => self.raw(key, "null"),
        }
    }

    pub(super) fn float(self, key: &str, v: f64) -> Obj {
        self.raw(key, &float(v))
    }

    pub(super) fn bool(self, key: &str, v: bool) -> Obj {
        self.raw(key, if v { "true" } else { "false" })
    }

    pub(super) fn done(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// A float as Python's `repr` writes it (`1.0`, not `1`).
pub(super) fn float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// A quoted string.
pub(super) fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_str(&mut out, s);
    out
}

fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Any value.
pub(super) fn value(v: &Value) -> String {
    let mut out = String::new();
    push_value(&mut out, v);
    out
}

fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => out.push_str(&float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => push_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_str(out, k);
                out.push_str(": ");
                push_value(out, item);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_as_python_json_dumps_does() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, 2.5, 3.0], "a": "Café 🙂\n\"q\""}"#).unwrap();
        assert_eq!(
            value(&v),
            r#"{"a": "Caf\u00e9 \ud83d\ude42\n\"q\"", "b": [1, 2.5, 3.0]}"#
        );
        let o = Obj::new()
            .str("event", "ping")
            .opt_str("error", None)
            .float("elapsed_time", 2.0)
            .bool("ok", true)
            .done();
        assert_eq!(
            o,
            r#"{"event": "ping", "error": null, "elapsed_time": 2.0, "ok": true}"#
        );
    }
}

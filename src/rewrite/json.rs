//! The top-level `user` of a JSON body, prefixed in place (and any top-level string set).
//!
//! Invariant: only the bytes inside the top-level `"user"` string values change (the escaped
//! prefix goes right after the opening quote); whitespace, key order, escapes and every nested
//! value stay as the client wrote them. A key is `user` when it *decodes* to `user` (so
//! `"\u0075ser"` counts), since that is what the upstream's JSON parser sees. Duplicate
//! top-level `user` keys are all prefixed: parsers disagree on which duplicate wins (Python keeps
//! the last, others the first), and prefixing every one is right whichever wins.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::UserPrefix;

/// Why a JSON body cannot be rewritten (answered as 400 `invalid_param`).
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The body is not one valid JSON document (this includes a UTF-8 BOM or another encoding,
    /// which the upstream might decode but this rewrite could not place a prefix in).
    #[error("the request body is not valid JSON: {0}")]
    Invalid(#[from] serde_json::Error),
    /// A top-level `user` that is not a string: the upstream could turn it into one unprefixed.
    #[error("user must be a string")]
    UserNotString,
}

/// `body` with the prefix inserted into every top-level `user` string; borrowed when there is
/// nothing to change (no top-level `user`, or a document that is not an object).
pub fn prefix_user<'b>(body: &'b [u8], prefix: &UserPrefix) -> Result<Cow<'b, [u8]>, JsonError> {
    let spans = top_level(body, "user")?;
    if spans.iter().any(|s| body[s.start] != b'"') {
        return Err(JsonError::UserNotString);
    }
    // Each prefix goes just past the opening quote.
    let edits = spans
        .iter()
        .map(|s| (s.start + 1..s.start + 1, &prefix.json[..]));
    Ok(splice(body, edits, spans.len() * prefix.json.len()))
}

/// `body` with every top-level `key` set to the string `value` (written as a JSON string);
/// borrowed when the document has no top-level `key` (or is not an object).
pub fn set_string<'b>(body: &'b [u8], key: &str, value: &str) -> Result<Cow<'b, [u8]>, JsonError> {
    let spans = top_level(body, key)?;
    let json = serde_json::to_vec(value)?;
    let edits = spans.iter().map(|s| (s.clone(), &json[..]));
    Ok(splice(body, edits, spans.len() * json.len()))
}

/// The spans of the values of every top-level `key` of a valid JSON document, in body order;
/// none when it is not an object.
fn top_level(body: &[u8], key: &str) -> Result<Vec<Range<usize>>, JsonError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Arrays and scalars have no keys; only their validity is checked.
        serde_json::from_slice::<IgnoredAny>(body)?;
        return Ok(Vec::new());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let spans = de.deserialize_map(ValueSpans { body, key })?;
    de.end()?;
    Ok(spans)
}

/// `body` with each span replaced by its bytes (spans in body order, not overlapping).
fn splice<'b, 'e>(
    body: &'b [u8],
    edits: impl Iterator<Item = (Range<usize>, &'e [u8])>,
    extra: usize,
) -> Cow<'b, [u8]> {
    let mut edits = edits.peekable();
    if edits.peek().is_none() {
        return Cow::Borrowed(body);
    }
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut from = 0;
    for (span, with) in edits {
        out.extend_from_slice(&body[from..span.start]);
        out.extend_from_slice(with);
        from = span.end;
    }
    out.extend_from_slice(&body[from..]);
    Cow::Owned(out)
}

/// Visits the top-level object, locating the values of `key` in `body` by their borrowed spans.
struct ValueSpans<'b, 'k> {
    body: &'b [u8],
    key: &'k str,
}

impl<'de> Visitor<'de> for ValueSpans<'de, '_> {
    type Value = Vec<Range<usize>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut spans = Vec::new();
        while let Some(is_key) = map.next_key_seed(KeyIs(self.key))? {
            if !is_key {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let raw: &'de RawValue = map.next_value()?;
            // The raw value borrows from the body, so its address gives its offset.
            let at = raw.get().as_ptr() as usize - self.body.as_ptr() as usize;
            spans.push(at..at + raw.get().len());
        }
        Ok(spans)
    }
}

/// Deserialises an object key to "is it this key?" without allocating for unescaped keys.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prefix() -> UserPrefix {
        UserPrefix::new("team-a:").unwrap()
    }

    fn rewrite(body: &str) -> Result<String, JsonError> {
        prefix_user(body.as_bytes(), &prefix()).map(|b| String::from_utf8(b.into_owned()).unwrap())
    }

    #[test]
    fn prefixes_only_the_top_level_user_value() {
        let body = "{ \"inputs\" : {\"user\":\"x\", \"q\":\"\\\"user\\\": \\\"y\\\"\"},\n\t\"user\":\"abc\" ,\"files\":[{\"user\":\"z\"}] }";
        let want = "{ \"inputs\" : {\"user\":\"x\", \"q\":\"\\\"user\\\": \\\"y\\\"\"},\n\t\"user\":\"team-a:abc\" ,\"files\":[{\"user\":\"z\"}] }";
        assert_eq!(rewrite(body).unwrap(), want);
    }

    #[test]
    fn keeps_escapes_and_unicode_of_the_value_and_the_rest() {
        let body = r#"{"a":"\/é\u00e9","user":"\u00e9l\"ise\/","b":1.50e+3}"#;
        let want = r#"{"a":"\/é\u00e9","user":"team-a:\u00e9l\"ise\/","b":1.50e+3}"#;
        assert_eq!(rewrite(body).unwrap(), want);
        let parsed: serde_json::Value = serde_json::from_str(&rewrite(body).unwrap()).unwrap();
        assert_eq!(parsed["user"], "team-a:él\"ise/");
    }

    #[test]
    fn a_key_that_decodes_to_user_is_user() {
        assert_eq!(
            rewrite(r#"{"\u0075ser": "bob"}"#).unwrap(),
            r#"{"\u0075ser": "team-a:bob"}"#
        );
    }

    #[test]
    fn every_duplicate_user_is_prefixed() {
        assert_eq!(
            rewrite(r#"{"user":"a","x":0,"user":"b"}"#).unwrap(),
            r#"{"user":"team-a:a","x":0,"user":"team-a:b"}"#
        );
    }

    #[test]
    fn the_prefix_is_escaped_for_json() {
        let p = UserPrefix::new(r#"q"\:"#).unwrap();
        let out = prefix_user(br#"{"user":"u"}"#, &p).unwrap();
        assert_eq!(&out[..], br#"{"user":"q\"\\:u"}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["user"], r#"q"\:u"#);
    }

    #[test]
    fn bodies_without_a_top_level_user_are_borrowed_unchanged() {
        for body in [
            r#"{"inputs":{"user":"x"},"response_mode":"streaming"}"#,
            r#"{}"#,
            r#"[{"user":"x"}]"#,
            r#" "user" "#,
            "null",
        ] {
            let out = prefix_user(body.as_bytes(), &prefix()).unwrap();
            assert!(matches!(out, Cow::Borrowed(_)), "{body}");
            assert_eq!(&out[..], body.as_bytes());
        }
    }

    #[test]
    fn a_user_that_is_not_a_string_is_refused() {
        for body in [
            r#"{"user":123}"#,
            r#"{"user":null}"#,
            r#"{"user":"a","user":["b"]}"#,
        ] {
            assert!(
                matches!(rewrite(body), Err(JsonError::UserNotString)),
                "{body}"
            );
        }
    }

    #[test]
    fn invalid_json_is_refused() {
        for body in [
            "",
            "{",
            r#"{"user":"a"} x"#,
            r#"{"user":"a",}"#,
            "\u{feff}{\"user\":\"a\"}",
            r#"{"user":NaN}"#,
            "[1,",
        ] {
            assert!(
                matches!(rewrite(body), Err(JsonError::Invalid(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn set_string_replaces_every_top_level_value_and_nothing_else() {
        let body = br#"{"inputs":{"response_mode":"x"}, "response_mode" : "async","user":"u"}"#;
        let out = set_string(body, "response_mode", "streaming").unwrap();
        assert_eq!(
            &out[..],
            br#"{"inputs":{"response_mode":"x"}, "response_mode" : "streaming","user":"u"}"#
        );
        let dup = set_string(br#"{"m":1,"m":[2]}"#, "m", "a\"b").unwrap();
        assert_eq!(&dup[..], br#"{"m":"a\"b","m":"a\"b"}"#);
        let none = set_string(br#"{"a":1}"#, "m", "x").unwrap();
        assert!(matches!(none, Cow::Borrowed(_)));
        assert!(set_string(b"{", "m", "x").is_err());
    }

    proptest! {
        /// Whatever the surrounding document, the parsed result equals the original with the
        /// top-level user prefixed, and nothing else differs.
        #[test]
        fn the_rewrite_agrees_with_a_parser(
            user in "\\PC{0,12}",
            others in proptest::collection::btree_map("[a-z]{1,6}", "\\PC{0,8}", 0..5),
            pretty in any::<bool>(),
        ) {
            let mut doc = serde_json::Map::new();
            for (k, v) in &others {
                doc.insert(k.clone(), serde_json::json!({ "user": v }));
            }
            doc.insert("user".into(), user.clone().into());
            let value = serde_json::Value::Object(doc);
            let body = if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            };
            let out = prefix_user(&body, &prefix()).unwrap();
            let mut want = value.clone();
            want["user"] = format!("team-a:{user}").into();
            prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap(), want);
            prop_assert_eq!(out.len(), body.len() + "team-a:".len());
        }
    }
}

//! The top-level `user` of a JSON body, prefixed in place.
//!
//! Invariant: only the bytes inside the top-level `"user"` string values change (the escaped
//! prefix goes right after the opening quote); whitespace, key order, escapes and every nested
//! value stay as the client wrote them. A key is `user` when it *decodes* to `user` (so
//! `"\u0075ser"` counts), since that is what the upstream's JSON parser sees. Duplicate
//! top-level `user` keys are all prefixed: parsers disagree on which duplicate wins (Python keeps
//! the last, others the first), and prefixing every one is right whichever wins.

use std::borrow::Cow;
use std::fmt;

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
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Arrays and scalars carry no `user`; only their validity is checked.
        serde_json::from_slice::<IgnoredAny>(body)?;
        return Ok(Cow::Borrowed(body));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = de.deserialize_map(UserSpans { body })?;
    de.end()?;
    if found.not_string {
        return Err(JsonError::UserNotString);
    }
    if found.inserts.is_empty() {
        return Ok(Cow::Borrowed(body));
    }
    let mut out = Vec::with_capacity(body.len() + found.inserts.len() * prefix.json.len());
    let mut from = 0;
    for at in found.inserts {
        out.extend_from_slice(&body[from..at]);
        out.extend_from_slice(&prefix.json);
        from = at;
    }
    out.extend_from_slice(&body[from..]);
    Ok(Cow::Owned(out))
}

/// What the scan of the top-level object found.
#[derive(Default)]
struct Found {
    /// Offsets just past the opening quote of each top-level `user` string, in body order.
    inserts: Vec<usize>,
    /// A top-level `user` held something other than a string.
    not_string: bool,
}

/// Visits the top-level object, locating its `user` values in `body` by their borrowed spans.
struct UserSpans<'b> {
    body: &'b [u8],
}

impl<'de> Visitor<'de> for UserSpans<'de> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let mut found = Found::default();
        while let Some(is_user) = map.next_key_seed(KeyIsUser)? {
            if !is_user {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let raw: &'de RawValue = map.next_value()?;
            let text = raw.get();
            if text.starts_with('"') {
                // The raw value borrows from the body, so its address gives its offset.
                found
                    .inserts
                    .push(text.as_ptr() as usize - self.body.as_ptr() as usize + 1);
            } else {
                found.not_string = true;
            }
        }
        Ok(found)
    }
}

/// Deserialises an object key to "is it `user`?" without allocating for unescaped keys.
struct KeyIsUser;

impl<'de> DeserializeSeed<'de> for KeyIsUser {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIsUser {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == "user")
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

//! End users namespaced per client: Dify sees `<prefix><user>` wherever a client sends a `user`.
//!
//! Invariant: a rewrite changes only the bytes of a `user` value (it puts the prefix in front of
//! them); every other byte of the body or query reaches the upstream exactly as the client sent
//! it. Where the upstream could read a `user` the rewrite cannot place (a non-string JSON `user`,
//! an ambiguous multipart structure), the rewrite refuses instead of passing it through.
//!
//! [`json`] rewrites a buffered JSON body, [`query`] a query string and [`multipart`] a
//! `multipart/form-data` body as it streams.

pub mod json;
pub mod multipart;
pub mod query;

use bytes::Bytes;

/// Longest accepted prefix, in bytes: Dify stores the end user's id in a 255-character column,
/// and the prefix should leave most of it to the client.
pub const MAX_PREFIX_LEN: usize = 64;

/// A client's end-user prefix, with its encoded forms computed once.
///
/// Only visible ASCII (`!`..=`~`) is accepted, so the prefix reads the same in every charset
/// the upstream may decode a multipart field with (ASCII, UTF-8, Latin-1).
#[derive(Clone, PartialEq, Eq)]
pub struct UserPrefix {
    /// The prefix itself, as inserted into multipart field content.
    raw: Bytes,
    /// The prefix escaped for the inside of a JSON string.
    json: Bytes,
    /// The prefix percent-encoded for a query-string value.
    query: Box<str>,
}

/// Why a configured prefix is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// An empty prefix would namespace nothing.
    #[error("user_prefix must not be empty")]
    Empty,
    /// Longer than [`MAX_PREFIX_LEN`].
    #[error("user_prefix must be at most {MAX_PREFIX_LEN} bytes")]
    TooLong,
    /// A byte outside visible ASCII (space, control, non-ASCII).
    #[error("user_prefix may only hold visible ASCII characters (no spaces)")]
    BadChar,
}

impl UserPrefix {
    /// Validates `prefix` and precomputes its JSON and query forms.
    pub fn new(prefix: &str) -> Result<UserPrefix, PrefixError> {
        if prefix.is_empty() {
            return Err(PrefixError::Empty);
        }
        if prefix.len() > MAX_PREFIX_LEN {
            return Err(PrefixError::TooLong);
        }
        if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(PrefixError::BadChar);
        }
        let quoted = serde_json::to_string(prefix).expect("a str always serialises");
        let json = Bytes::copy_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
        let query = url::form_urlencoded::byte_serialize(prefix.as_bytes()).collect();
        Ok(UserPrefix {
            raw: Bytes::copy_from_slice(prefix.as_bytes()),
            json,
            query,
        })
    }

    /// The prefix as configured.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.raw).expect("validated ASCII")
    }
}

impl std::fmt::Debug for UserPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserPrefix({:?})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precomputes_each_encoding() {
        let p = UserPrefix::new(r#"t"a\m&=+:"#).unwrap();
        assert_eq!(p.as_str(), r#"t"a\m&=+:"#);
        assert_eq!(&p.json[..], br#"t\"a\\m&=+:"#);
        assert_eq!(&*p.query, "t%22a%5Cm%26%3D%2B%3A");
    }

    #[test]
    fn refuses_what_could_not_read_the_same_everywhere() {
        assert_eq!(UserPrefix::new(""), Err(PrefixError::Empty));
        assert_eq!(UserPrefix::new(&"a".repeat(65)), Err(PrefixError::TooLong));
        assert!(UserPrefix::new(&"a".repeat(64)).is_ok());
        for bad in ["team a:", "tëam:", "team\n", "team\u{7f}"] {
            assert_eq!(UserPrefix::new(bad), Err(PrefixError::BadChar), "{bad:?}");
        }
    }
}

//! Request ids: accepted from the client when well-formed, generated otherwise.
//!
//! Invariant: the id the gateway returns, logs and forwards upstream is 1..=128 characters of
//! `[A-Za-z0-9._:/+=-]`, so it cannot inject log fields or headers.

use http::{HeaderMap, HeaderValue};

use crate::upstream::X_REQUEST_ID;

/// Longest accepted incoming id.
pub const MAX_LEN: usize = 128;

fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._:/+=-".contains(c))
}

/// The request's id: the client's `X-Request-Id` if acceptable, else a new UUID v4.
pub fn for_request(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if acceptable(v) => v.clone(),
        _ => generate(),
    }
}

/// A fresh random id.
pub fn generate() -> HeaderValue {
    let mut buf = [0u8; 36];
    let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sane_ids_and_replaces_others() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123_x.y"));
        assert_eq!(for_request(&h), "abc-123_x.y");
        for bad in ["", "a b", "x\"y", "{json}", &"a".repeat(129)] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let got = for_request(&h);
            assert_ne!(got, bad);
            assert_eq!(got.len(), 36);
        }
        h.clear();
        assert_eq!(for_request(&h).len(), 36);
    }
}

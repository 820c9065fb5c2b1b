//! Long-poll on the run-detail path: `Prefer: wait=N` (RFC 7240) holds a request for a running
//! run until it changes, through the run's one watcher ([`crate::watch`]).
//!
//! Invariant: a request is held only when it asked to wait, the run is running and the client's
//! `If-None-Match` (if any) still names the current body; it is held at most the wait applied
//! (`N`, cut to `longpoll.max_wait`), then answered with the state then (304 if its
//! `If-None-Match` still matches) and `Preference-Applied: wait=<applied>`. Without `Prefer`,
//! nothing changes.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// `Prefer` request header (RFC 7240).
pub static PREFER: HeaderName = HeaderName::from_static("prefer");
/// `Preference-Applied` response header (RFC 7240).
pub static PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// The `wait` preference of `req`, in seconds: the first one given across every `Prefer` line
/// (RFC 7240 §2: a preference given twice counts once, the first), other preferences and
/// parameters ignored; `None` when absent or not a number of seconds.
pub fn preferred_wait(req: &HeaderMap) -> Option<Duration> {
    for line in req.get_all(&PREFER) {
        for pref in line.as_bytes().split(|&b| b == b',') {
            // `token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )`
            let head = pref.split(|&b| b == b';').next().unwrap_or_default();
            let (name, value) = match head.iter().position(|&b| b == b'=') {
                Some(i) => (&head[..i], Some(&head[i + 1..])),
                None => (head, None),
            };
            if !name.trim_ascii().eq_ignore_ascii_case(b"wait") {
                continue;
            }
            let v = value?.trim_ascii();
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            let secs = std::str::from_utf8(v).ok()?.parse::<u64>().ok()?;
            return Some(Duration::from_secs(secs));
        }
    }
    None
}

/// `Preference-Applied: wait=<secs>`.
pub fn applied(wait: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("wait={}", wait.as_secs())).expect("digits are a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(lines: &[&str]) -> Option<u64> {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(&PREFER, HeaderValue::from_str(l).unwrap());
        }
        preferred_wait(&h).map(|d| d.as_secs())
    }

    #[test]
    fn wait_is_read_among_other_preferences() {
        assert_eq!(wait(&[]), None);
        assert_eq!(wait(&["wait=10"]), Some(10));
        assert_eq!(wait(&["respond-async, wait=5"]), Some(5));
        assert_eq!(wait(&["return=minimal; foo=bar,  Wait = 7 ;x"]), Some(7));
        assert_eq!(wait(&["handling=lenient", "wait=\"3\""]), Some(3));
        assert_eq!(wait(&["wait=1", "wait=9"]), Some(1), "the first counts");
        assert_eq!(wait(&["waiting=3"]), None);
        assert_eq!(wait(&["wait=soon"]), None);
        assert_eq!(wait(&["wait"]), None);
        assert_eq!(wait(&["wait=-1"]), None);
    }
}

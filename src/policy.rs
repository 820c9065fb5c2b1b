//! What the cache may keep, decided from an upstream answer.
//!
//! Invariant: only a 200 whose JSON `status` is in the configured terminal set is kept without a
//! short expiry; every other status value (`running`, `paused`, `scheduled`, unknown, null) is
//! kept for at most `running_ttl`, a 404 for at most `not_found_ttl`, and anything else — other
//! statuses, bodies that are not a JSON object — is never kept.

use std::borrow::Cow;
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;

use crate::config::CacheConfig;

/// What kind of entry an answer makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryClass {
    /// A run that will never change again.
    Terminal,
    /// A run that may still change (`running`, `paused`, unknown, …).
    Running,
    /// The upstream said the run does not exist (for this app).
    NotFound,
}

impl EntryClass {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryClass::Terminal => "terminal",
            EntryClass::Running => "running",
            EntryClass::NotFound => "not_found",
        }
    }
}

/// Why an upstream answer was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoCacheReason {
    /// The upstream answered with a status that is never kept (401, 403, 429, 5xx, …).
    UpstreamStatus,
    /// A 200 whose body is not a JSON object with a string-or-null `status`.
    InvalidBody,
    /// The matching TTL is configured to zero.
    TtlZero,
}

impl NoCacheReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NoCacheReason::UpstreamStatus => "upstream_status",
            NoCacheReason::InvalidBody => "invalid_body",
            NoCacheReason::TtlZero => "ttl_zero",
        }
    }
}

/// The policy's verdict on one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep it; `ttl` of `None` means no expiry (evicted only by size).
    Keep {
        class: EntryClass,
        ttl: Option<Duration>,
    },
    /// Pass it to the client, keep nothing.
    Pass(NoCacheReason),
}

/// The one field of a run body the gateway reads. Deserialising into it still checks that the
/// whole body is well-formed JSON, but allocates nothing for the other fields.
#[derive(Deserialize)]
struct StatusOnly<'a> {
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
}

/// Reads the JSON `status` of a run body. `Err` when the body is not a JSON object whose
/// `status` is a string, null or absent.
pub fn run_status(body: &[u8]) -> Result<Option<Cow<'_, str>>, serde_json::Error> {
    serde_json::from_slice::<StatusOnly<'_>>(body).map(|s| s.status)
}

/// The caching policy, built once from validated config.
#[derive(Debug, Clone)]
pub struct Policy {
    terminal: Box<[Box<str>]>,
    terminal_max_age: Option<Duration>,
    running_ttl: Duration,
    not_found_ttl: Duration,
}

impl Policy {
    pub fn new(c: &CacheConfig) -> Policy {
        Policy {
            terminal: c
                .terminal_statuses
                .iter()
                .map(|s| s.as_str().into())
                .collect(),
            terminal_max_age: c.terminal_max_age,
            running_ttl: c.running_ttl,
            not_found_ttl: c.not_found_ttl,
        }
    }

    /// Is `status` one of the configured terminal statuses?
    pub fn is_terminal(&self, status: &str) -> bool {
        self.terminal.iter().any(|t| &**t == status)
    }

    /// Decides from the upstream status code and body bytes.
    pub fn decide(&self, code: StatusCode, body: &[u8]) -> Decision {
        match code {
            StatusCode::OK => match run_status(body) {
                Ok(Some(s)) if self.is_terminal(&s) => Decision::Keep {
                    class: EntryClass::Terminal,
                    ttl: self.terminal_max_age,
                },
                Ok(_) => Self::keep_for(EntryClass::Running, self.running_ttl),
                Err(_) => Decision::Pass(NoCacheReason::InvalidBody),
            },
            StatusCode::NOT_FOUND => Self::keep_for(EntryClass::NotFound, self.not_found_ttl),
            _ => Decision::Pass(NoCacheReason::UpstreamStatus),
        }
    }

    fn keep_for(class: EntryClass, ttl: Duration) -> Decision {
        if ttl.is_zero() {
            Decision::Pass(NoCacheReason::TtlZero)
        } else {
            Decision::Keep {
                class,
                ttl: Some(ttl),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_TERMINAL_STATUSES;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy::new(&CacheConfig {
            max_bytes: 1 << 20,
            terminal_statuses: DEFAULT_TERMINAL_STATUSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            terminal_max_age: None,
            running_ttl: Duration::from_secs(1),
            not_found_ttl: Duration::from_secs(2),
            not_found_grace: Duration::from_secs(10),
            stale_if_error: Duration::ZERO,
            app_meta_ttl: Duration::from_secs(60),
        })
    }

    fn body(status: &str) -> Vec<u8> {
        format!(
            r#"{{"id": "a", "workflow_id": "b", "status": {status}, "inputs": "{{\"sys.user_id\": \"u\"}}", "outputs": {{}}, "error": null, "total_steps": 3, "total_tokens": 10, "created_at": 1, "finished_at": null, "elapsed_time": 0.5}}"#
        )
        .into_bytes()
    }

    #[test]
    fn terminal_statuses_are_kept_without_expiry() {
        let p = policy();
        for s in DEFAULT_TERMINAL_STATUSES {
            assert_eq!(
                p.decide(StatusCode::OK, &body(&format!("\"{s}\""))),
                Decision::Keep {
                    class: EntryClass::Terminal,
                    ttl: None
                },
                "{s}"
            );
        }
    }

    #[test]
    fn non_terminal_statuses_are_short_lived() {
        let p = policy();
        for s in [
            "\"running\"",
            "\"paused\"",
            "\"scheduled\"",
            "\"exploded\"",
            "null",
            "\"Succeeded\"",
        ] {
            assert_eq!(
                p.decide(StatusCode::OK, &body(s)),
                Decision::Keep {
                    class: EntryClass::Running,
                    ttl: Some(Duration::from_secs(1))
                },
                "{s}"
            );
        }
        // Old Dify: unknown run is a 200 with every field null.
        let all_null = br#"{"id": null, "workflow_id": null, "status": null, "inputs": null, "outputs": null}"#;
        assert!(matches!(
            p.decide(StatusCode::OK, all_null),
            Decision::Keep {
                class: EntryClass::Running,
                ..
            }
        ));
    }

    #[test]
    fn escaped_status_is_read_correctly() {
        let p = policy();
        let b = br#"{"status": "succ\u0065eded", "outputs": {"url": "https:\/\/x"}}"#;
        assert!(matches!(
            p.decide(StatusCode::OK, b),
            Decision::Keep {
                class: EntryClass::Terminal,
                ..
            }
        ));
    }

    #[test]
    fn bad_bodies_and_error_statuses_are_never_kept() {
        let p = policy();
        for b in [
            &b"not json"[..],
            b"{\"status\": \"succeeded\"",
            b"[1,2]",
            b"{\"status\": 3}",
            b"",
        ] {
            assert_eq!(
                p.decide(StatusCode::OK, b),
                Decision::Pass(NoCacheReason::InvalidBody)
            );
        }
        for code in [401u16, 403, 429, 500, 502, 503, 504, 400] {
            let c = StatusCode::from_u16(code).unwrap();
            assert_eq!(
                p.decide(c, &body("\"succeeded\"")),
                Decision::Pass(NoCacheReason::UpstreamStatus)
            );
        }
        assert!(matches!(
            p.decide(StatusCode::NOT_FOUND, b"{}"),
            Decision::Keep {
                class: EntryClass::NotFound,
                ..
            }
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic_and_only_known_terminals_are_terminal(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let p = policy();
            if let Decision::Keep { class: EntryClass::Terminal, .. } = p.decide(StatusCode::OK, &b) {
                let s = run_status(&b).unwrap().unwrap();
                prop_assert!(DEFAULT_TERMINAL_STATUSES.contains(&&*s));
            }
        }

        #[test]
        fn arbitrary_status_strings_classify_by_membership(s in "\\PC{0,20}") {
            let p = policy();
            let b = serde_json::to_vec(&serde_json::json!({"status": s, "outputs": {}})).unwrap();
            let terminal = matches!(p.decide(StatusCode::OK, &b), Decision::Keep { class: EntryClass::Terminal, .. });
            prop_assert_eq!(terminal, DEFAULT_TERMINAL_STATUSES.contains(&s.as_str()));
        }
    }
}

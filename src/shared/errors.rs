//! What can go wrong with the shared tier, how often it did, and how loudly it is said.
//!
//! Invariant: every failed shared-tier call is counted under exactly one [`SharedError`], when
//! it fails (in `shared_tier_errors_total` too when the tier was given that family), and is
//! answered to the caller as a miss or `Unavailable`, never as a request failure; a warning is
//! logged at most once per [`WARN_EVERY`] per error kind, however many requests fail.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::ReasonLabel;

/// Least time between two warnings of one kind; the ones in between are counted and the count is
/// reported with the next warning.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why a shared-tier call did not succeed. Also the label of its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SharedError {
    /// No answer within the per-call timeout (`shared.timeout`).
    #[error("the shared cache did not answer in time")]
    Timeout,
    /// No connection (refused, reset, DNS, TLS, or the connection is being re-established).
    #[error("the shared cache cannot be reached")]
    Connection,
    /// Redis answered with an error (OOM, READONLY, cluster down, script error, …) or with a
    /// reply of an unexpected type.
    #[error("the shared cache answered with an error")]
    Server,
    /// A stored value failed the codec's checks (foreign, corrupt or truncated) and was ignored.
    #[error("a shared cache value failed its checks")]
    Corrupt,
    /// The caller's app tag is not usable in a key (empty, too long, or holding `{`, `}`,
    /// whitespace or control bytes); nothing was sent.
    #[error("invalid app tag for the shared cache")]
    BadTag,
}

impl SharedError {
    /// Every kind, in the order of [`SharedError::index`].
    pub const ALL: [SharedError; 5] = [
        SharedError::Timeout,
        SharedError::Connection,
        SharedError::Server,
        SharedError::Corrupt,
        SharedError::BadTag,
    ];

    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SharedError::Timeout => "timeout",
            SharedError::Connection => "connection",
            SharedError::Server => "server",
            SharedError::Corrupt => "corrupt",
            SharedError::BadTag => "bad_tag",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Sorts a client error into one kind.
    pub(crate) fn from_redis(e: &redis::RedisError) -> SharedError {
        if e.is_timeout() {
            SharedError::Timeout
        } else if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
        {
            SharedError::Connection
        } else {
            SharedError::Server
        }
    }
}

/// A snapshot of the failure counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedStats {
    /// Calls that hit the per-call timeout.
    pub timeout: u64,
    /// Calls that found no connection.
    pub connection: u64,
    /// Calls Redis answered with an error.
    pub server: u64,
    /// Values ignored because they failed the codec's checks.
    pub corrupt: u64,
    /// Calls refused because of an unusable app tag.
    pub bad_tag: u64,
}

impl SharedStats {
    /// The count for one kind.
    pub fn get(&self, e: SharedError) -> u64 {
        match e {
            SharedError::Timeout => self.timeout,
            SharedError::Connection => self.connection,
            SharedError::Server => self.server,
            SharedError::Corrupt => self.corrupt,
            SharedError::BadTag => self.bad_tag,
        }
    }

    /// All failures together.
    pub fn total(&self) -> u64 {
        SharedError::ALL.iter().map(|e| self.get(*e)).sum()
    }
}

/// Failure counters and the warning rate limiter, shared by the tier and its subscriber task.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// One counter per [`SharedError`], by index.
    counts: [AtomicU64; 5],
    /// Per kind: when the last warning was logged, as milliseconds since [`epoch`] plus one
    /// (zero means never).
    last_warn_ms: [AtomicU64; 5],
    /// Per kind: failures not warned about since the last warning.
    suppressed: [AtomicU64; 5],
    /// The exported counters, by `reason` (a series appears with its first failure).
    exported: Family<ReasonLabel, Counter>,
}

/// A process-wide monotonic origin for the rate limiter's timestamps.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Health {
    /// Counters that also count into `exported`.
    pub(crate) fn exported_to(exported: Family<ReasonLabel, Counter>) -> Health {
        Health {
            exported,
            ..Health::default()
        }
    }

    /// Counts one failure of `op` and warns if this kind has not been warned about lately.
    /// `detail` must not carry a key, a password or a URL.
    pub(crate) fn fail(&self, op: &'static str, e: SharedError, detail: &dyn std::fmt::Display) {
        let i = e.index();
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.exported
            .get_or_create(&ReasonLabel { reason: e.as_str() })
            .inc();
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last_warn_ms[i].load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self.last_warn_ms[i]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed[i].swap(0, Ordering::Relaxed);
            tracing::warn!(
                target: "shared",
                op,
                error = e.as_str(),
                detail = %detail,
                suppressed,
                "shared cache call failed; serving without it"
            );
        } else {
            self.suppressed[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub(crate) fn stats(&self) -> SharedStats {
        let c = |e: SharedError| self.counts[e.index()].load(Ordering::Relaxed);
        SharedStats {
            timeout: c(SharedError::Timeout),
            connection: c(SharedError::Connection),
            server: c(SharedError::Server),
            corrupt: c(SharedError::Corrupt),
            bad_tag: c(SharedError::BadTag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_counter_and_label() {
        let h = Health::default();
        for (n, e) in SharedError::ALL.iter().enumerate() {
            assert_eq!(e.index(), n);
            for _ in 0..=n {
                h.fail("test", *e, &"x");
            }
        }
        let s = h.stats();
        for (n, e) in SharedError::ALL.iter().enumerate() {
            assert_eq!(s.get(*e), n as u64 + 1, "{}", e.as_str());
        }
        assert_eq!(s.total(), 15);
        let labels: std::collections::HashSet<_> =
            SharedError::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(labels.len(), SharedError::ALL.len());
    }

    #[test]
    fn warnings_are_rate_limited() {
        let h = Health::default();
        for _ in 0..100 {
            h.fail("test", SharedError::Timeout, &"x");
        }
        // The first failure warned; the other 99 wait for the next window.
        assert_eq!(
            h.suppressed[SharedError::Timeout.index()].load(Ordering::Relaxed),
            99
        );
        assert_eq!(h.stats().timeout, 100);
    }

    #[test]
    fn failures_are_exported_as_they_happen() {
        let family = Family::<ReasonLabel, Counter>::default();
        let h = Health::exported_to(family.clone());
        h.fail("test", SharedError::Connection, &"x");
        h.fail("test", SharedError::Connection, &"x");
        let count = |e: SharedError| {
            family
                .get_or_create(&ReasonLabel { reason: e.as_str() })
                .get()
        };
        assert_eq!(count(SharedError::Connection), 2);
        assert_eq!(count(SharedError::Timeout), 0);
        assert_eq!(h.stats().connection, 2);
    }
}

//! Retries with jittered backoff of the idempotent upstream GET, and the loop that makes one
//! fetch out of attempts: breaker, slot, exchange, retry.
//!
//! Invariant: a fetch is retried only after a transport error, 429, 502, 503 or 504, at most
//! `max_attempts` times in all, never past the fetch's deadline; every attempt first passes the
//! app's circuit breaker and holds an upstream slot for exactly its exchange.

use std::time::{Duration, Instant};

use http::header::RETRY_AFTER;
use http::HeaderValue;
use tokio::sync::Semaphore;

use crate::config::RetrySettings;
use crate::outcome::UpstreamOutcome;
use crate::run_id::RunId;

use super::breaker::{is_failure, Refused};
use super::{App, Credentials, UpstreamAnswer, UpstreamError, Upstreams};

/// When and how often to try again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retries).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles each time, with full jitter.
    pub base_delay: Duration,
    /// Upper bound of one backoff.
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for (the error goes to the client).
    pub retry_after_cap: Duration,
}

impl RetryPolicy {
    /// The policy the `[upstream]` retry settings describe.
    pub fn new(settings: &RetrySettings) -> RetryPolicy {
        RetryPolicy {
            max_attempts: settings.max_attempts,
            base_delay: settings.base_delay,
            max_delay: settings.max_delay,
            retry_after_cap: settings.retry_after_cap,
        }
    }

    /// Should this outcome be tried again? (See [`UpstreamAnswer::retryable`] and
    /// [`UpstreamError::retryable`].)
    pub fn retryable(r: &Result<UpstreamAnswer, UpstreamError>) -> bool {
        match r {
            Ok(a) => a.retryable(),
            Err(e) => e.retryable(),
        }
    }

    /// The pause before retry number `retry` (1-based), or `None` when the answer's
    /// `Retry-After` exceeds the cap. `jitter` is uniform in [0, 1).
    pub fn delay(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if let Some(ra) = retry_after {
            return (ra <= self.retry_after_cap).then_some(ra);
        }
        let exp = self
            .base_delay
            .saturating_mul(
                1u32.checked_shl(retry.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max_delay);
        Some(exp.mul_f64(jitter.clamp(0.0, 1.0)))
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by Dify or Cloudflare).
pub fn retry_after(a: &UpstreamAnswer) -> Option<Duration> {
    a.headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A uniform number in [0, 1) from the OS generator (only used on the retry path).
pub fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::getrandom(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

impl Upstreams {
    /// Fetches `run`'s detail from `app`'s upstream: through the app's circuit breaker, in a
    /// slot under the global concurrency cap and the app's and `client_share`'s shares (the
    /// slots of the client the fetch is charged to), retrying transient failures within the
    /// fetch's deadline. Every attempt carries `credentials`, the key the fetch loaded once (see
    /// [`App::credentials`]), and is counted in `upstream_requests_total`.
    pub async fn fetch_run(
        &self,
        app: &App,
        run: RunId,
        rid: &HeaderValue,
        client_share: Option<&Semaphore>,
        credentials: &Credentials,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        let deadline = Instant::now() + self.total_timeout;
        let mut attempt = 1;
        loop {
            if let Err(Refused(wait)) = app.breaker.admit() {
                // Refused before any exchange: counted, but no latency to observe.
                self.metrics.upstream(UpstreamOutcome::CircuitOpen, None);
                return Err(UpstreamError::CircuitOpen { retry_after: wait });
            }
            let permit = match self.slots.acquire(app.id, client_share).await {
                Ok(slot) => slot,
                Err(full) => {
                    self.metrics.reject(full);
                    return Err(UpstreamError::Overloaded);
                }
            };
            let t = Instant::now();
            let r = app
                .upstream
                .fetch_run(run, Some(rid), deadline, credentials)
                .await;
            drop(permit);
            let outcome = match &r {
                Ok(a) => UpstreamOutcome::from_status(a.status),
                Err(e) => e.outcome(),
            };
            self.metrics.upstream(outcome, Some(t.elapsed()));
            if app.breaker.record(is_failure(&r)) {
                tracing::warn!(app = %app.name, "upstream circuit opened after repeated failures");
            }
            if attempt >= self.retry.max_attempts || !RetryPolicy::retryable(&r) {
                return r;
            }
            let hint = r.as_ref().ok().and_then(retry_after);
            let Some(pause) = self.retry.delay(attempt, hint, jitter()) else {
                return r;
            };
            if Instant::now() + pause >= deadline {
                return r;
            }
            tracing::debug!(request_id = ?rid, app = %app.name, attempt, ?pause, outcome = outcome.as_str(), "retrying upstream");
            self.metrics.retries.inc();
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::upstream::tests::answer;
    use crate::upstream::ConnectCause;

    #[test]
    fn only_transient_failures_are_retried() {
        for c in [429, 502, 503, 504] {
            assert!(RetryPolicy::retryable(&answer(c)), "{c}");
        }
        for c in [200, 400, 401, 403, 404, 500] {
            assert!(!RetryPolicy::retryable(&answer(c)), "{c}");
        }
        assert!(RetryPolicy::retryable(&Err(UpstreamError::Connect {
            cause: ConnectCause::Refused
        })));
        assert!(!RetryPolicy::retryable(&Err(UpstreamError::BodyTooLarge)));
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut a = answer(503).unwrap();
        assert_eq!(retry_after(&a), None);
        a.headers
            .insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&a), Some(Duration::from_secs(7)));
        a.headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&a), None);
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
            retry_after_cap: Duration::from_secs(2),
        };
        assert_eq!(
            p.delay(1, None, 0.999_999),
            Some(Duration::from_millis(100).mul_f64(0.999_999))
        );
        assert_eq!(p.delay(2, None, 0.5), Some(Duration::from_millis(100)));
        assert_eq!(p.delay(9, None, 1.0), Some(Duration::from_millis(300)));
        assert_eq!(p.delay(40, None, 1.0), Some(Duration::from_millis(300)));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(1)), 0.1),
            Some(Duration::from_secs(1))
        );
        assert_eq!(p.delay(1, Some(Duration::from_secs(3)), 0.1), None);
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }
}

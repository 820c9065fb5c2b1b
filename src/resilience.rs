//! Retries with jittered backoff and a circuit breaker, for the idempotent upstream GET.
//!
//! Invariant: a fetch is retried only after a transport error, 429, 502, 503 or 504, at most
//! `max_attempts` times in all, never past the fetch's deadline; and while an app's circuit is
//! open no request for that app reaches the upstream, except one probe per cool-down.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::config::RetrySettings;
use crate::error::GatewayError;
use crate::upstream::UpstreamAnswer;

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

    /// Should this outcome be tried again?
    pub fn retryable(r: &Result<UpstreamAnswer, GatewayError>) -> bool {
        match r {
            Ok(a) => matches!(
                a.status,
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            Err(e) => matches!(
                e,
                GatewayError::UpstreamConnect
                    | GatewayError::UpstreamTimeout
                    | GatewayError::UpstreamProtocol
            ),
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
        .retry_after
        .as_ref()
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

/// Is this outcome a failure for the circuit breaker? Signs of an unhealthy upstream are:
/// 5xx, connection failures and timeouts. Answers the upstream chose to give (2xx, 4xx incl.
/// 429) are not, nor are faults of one run's answer (a body over the cap, a broken body),
/// which must not stop the app's other runs.
pub fn is_failure(r: &Result<UpstreamAnswer, GatewayError>) -> bool {
    match r {
        Ok(a) => a.status.is_server_error(),
        Err(e) => matches!(
            e,
            GatewayError::UpstreamConnect | GatewayError::UpstreamTimeout
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; others are refused until it reports (or a cool-down passes).
    HalfOpen {
        probe_since: Instant,
    },
}

/// A consecutive-failure circuit breaker for one upstream.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<State>,
    /// Consecutive failures that open the circuit (0 disables the breaker).
    threshold: u32,
    /// How long the circuit stays open before one probe is let through.
    cooldown: Duration,
}

/// The breaker refused the request; retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub Duration);

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> CircuitBreaker {
        CircuitBreaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold,
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// May a request go upstream now?
    pub fn admit(&self) -> Result<(), Refused> {
        if self.threshold == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(Refused(until - now)),
            State::Open { .. } => {
                *s = State::HalfOpen { probe_since: now };
                Ok(())
            }
            State::HalfOpen { probe_since } if now.duration_since(probe_since) < self.cooldown => {
                Err(Refused(self.cooldown - now.duration_since(probe_since)))
            }
            State::HalfOpen { .. } => {
                // The probe never reported; let another one through.
                *s = State::HalfOpen { probe_since: now };
                Ok(())
            }
        }
    }

    /// Reports an admitted request's outcome. Returns true when this report opened the circuit.
    pub fn record(&self, failed: bool) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let mut s = self.lock();
        let was_open = matches!(*s, State::Open { .. });
        *s = match (*s, failed) {
            (_, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, true) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (State::Open { until }, true) => State::Open { until },
            (_, true) => State::Open {
                until: Instant::now() + self.cooldown,
            },
        };
        !was_open && matches!(*s, State::Open { .. })
    }

    /// True while requests are being refused (open, or half-open with the probe out).
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KeptHeaders;
    use bytes::Bytes;

    fn answer(code: u16) -> Result<UpstreamAnswer, GatewayError> {
        Ok(UpstreamAnswer {
            status: StatusCode::from_u16(code).unwrap(),
            headers: KeptHeaders::default(),
            body: Bytes::new(),
        })
    }

    #[test]
    fn only_transient_failures_are_retried() {
        for c in [429, 502, 503, 504] {
            assert!(RetryPolicy::retryable(&answer(c)), "{c}");
        }
        for c in [200, 400, 401, 403, 404, 500] {
            assert!(!RetryPolicy::retryable(&answer(c)), "{c}");
        }
        assert!(RetryPolicy::retryable(&Err(GatewayError::UpstreamConnect)));
        assert!(!RetryPolicy::retryable(&Err(
            GatewayError::UpstreamBodyTooLarge
        )));
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

    #[test]
    fn breaker_opens_after_threshold_fails_fast_then_probes_once() {
        let b = CircuitBreaker::new(3, Duration::from_millis(100));
        for _ in 0..2 {
            assert!(b.admit().is_ok());
            assert!(!b.record(true));
        }
        assert!(b.admit().is_ok());
        assert!(b.record(true), "third failure opens");
        assert!(b.admit().is_err());
        assert!(b.is_open());
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.admit().is_ok(), "one probe after the cool-down");
        assert!(b.admit().is_err(), "only one probe");
        b.record(false);
        assert!(!b.is_open());
        assert!(b.admit().is_ok());
        // A failed probe opens it again.
        for _ in 0..3 {
            b.record(true);
        }
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.admit().is_ok());
        b.record(true);
        assert!(b.admit().is_err());
    }

    #[test]
    fn only_upstream_health_failures_count_for_the_breaker() {
        assert!(is_failure(&answer(503)));
        assert!(is_failure(&Err(GatewayError::UpstreamConnect)));
        assert!(is_failure(&Err(GatewayError::UpstreamTimeout)));
        assert!(!is_failure(&Err(GatewayError::UpstreamBodyTooLarge)));
        assert!(!is_failure(&Err(GatewayError::UpstreamProtocol)));
        assert!(!is_failure(&answer(429)));
        assert!(!is_failure(&answer(404)));
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = CircuitBreaker::new(2, Duration::from_secs(60));
        b.record(true);
        b.record(false);
        b.record(true);
        assert!(b.admit().is_ok());
    }
}

//! A consecutive-failure circuit breaker, one per app.
//!
//! Invariant: while an app's circuit is open no request for that app reaches the upstream,
//! except one probe per cool-down; the `upstream_circuit_open` gauge counts the breakers that
//! are refusing requests (open, or half-open with the probe out), and changes exactly when one
//! starts or stops refusing.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

use super::{UpstreamAnswer, UpstreamError};

/// Is this outcome a failure for the circuit breaker? Signs of an unhealthy upstream are:
/// 5xx, connection failures and timeouts (see [`UpstreamAnswer::is_failure`] and
/// [`UpstreamError::is_failure`]).
pub fn is_failure(r: &Result<UpstreamAnswer, UpstreamError>) -> bool {
    match r {
        Ok(a) => a.is_failure(),
        Err(e) => e.is_failure(),
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

impl State {
    /// Requests are being refused (or only a probe let through).
    fn refusing(self) -> bool {
        !matches!(self, State::Closed { .. })
    }
}

/// A consecutive-failure circuit breaker for one upstream.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<State>,
    /// Consecutive failures that open the circuit (0 disables the breaker).
    threshold: u32,
    /// How long the circuit stays open before one probe is let through.
    cooldown: Duration,
    /// Breakers refusing requests, over all apps: this one adds itself while it refuses.
    open_gauge: Gauge,
}

/// The breaker refused the request; retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub Duration);

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration, open_gauge: Gauge) -> CircuitBreaker {
        CircuitBreaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold,
            cooldown,
            open_gauge,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves to `next`, keeping the gauge in step (under the lock, so concurrent changes of
    /// this breaker cannot count it twice).
    fn set(&self, s: &mut MutexGuard<'_, State>, next: State) {
        match (s.refusing(), next.refusing()) {
            (false, true) => {
                self.open_gauge.inc();
            }
            (true, false) => {
                self.open_gauge.dec();
            }
            _ => {}
        }
        **s = next;
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
                self.set(&mut s, State::HalfOpen { probe_since: now });
                Ok(())
            }
            State::HalfOpen { probe_since } if now.duration_since(probe_since) < self.cooldown => {
                Err(Refused(self.cooldown - now.duration_since(probe_since)))
            }
            State::HalfOpen { .. } => {
                // The probe never reported; let another one through.
                self.set(&mut s, State::HalfOpen { probe_since: now });
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
        let next = match (*s, failed) {
            (_, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, true) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (State::Open { until }, true) => State::Open { until },
            (_, true) => State::Open {
                until: Instant::now() + self.cooldown,
            },
        };
        self.set(&mut s, next);
        !was_open && matches!(*s, State::Open { .. })
    }

    /// True while requests are being refused (open, or half-open with the probe out).
    pub fn is_open(&self) -> bool {
        self.lock().refusing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::upstream::tests::answer;
    use crate::upstream::ConnectCause;

    const CONNECT: UpstreamError = UpstreamError::Connect {
        cause: ConnectCause::Refused,
    };

    #[test]
    fn breaker_opens_after_threshold_fails_fast_then_probes_once() {
        let b = CircuitBreaker::new(3, Duration::from_millis(100), Gauge::default());
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
    fn the_gauge_counts_refusing_breakers_as_they_change() {
        let gauge = Gauge::default();
        let a = CircuitBreaker::new(1, Duration::ZERO, gauge.clone());
        let b = CircuitBreaker::new(2, Duration::from_secs(60), gauge.clone());
        assert_eq!(gauge.get(), 0);
        a.record(true);
        assert_eq!(gauge.get(), 1, "opened");
        a.record(true);
        assert_eq!(gauge.get(), 1, "a failure while open changes nothing");
        b.record(true);
        assert_eq!(gauge.get(), 1, "below its threshold");
        b.record(true);
        assert_eq!(gauge.get(), 2);
        // Open -> half-open (the cool-down is over): still refusing, still counted.
        assert!(a.admit().is_ok());
        assert!(a.is_open());
        assert_eq!(gauge.get(), 2);
        a.record(false);
        assert_eq!(gauge.get(), 1, "the probe's success closed it");
        a.record(false);
        assert_eq!(gauge.get(), 1, "closing a closed breaker changes nothing");
        let off = CircuitBreaker::new(0, Duration::ZERO, gauge.clone());
        for _ in 0..5 {
            off.record(true);
        }
        assert_eq!(gauge.get(), 1, "a disabled breaker never opens");
    }

    #[test]
    fn only_upstream_health_failures_count_for_the_breaker() {
        assert!(is_failure(&answer(503)));
        assert!(is_failure(&Err(CONNECT)));
        assert!(is_failure(&Err(UpstreamError::Timeout)));
        assert!(!is_failure(&Err(UpstreamError::BodyTooLarge)));
        assert!(!is_failure(&Err(UpstreamError::Protocol)));
        assert!(!is_failure(&answer(429)));
        assert!(!is_failure(&answer(404)));
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = CircuitBreaker::new(2, Duration::from_secs(60), Gauge::default());
        b.record(true);
        b.record(false);
        b.record(true);
        assert!(b.admit().is_ok());
    }
}

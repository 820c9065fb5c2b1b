//! `[longpoll]`: how long a client may wait for a run to change (`Prefer: wait=N`, the status
//! stream) and how many may wait at once.
//!
//! Invariant: `max_wait` is above zero and shorter than `server.max_response_time` (so a held
//! request is answered before its connection would be cut), and `max_waiters` at least one.

use std::time::Duration;

use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, HumanDuration};

/// Default [`LongPollConfig::max_wait`]: under the 100 s idle cut of common CDNs.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(60);

/// Default [`LongPollConfig::max_waiters`]: a held request costs a few kilobytes.
pub const DEFAULT_MAX_WAITERS: usize = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLongPoll {
    pub max_wait: Option<HumanDuration>,
    pub max_waiters: Option<usize>,
}

/// Held requests: how long each, how many in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongPollConfig {
    /// The longest `Prefer: wait=N` honoured; a longer one is cut to this.
    pub max_wait: Duration,
    /// Requests held at once (long-polls and status streams), gateway-wide; past it, 503.
    pub max_waiters: usize,
}

impl Default for LongPollConfig {
    fn default() -> Self {
        LongPollConfig {
            max_wait: DEFAULT_MAX_WAIT,
            max_waiters: DEFAULT_MAX_WAITERS,
        }
    }
}

impl RawLongPoll {
    /// Checks `[longpoll]`.
    pub(super) fn validate(
        self,
        ctx: &Context<'_>,
        max_response_time: Duration,
    ) -> Result<LongPollConfig, ConfigError> {
        // Unset, it stays well inside a short `server.max_response_time`.
        let max_wait = dur(self.max_wait, DEFAULT_MAX_WAIT.min(max_response_time / 2));
        if max_wait.is_zero() {
            return Err(ctx.invalid("longpoll.max_wait", "must be above zero".into()));
        }
        if max_wait >= max_response_time {
            return Err(ctx.invalid(
                "longpoll.max_wait",
                "must be shorter than server.max_response_time".into(),
            ));
        }
        let max_waiters = self.max_waiters.unwrap_or(DEFAULT_MAX_WAITERS);
        if max_waiters == 0 {
            return Err(ctx.invalid("longpoll.max_waiters", "must be at least 1".into()));
        }
        Ok(LongPollConfig {
            max_wait,
            max_waiters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSE_TIME: Duration = Duration::from_secs(300);

    #[test]
    fn defaults_and_bounds() {
        let ctx = Context::standalone();
        let c = RawLongPoll::default()
            .validate(&ctx, RESPONSE_TIME)
            .unwrap();
        assert_eq!(c, LongPollConfig::default());
        let e = RawLongPoll {
            max_wait: Some(HumanDuration(Duration::ZERO)),
            max_waiters: None,
        }
        .validate(&ctx, RESPONSE_TIME)
        .unwrap_err();
        assert!(e.to_string().contains("longpoll.max_wait"), "{e}");
        let e = RawLongPoll {
            max_wait: None,
            max_waiters: Some(0),
        }
        .validate(&ctx, RESPONSE_TIME)
        .unwrap_err();
        assert!(e.to_string().contains("longpoll.max_waiters"), "{e}");
        let e = RawLongPoll {
            max_wait: Some(HumanDuration(RESPONSE_TIME)),
            max_waiters: None,
        }
        .validate(&ctx, RESPONSE_TIME)
        .unwrap_err();
        assert!(e.to_string().contains("server.max_response_time"), "{e}");
        let short = RawLongPoll::default()
            .validate(&ctx, Duration::from_secs(10))
            .unwrap();
        assert_eq!(short.max_wait, Duration::from_secs(5));
    }
}

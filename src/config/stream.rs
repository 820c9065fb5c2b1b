//! `[stream]`: how the gateway keeps event streams (`text/event-stream` answers) alive and when
//! it gives up on a silent one.
//!
//! Invariant: the heartbeat is above zero and shorter than the idle timeout, so a stream that is
//! merely quiet is never cut for being quiet.

use std::time::Duration;

use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, HumanDuration};

/// Default [`StreamConfig::heartbeat`]: well inside the 60 s idle cut of common proxies and
/// load balancers in front of the gateway.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);

/// Default [`StreamConfig::idle_timeout`]: Dify sends `event: ping` every 10 s while a run works,
/// so five minutes of silence means the upstream is gone, not busy.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub heartbeat: Option<HumanDuration>,
    pub idle_timeout: Option<HumanDuration>,
}

/// Event streams: heartbeats towards clients and the silence allowed from the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// A comment line (`: ping`) goes to the client when nothing else was sent for this long.
    pub heartbeat: Duration,
    /// An upstream stream that sends nothing (not even Dify's `ping`) for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            heartbeat: DEFAULT_HEARTBEAT,
            idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }
}

impl RawStream {
    /// Checks `[stream]`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<StreamConfig, ConfigError> {
        let heartbeat = dur(self.heartbeat, DEFAULT_HEARTBEAT);
        let idle_timeout = dur(self.idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT);
        if heartbeat.is_zero() {
            return Err(ctx.invalid("stream.heartbeat", "must be above zero".into()));
        }
        if heartbeat >= idle_timeout {
            return Err(ctx.invalid(
                "stream.heartbeat",
                "must be shorter than stream.idle_timeout".into(),
            ));
        }
        Ok(StreamConfig {
            heartbeat,
            idle_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_order() {
        let ctx = Context::standalone();
        let c = RawStream::default().validate(&ctx).unwrap();
        assert_eq!(c, StreamConfig::default());
        let e = RawStream {
            heartbeat: Some(HumanDuration(Duration::from_secs(20))),
            idle_timeout: Some(HumanDuration(Duration::from_secs(10))),
        }
        .validate(&ctx)
        .unwrap_err();
        assert!(e.to_string().contains("stream.heartbeat"), "{e}");
        let e = RawStream {
            heartbeat: Some(HumanDuration(Duration::ZERO)),
            idle_timeout: None,
        }
        .validate(&ctx)
        .unwrap_err();
        assert!(e.to_string().contains("above zero"), "{e}");
    }
}

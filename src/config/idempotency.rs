//! `[idempotency]`: how long a run start's `Idempotency-Key` is remembered, and how much of
//! this replica's memory its answers may take.
//!
//! Invariant: `ttl` is above zero and `max_bytes` at least [`MIN_MAX_BYTES`]; the answers kept
//! in memory never weigh more than `max_bytes` (with the shared tier they live in Redis, and
//! memory holds them only while Redis cannot be asked).

use std::time::Duration;

use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, HumanDuration};

/// Default [`IdempotencyConfig::ttl`]: a day, as the clients that send the header expect.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Default [`IdempotencyConfig::max_bytes`].
pub const DEFAULT_IDEMPOTENCY_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Smallest accepted [`IdempotencyConfig::max_bytes`].
pub const MIN_MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdempotency {
    pub ttl: Option<HumanDuration>,
    pub max_bytes: Option<u64>,
}

/// Run starts made idempotent by their `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// How long a key and the answer it got are remembered.
    pub ttl: Duration,
    /// Most bytes of remembered answers held in this replica's memory.
    pub max_bytes: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            ttl: DEFAULT_IDEMPOTENCY_TTL,
            max_bytes: DEFAULT_IDEMPOTENCY_MAX_BYTES,
        }
    }
}

impl RawIdempotency {
    /// Checks `[idempotency]`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<IdempotencyConfig, ConfigError> {
        let ttl = dur(self.ttl, DEFAULT_IDEMPOTENCY_TTL);
        if ttl.is_zero() {
            return Err(ctx.invalid("idempotency.ttl", "must be above zero".into()));
        }
        let max_bytes = self.max_bytes.unwrap_or(DEFAULT_IDEMPOTENCY_MAX_BYTES);
        if max_bytes < MIN_MAX_BYTES {
            return Err(ctx.invalid(
                "idempotency.max_bytes",
                format!("{max_bytes} is below the minimum of {MIN_MAX_BYTES} (1 MiB)"),
            ));
        }
        Ok(IdempotencyConfig { ttl, max_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, RawConfig};

    fn key_env(name: &str) -> Option<String> {
        (name == crate::config::API_KEY_ENV).then(|| "app-k".to_owned())
    }

    #[test]
    fn defaults_and_bounds() {
        let c = RawConfig::default()
            .validate(&Overrides::default(), None, &key_env)
            .unwrap();
        assert_eq!(c.idempotency, IdempotencyConfig::default());
        for bad in [
            "[idempotency]\nttl = \"0s\"\n",
            "[idempotency]\nmax_bytes = 10\n",
        ] {
            let e = RawConfig::from_toml(bad)
                .unwrap()
                .validate(&Overrides::default(), None, &key_env)
                .unwrap_err();
            assert!(e.to_string().contains("idempotency."), "{e}");
        }
    }
}

//! `[ownership]`: how many records of who created which run, task and file are kept, and for how
//! long.
//!
//! Invariant: both bounds are above zero, so the records can never grow without limit in memory
//! nor outlive their expiry in the shared tier.

use std::time::Duration;

use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, HumanDuration};

/// Default [`OwnershipConfig::max_records`]: about 100 bytes each in memory, so some 100 MB at
/// the bound.
pub const DEFAULT_MAX_RECORDS: u64 = 1_000_000;

/// Default [`OwnershipConfig::ttl`]: longer than any run, and than the time a team usually
/// looks back at a run's detail.
pub const DEFAULT_OWNERSHIP_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default [`OwnershipConfig::unknown_ttl`]: a run read often costs one shared-tier lookup a
/// minute per replica, not one per read.
pub const DEFAULT_UNKNOWN_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOwnership {
    pub max_records: Option<u64>,
    pub ttl: Option<HumanDuration>,
    pub unknown_ttl: Option<HumanDuration>,
}

/// Bounds of the ownership records (see `crate::ownership`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipConfig {
    /// Most records held in memory; past it the least recently used go first (the shared tier,
    /// when configured, still holds them).
    pub max_records: u64,
    /// How long a record lasts, in memory and in the shared tier; after it the id is unknown
    /// again, readable by any client of its app.
    pub ttl: Duration,
    /// How long a replica remembers that the shared tier holds no record of an id, before asking
    /// again; `0s` asks on every check. Sound because a record is written before its id reaches
    /// any client (so "no record" does not turn into a record later); the bound limits the harm
    /// should one ever be written late.
    pub unknown_ttl: Duration,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig {
            max_records: DEFAULT_MAX_RECORDS,
            ttl: DEFAULT_OWNERSHIP_TTL,
            unknown_ttl: DEFAULT_UNKNOWN_TTL,
        }
    }
}

impl RawOwnership {
    /// Checks `[ownership]`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<OwnershipConfig, ConfigError> {
        let max_records = self.max_records.unwrap_or(DEFAULT_MAX_RECORDS);
        let ttl = dur(self.ttl, DEFAULT_OWNERSHIP_TTL);
        if max_records == 0 {
            return Err(ctx.invalid("ownership.max_records", "must be at least 1".into()));
        }
        if ttl < Duration::from_millis(1) {
            return Err(ctx.invalid("ownership.ttl", "must be at least 1ms".into()));
        }
        let unknown_ttl = dur(self.unknown_ttl, DEFAULT_UNKNOWN_TTL);
        if unknown_ttl > ttl {
            return Err(ctx.invalid(
                "ownership.unknown_ttl",
                "must not exceed ownership.ttl".into(),
            ));
        }
        Ok(OwnershipConfig {
            max_records,
            ttl,
            unknown_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let ctx = Context::standalone();
        assert_eq!(
            RawOwnership::default().validate(&ctx).unwrap(),
            OwnershipConfig::default()
        );
        let e = RawOwnership {
            max_records: Some(0),
            ..RawOwnership::default()
        }
        .validate(&ctx)
        .unwrap_err();
        assert!(e.to_string().contains("ownership.max_records"), "{e}");
        let e = RawOwnership {
            ttl: Some(HumanDuration(Duration::ZERO)),
            ..RawOwnership::default()
        }
        .validate(&ctx)
        .unwrap_err();
        assert!(e.to_string().contains("ownership.ttl"), "{e}");
        let e = RawOwnership {
            ttl: Some(HumanDuration(Duration::from_secs(10))),
            ..RawOwnership::default()
        }
        .validate(&ctx)
        .unwrap_err();
        assert!(e.to_string().contains("ownership.unknown_ttl"), "{e}");
    }
}

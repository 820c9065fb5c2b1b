//! `[cache]`: how big the cache may grow and how long each kind of answer is reused.
//!
//! Invariant: only statuses Dify never moves a run out of can be kept without expiry.

use std::time::Duration;

use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, HumanDuration};

/// Statuses Dify never moves a run out of.
pub const DEFAULT_TERMINAL_STATUSES: [&str; 4] =
    ["succeeded", "failed", "stopped", "partial-succeeded"];

/// Statuses Dify gives a run that can still change.
pub const NON_TERMINAL_STATUSES: [&str; 3] = ["running", "paused", "scheduled"];

/// Default [`CacheConfig::max_bytes`]: thousands of typical runs, while the whole process stays
/// within the memory of a small container.
pub(crate) const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Smallest accepted [`CacheConfig::max_bytes`]: less holds only a handful of runs, and is more
/// likely a unit mistake (bytes written as MiB) than a wish.
pub(crate) const MIN_MAX_BYTES: u64 = 1024 * 1024;

/// Default [`CacheConfig::running_ttl`]: a client polling a running run several times a second
/// is answered from the cache, and still sees its progress within a second.
pub(crate) const DEFAULT_RUNNING_TTL: Duration = Duration::from_secs(1);

/// Default [`CacheConfig::not_found_ttl`]: absorbs a client retrying a wrong id in a loop, yet a
/// run that was just started (and not yet visible) is found soon.
pub(crate) const DEFAULT_NOT_FOUND_TTL: Duration = Duration::from_secs(2);

/// Default [`CacheConfig::stale_if_error`]: rides out an upstream restart or a circuit's
/// cool-down with the last known progress instead of an error.
pub(crate) const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(30);

/// Default [`CacheConfig::app_meta_ttl`]: an app's settings change when someone republishes
/// it; a minute is soon enough to see that, and saves every SDK's start-up requests.
pub const DEFAULT_APP_META_TTL: Duration = Duration::from_secs(60);

/// Default [`CacheConfig::not_found_grace`]: Dify may write a new run's row a moment after
/// handing out its id.
pub const DEFAULT_NOT_FOUND_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub max_bytes: Option<u64>,
    pub terminal_statuses: Option<Vec<String>>,
    pub terminal_max_age: Option<HumanDuration>,
    pub running_ttl: Option<HumanDuration>,
    pub app_meta_ttl: Option<HumanDuration>,
    pub not_found_ttl: Option<HumanDuration>,
    pub not_found_grace: Option<HumanDuration>,
    pub stale_if_error: Option<HumanDuration>,
}

/// How the cache decides and how big it may grow.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Upper bound of the cache's weight: the bytes of bodies and headers plus per-entry overhead.
    /// Up to an eighth of max_bytes is set aside for running and not-found answers; terminal
    /// runs get the rest.
    pub max_bytes: u64,
    /// Run statuses kept without expiry.
    pub terminal_statuses: Vec<String>,
    /// When set, terminal entries expire after this long (runs can be deleted or keys revoked).
    pub terminal_max_age: Option<Duration>,
    /// How long a non-terminal answer is reused; zero means never kept (still coalesced).
    pub running_ttl: Duration,
    /// How long an app's `/info`, `/parameters`, `/meta` and `/site` answers are kept.
    pub app_meta_ttl: Duration,
    /// How long an upstream 404 is reused; zero disables.
    pub not_found_ttl: Duration,
    /// For a run the gateway saw start, how long after the start an upstream 404 is taken for
    /// a row not yet written: retried shortly, never kept. Zero disables.
    pub not_found_grace: Duration,
    /// How long past its TTL a running entry is still served (as `X-Cache: STALE`) when a
    /// refresh fails; zero disables.
    pub stale_if_error: Duration,
}

impl RawCache {
    /// Checks `[cache]`; a terminal status must be one of Dify's.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<CacheConfig, ConfigError> {
        let max_bytes = self.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
        if max_bytes < MIN_MAX_BYTES {
            return Err(ctx.invalid(
                "cache.max_bytes",
                format!("{max_bytes} is below the minimum of {MIN_MAX_BYTES} (1 MiB)"),
            ));
        }
        let terminal_statuses = self.terminal_statuses.unwrap_or_else(|| {
            DEFAULT_TERMINAL_STATUSES
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        for (i, s) in terminal_statuses.iter().enumerate() {
            check_terminal_status(s).map_err(|m| {
                ctx.invalid_at(
                    "cache.terminal_statuses",
                    &format!("cache.terminal_statuses[{i}]"),
                    m,
                )
            })?;
        }
        let terminal_max_age = self.terminal_max_age.map(|d| d.0);
        if terminal_max_age.is_some_and(|d| d.is_zero()) {
            return Err(ctx.invalid(
                "cache.terminal_max_age",
                "must be above zero (leave it out for no expiry)".into(),
            ));
        }
        Ok(CacheConfig {
            max_bytes,
            terminal_statuses,
            terminal_max_age,
            running_ttl: dur(self.running_ttl, DEFAULT_RUNNING_TTL),
            app_meta_ttl: dur(self.app_meta_ttl, DEFAULT_APP_META_TTL),
            not_found_ttl: dur(self.not_found_ttl, DEFAULT_NOT_FOUND_TTL),
            not_found_grace: dur(self.not_found_grace, DEFAULT_NOT_FOUND_GRACE),
            stale_if_error: dur(self.stale_if_error, DEFAULT_STALE_IF_ERROR),
        })
    }
}

/// A status may be listed as terminal only when Dify never moves a run out of it.
fn check_terminal_status(s: &str) -> Result<(), String> {
    if DEFAULT_TERMINAL_STATUSES.contains(&s) {
        return Ok(());
    }
    let terminal = DEFAULT_TERMINAL_STATUSES.join(", ");
    if NON_TERMINAL_STATUSES.contains(&s) {
        return Err(format!(
            "`{s}` is not terminal: a {s} run changes again, so caching it for good would serve \
             it stale forever; the terminal statuses are {terminal}"
        ));
    }
    Err(format!(
        "`{s}` is not a Dify run status; the terminal statuses are {terminal} (the others, {}, \
         are not terminal)",
        NON_TERMINAL_STATUSES.join(", ")
    ))
}

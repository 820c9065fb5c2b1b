//! `[upstream]`: how Dify is reached — base URL, timeouts, connection pool, the cap on fetches in
//! flight and its fair shares, retries and the circuit breaker.
//!
//! Invariant: an [`UpstreamConfig`] holds plain settings only: its timeouts are above zero, its
//! shares are fractions in (0, 1], and the retry policy and breaker built from it live with the
//! code that fetches.

use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, parse_base_url, HumanDuration};

/// Dify's cloud API base, the default upstream.
pub const DEFAULT_UPSTREAM: &str = "https://api.dify.ai/v1";

/// Default `upstream.max_share_per_app`: with several apps, one app's fetches may hold up to
/// three quarters of the upstream slots, so the others always find a quarter free.
pub const DEFAULT_MAX_SHARE_PER_APP: f64 = 0.75;

/// Default `upstream.max_share_per_client`: with several clients, one client's fetches may hold
/// up to half of the upstream slots, so one flooding client cannot starve the others.
pub const DEFAULT_MAX_SHARE_PER_CLIENT: f64 = 0.5;

/// Default [`UpstreamConfig::connect_timeout`]: a reachable Dify completes TCP and TLS in well
/// under a second, even across regions; an unreachable one is given up long before the fetch's
/// own deadline.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default [`UpstreamConfig::total_timeout`]: ample for reading one run, even a large one from a
/// loaded Dify, and shorter than the 60 s many clients and load balancers wait, so a client gets
/// the gateway's 504 rather than its own timeout.
pub(crate) const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`UpstreamConfig::run_timeout`]: a started run (blocking answer or event stream) is
/// read for at most this long, even when its client has left; long enough for workflows of many
/// minutes, bounded so a stuck upstream cannot hold a connection for ever.
pub(crate) const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Default [`UpstreamConfig::max_body_bytes`]: far above a run's usual inputs and outputs, while
/// one answer cannot take a large part of the cache or of memory.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Largest accepted [`UpstreamConfig::max_body_bytes`]: a kept body's length is held in 32 bits
/// (the cache's entry weight, the shared tier's encoding).
pub(crate) const MAX_MAX_BODY_BYTES: usize = u32::MAX as usize;

/// Default [`UpstreamConfig::pool_idle_timeout`]: hyper's own default, kept: a steady trickle of
/// misses reuses warm connections, and idle ones are still given back within two minutes.
pub(crate) const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Default [`UpstreamConfig::pool_max_idle_per_host`]: as many idle connections as
/// [`DEFAULT_MAX_CONCURRENT`] fetches use, so a burst after a lull opens none anew.
pub(crate) const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 64;

/// Default [`UpstreamConfig::max_concurrent`]: enough fetches in flight for a busy gateway of
/// mostly cache hits, few enough that a flood of misses does not overwhelm a self-hosted Dify.
pub(crate) const DEFAULT_MAX_CONCURRENT: usize = 64;

/// Default [`UpstreamConfig::queue_timeout`]: a slot frees within a fetch's usual time; a fetch
/// that waited a second is better told 503 with `Retry-After` than left hanging.
pub(crate) const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

/// Default [`RetrySettings::max_attempts`]: two retries ride out a dropped connection or a brief
/// 502/503 from a restarting Dify; an upstream that is really down is soon held off by the
/// circuit breaker instead.
pub(crate) const DEFAULT_RETRY_ATTEMPTS: u32 = 3;

/// Accepted [`RetrySettings::max_attempts`]: 1 turns retries off; more than 10 only multiplies
/// load on a failing upstream within one fetch's deadline.
pub(crate) const RETRY_ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=10;

/// Default [`RetrySettings::base_delay`]: long enough for a connection reset to clear, short
/// against the fetch's deadline.
pub(crate) const DEFAULT_RETRY_BASE_DELAY: Duration = Duration::from_millis(100);

/// Default [`RetrySettings::max_delay`]: a client waiting on a retried fetch never sits idle
/// longer than a second per pause.
pub(crate) const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(1);

/// Default [`RetrySettings::retry_after_cap`]: a short `Retry-After` (a brief rate limit) is
/// worth waiting for; a longer one is the client's to decide.
pub(crate) const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(5);

/// Default [`UpstreamConfig::circuit_failure_threshold`]: five failures in a row are an outage,
/// not bad luck.
pub(crate) const DEFAULT_CIRCUIT_FAILURE_THRESHOLD: u32 = 5;

/// Default [`UpstreamConfig::circuit_cooldown`]: a restarting Dify is usually back within
/// seconds; one probe every ten costs it nothing.
pub(crate) const DEFAULT_CIRCUIT_COOLDOWN: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub base_url: Option<String>,
    /// The `default` app's key file; read by the apps section, not here.
    pub api_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<HumanDuration>,
    pub total_timeout: Option<HumanDuration>,
    pub run_timeout: Option<HumanDuration>,
    pub max_body_bytes: Option<usize>,
    pub pool_idle_timeout: Option<HumanDuration>,
    pub pool_max_idle_per_host: Option<usize>,
    pub max_concurrent: Option<usize>,
    pub queue_timeout: Option<HumanDuration>,
    pub max_share_per_app: Option<f64>,
    pub max_share_per_client: Option<f64>,
    pub retry_attempts: Option<u32>,
    pub retry_base_delay: Option<HumanDuration>,
    pub retry_max_delay: Option<HumanDuration>,
    pub retry_after_cap: Option<HumanDuration>,
    pub circuit_failure_threshold: Option<u32>,
    pub circuit_cooldown: Option<HumanDuration>,
}

/// How the gateway reaches Dify.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL of the default app, e.g. `https://api.dify.ai/v1`.
    pub base_url: Uri,
    /// Extra PEM CA certificates trusted beside the built-in web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Time allowed to open a TCP connection (and finish TLS) to the upstream.
    pub connect_timeout: Duration,
    /// Time allowed for one upstream exchange, head and body.
    pub total_timeout: Duration,
    /// Time allowed for a whole passed-through exchange that starts or follows a run (a
    /// blocking answer, an event stream), from request to last byte; the gateway keeps reading a
    /// run's stream after its client left until the end or this bound.
    pub run_timeout: Duration,
    /// Largest upstream body accepted; larger answers become 502.
    pub max_body_bytes: usize,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    /// Upstream requests in flight at once, over all apps, so a flood of misses cannot
    /// overwhelm Dify.
    pub max_concurrent: usize,
    /// A fetch waits this long for an upstream slot before its requests get 503.
    pub queue_timeout: Duration,
    /// Fraction of `max_concurrent` (in (0, 1], rounded up to whole slots) one app's fetches may
    /// hold at once when several apps are configured, so one app cannot starve the others.
    pub max_share_per_app: f64,
    /// Fraction of `max_concurrent` (in (0, 1], rounded up to whole slots) one client's fetches
    /// may hold at once when several clients are configured; a fetch counts against the client
    /// whose request started it.
    pub max_share_per_client: f64,
    /// Retries of the idempotent GET after transient failures.
    pub retry: RetrySettings,
    /// Consecutive upstream failures (connect errors, timeouts, 5xx) that open an app's circuit;
    /// 0 disables the breaker.
    pub circuit_failure_threshold: u32,
    /// How long an open circuit fails fast before one probe request is let through.
    pub circuit_cooldown: Duration,
}

/// When and how often a fetch is tried again: the settings the fetching code builds its retry
/// policy from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Attempts in all, the first included (1 = no retries).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles each time, with full jitter.
    pub base_delay: Duration,
    /// Upper bound of one backoff.
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for (the error goes to the client).
    pub retry_after_cap: Duration,
}

impl RawUpstream {
    /// Checks `[upstream]` but its `api_key_file` (see the apps section); `--upstream` (or its
    /// variable) wins over `upstream.base_url`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<UpstreamConfig, ConfigError> {
        let base_url = ctx.overridable(
            |o| (&o.upstream, o.origins.upstream),
            self.base_url,
            "upstream.base_url",
            DEFAULT_UPSTREAM,
            parse_base_url,
        )?;
        let connect_timeout = dur(self.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        let total_timeout = dur(self.total_timeout, DEFAULT_TOTAL_TIMEOUT);
        if connect_timeout.is_zero() {
            return Err(ctx.invalid("upstream.connect_timeout", "must be above zero".into()));
        }
        if total_timeout.is_zero() {
            return Err(ctx.invalid("upstream.total_timeout", "must be above zero".into()));
        }
        let run_timeout = dur(self.run_timeout, DEFAULT_RUN_TIMEOUT);
        if run_timeout.is_zero() {
            return Err(ctx.invalid("upstream.run_timeout", "must be above zero".into()));
        }
        let max_body_bytes = self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 || max_body_bytes > MAX_MAX_BODY_BYTES {
            return Err(ctx.invalid(
                "upstream.max_body_bytes",
                format!("{max_body_bytes} is outside 1..={MAX_MAX_BODY_BYTES}"),
            ));
        }
        let max_concurrent = self.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
        if max_concurrent == 0 {
            return Err(ctx.invalid("upstream.max_concurrent", "must be at least 1".into()));
        }
        let share = |key: &'static str, v: Option<f64>, default: f64| match v {
            None => Ok(default),
            Some(f) if f > 0.0 && f <= 1.0 => Ok(f),
            Some(f) => Err(ctx.invalid(
                key,
                format!("{f} is outside (0, 1]: it is a fraction of upstream.max_concurrent"),
            )),
        };
        let max_share_per_app = share(
            "upstream.max_share_per_app",
            self.max_share_per_app,
            DEFAULT_MAX_SHARE_PER_APP,
        )?;
        let max_share_per_client = share(
            "upstream.max_share_per_client",
            self.max_share_per_client,
            DEFAULT_MAX_SHARE_PER_CLIENT,
        )?;
        let retry = RetrySettings {
            max_attempts: self.retry_attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            base_delay: dur(self.retry_base_delay, DEFAULT_RETRY_BASE_DELAY),
            max_delay: dur(self.retry_max_delay, DEFAULT_RETRY_MAX_DELAY),
            retry_after_cap: dur(self.retry_after_cap, DEFAULT_RETRY_AFTER_CAP),
        };
        if !RETRY_ATTEMPTS.contains(&retry.max_attempts) {
            return Err(ctx.invalid(
                "upstream.retry_attempts",
                format!(
                    "must be within {}..={} (1 = no retries)",
                    RETRY_ATTEMPTS.start(),
                    RETRY_ATTEMPTS.end()
                ),
            ));
        }
        let circuit_cooldown = dur(self.circuit_cooldown, DEFAULT_CIRCUIT_COOLDOWN);
        if circuit_cooldown.is_zero() {
            return Err(ctx.invalid("upstream.circuit_cooldown", "must be above zero".into()));
        }
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                return Err(ctx.invalid(
                    "upstream.ca_file",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        Ok(UpstreamConfig {
            base_url,
            ca_file: self.ca_file,
            connect_timeout,
            total_timeout,
            run_timeout,
            max_body_bytes,
            pool_idle_timeout: dur(self.pool_idle_timeout, DEFAULT_POOL_IDLE_TIMEOUT),
            pool_max_idle_per_host: self
                .pool_max_idle_per_host
                .unwrap_or(DEFAULT_POOL_MAX_IDLE_PER_HOST),
            max_concurrent,
            queue_timeout: dur(self.queue_timeout, DEFAULT_QUEUE_TIMEOUT),
            max_share_per_app,
            max_share_per_client,
            retry,
            circuit_failure_threshold: self
                .circuit_failure_threshold
                .unwrap_or(DEFAULT_CIRCUIT_FAILURE_THRESHOLD),
            circuit_cooldown,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::key_env;
    use crate::config::{Overrides, RawConfig};

    #[test]
    fn upstream_shares_are_fractions_of_the_cap() {
        let c = RawConfig::default()
            .validate(&Overrides::default(), None, &key_env)
            .unwrap();
        assert_eq!(c.upstream.max_share_per_app, DEFAULT_MAX_SHARE_PER_APP);
        assert_eq!(
            c.upstream.max_share_per_client,
            DEFAULT_MAX_SHARE_PER_CLIENT
        );
        let ok = RawConfig::from_toml(
            "[upstream]\nmax_share_per_client = 1\nmax_share_per_app = 0.25\n",
        )
        .unwrap()
        .validate(&Overrides::default(), None, &key_env)
        .unwrap();
        assert_eq!(ok.upstream.max_share_per_client, 1.0);
        assert_eq!(ok.upstream.max_share_per_app, 0.25);
        for (key, bad) in [
            ("max_share_per_client", "0"),
            ("max_share_per_client", "1.5"),
            ("max_share_per_app", "-0.5"),
            ("max_share_per_app", "nan"),
        ] {
            let e = RawConfig::from_toml(&format!("[upstream]\n{key} = {bad}\n"))
                .unwrap()
                .validate(&Overrides::default(), Some(Path::new("gw.toml")), &key_env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("upstream.{key}")) && e.contains("gw.toml"),
                "{e}"
            );
        }
    }
}

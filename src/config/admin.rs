//! `[admin]`: the operational listener — metrics, readiness, cache administration — and its
//! token and probes.
//!
//! Invariant: an admin token, when set, is long enough not to be guessed and is held as a
//! secret; readiness never asks for an answer fresher than the probes can give.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, parse_listen, HumanDuration};

/// Default [`AdminConfig::max_connections`]: scrapers, probes and operators, not clients.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

/// Name of the environment variable that may hold the admin token.
pub const ADMIN_TOKEN_ENV: &str = "DIFY_GATEWAY_ADMIN_TOKEN";

/// The default admin listen address: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Shortest admin token accepted: 16 characters of a generated token are beyond guessing, and a
/// shorter one is more likely a placeholder left in place.
pub(crate) const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Default [`AdminConfig::probe_interval`]: a dead upstream or a revoked key shows in `/readyz`
/// and the key-health gauge within seconds, for one cheap request per app each time.
pub(crate) const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(15);

/// Shortest [`AdminConfig::probe_interval`]: probing faster only adds load on Dify.
pub(crate) const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Default [`AdminConfig::ready_max_age`]: four probe intervals, so one or two lost probes do
/// not take a replica out of its load balancer.
pub(crate) const DEFAULT_READY_MAX_AGE: Duration = Duration::from_secs(60);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub max_connections: Option<usize>,
    pub token_file: Option<PathBuf>,
    pub probe_interval: Option<HumanDuration>,
    pub ready_max_age: Option<HumanDuration>,
}

/// The operational side: metrics, readiness, cache administration.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where the admin listener binds; keep it off the public network.
    pub listen: SocketAddr,
    /// Connections the admin listener serves at once; it has the public listener's deadlines, and
    /// a full admin listener makes room the same way, so `/healthz` keeps answering.
    pub max_connections: usize,
    /// When set, every admin route but `/healthz` and `/readyz` requires
    /// `Authorization: Bearer <token>`.
    pub token: Option<SecretString>,
    /// How often each app's upstream is probed for readiness and key health.
    pub probe_interval: Duration,
    /// `/readyz` fails when no app's upstream answered a probe within this long.
    pub ready_max_age: Duration,
}

impl RawAdmin {
    /// Checks `[admin]`; `--admin-listen` (or its variable) wins over `admin.listen`, and the
    /// token comes from `admin.token_file`, else `DIFY_GATEWAY_ADMIN_TOKEN`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<AdminConfig, ConfigError> {
        let listen = ctx.overridable(
            |o| (&o.admin_listen, o.origins.admin_listen),
            self.listen,
            "admin.listen",
            DEFAULT_ADMIN_LISTEN,
            parse_listen,
        )?;
        let token = match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ctx.invalid(
                        "admin.token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(text.trim().to_owned())
            }
            None => ctx.env(ADMIN_TOKEN_ENV).map(|t| t.trim().to_owned()),
        };
        if token
            .as_ref()
            .is_some_and(|t| t.len() < MIN_ADMIN_TOKEN_LEN)
        {
            return Err(ctx.invalid(
                if self.token_file.is_some() {
                    "admin.token_file"
                } else {
                    "admin.token (DIFY_GATEWAY_ADMIN_TOKEN)"
                },
                format!("the admin token must be at least {MIN_ADMIN_TOKEN_LEN} characters"),
            ));
        }
        let probe_interval = dur(self.probe_interval, DEFAULT_PROBE_INTERVAL);
        if probe_interval < MIN_PROBE_INTERVAL {
            return Err(ctx.invalid("admin.probe_interval", "must be at least 1s".into()));
        }
        let ready_max_age = dur(self.ready_max_age, DEFAULT_READY_MAX_AGE);
        if ready_max_age < probe_interval {
            return Err(ctx.invalid(
                "admin.ready_max_age",
                "must be at least admin.probe_interval".into(),
            ));
        }
        let max_connections = self
            .max_connections
            .unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ctx.invalid("admin.max_connections", "must be at least 1".into()));
        }
        Ok(AdminConfig {
            listen,
            max_connections,
            token: token.map(SecretString::from),
            probe_interval,
            ready_max_age,
        })
    }
}

//! `[[clients]]`: who may use the gateway, how each proves it, which app it reaches and at what
//! rate.
//!
//! Invariant: names and token digests are unique, every client names a configured app, and a
//! token itself is never stored — only its SHA-256.

use std::num::{NonZeroU32, NonZeroU64};

use serde::Deserialize;

use super::apps::AppConfig;
use super::context::{ConfigError, Context};
use super::values::check_name;
use crate::rewrite::UserPrefix;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub name: String,
    pub token_sha256: String,
    pub app: String,
    pub rate_per_second: Option<u32>,
    pub burst: Option<u32>,
    pub runs_per_minute: Option<u32>,
    pub max_open_streams: Option<u32>,
    pub read_app_logs: Option<bool>,
    pub max_waiters: Option<usize>,
    pub user_prefix: Option<String>,
    pub quota_runs_per_day: Option<u64>,
    pub quota_tokens_per_day: Option<u64>,
    pub webhook_url: Option<String>,
    pub webhook_secret_env: Option<String>,
    pub webhook_secret_file: Option<std::path::PathBuf>,
}

/// One client: who it is, how it proves it, what it may use.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    /// SHA-256 of the client's bearer token; the token itself is never stored.
    pub token_sha256: [u8; 32],
    /// Index into [`Config::apps`](super::Config::apps).
    pub app: usize,
    pub rate: Option<RateLimit>,
    /// Its limits on starting runs, apart from `rate` (which counts every request).
    pub starts: StartLimits,
    /// May read `/workflows/logs`, which lists every client's runs of the app, while the app
    /// isolates clients. Default false.
    pub read_app_logs: bool,
    /// Requests of this client held at once (long-polls, status streams); past it, 429.
    pub max_waiters: Option<usize>,
    /// Put before every end-user id the client sends (`user`), so its users are its own in Dify.
    pub user_prefix: Option<UserPrefix>,
    /// Its daily quotas (UTC days), enforced on run starts.
    pub quota: Quota,
    /// Where its finished runs are announced (see [`crate::webhooks`]).
    pub webhook: Option<super::webhooks::WebhookTarget>,
}

/// A client's daily quotas (UTC days); `None` is unlimited. See [`crate::usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Runs it may start per day, counted when they finish.
    pub runs_per_day: Option<NonZeroU64>,
    /// Tokens its runs may use per day (Dify's `total_tokens`).
    pub tokens_per_day: Option<NonZeroU64>,
}

/// A client's limits on starting runs; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartLimits {
    /// Runs it may start per minute (a token bucket of this size, refilled evenly).
    pub runs_per_minute: Option<NonZeroU32>,
    /// Streaming runs it may follow at once; a stream it has left no longer counts.
    pub max_open_streams: Option<NonZeroU32>,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// The clients allowed in; empty means the gateway runs open, which is refused when several
/// apps leave a request no other way to its app.
pub(super) fn validate(
    raw: Vec<RawClient>,
    apps: &[AppConfig],
    ctx: &Context<'_>,
) -> Result<Vec<ClientConfig>, ConfigError> {
    let mut clients: Vec<ClientConfig> = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let client = c.validate(i, &clients, apps, ctx)?;
        clients.push(client);
    }
    if clients.is_empty() && apps.len() > 1 {
        return Err(ctx.invalid(
            "clients",
            "several apps are configured but no clients: each request must map to an app through its client".into(),
        ));
    }
    Ok(clients)
}

impl RawClient {
    /// Checks entry `i` of `[[clients]]` against the entries before it and the apps.
    fn validate(
        self,
        i: usize,
        earlier: &[ClientConfig],
        apps: &[AppConfig],
        ctx: &Context<'_>,
    ) -> Result<ClientConfig, ConfigError> {
        // Errors point at this client's entry in the file.
        let invalid = |key: &'static str, message: String| ctx.invalid_entry(key, i, message);
        let name = &self.name;
        check_name(name).map_err(|m| invalid("clients.name", m))?;
        if earlier.iter().any(|x| &x.name == name) {
            return Err(invalid(
                "clients.name",
                format!("`{name}` is defined twice"),
            ));
        }
        let token_sha256 = parse_sha256(&self.token_sha256).ok_or_else(|| {
            invalid(
                "clients.token_sha256",
                format!("client `{name}`: expected 64 hex digits"),
            )
        })?;
        if earlier.iter().any(|x| x.token_sha256 == token_sha256) {
            return Err(invalid(
                "clients.token_sha256",
                format!("client `{name}` shares its token with another client"),
            ));
        }
        let app = apps
            .iter()
            .position(|a| a.name == self.app)
            .ok_or_else(|| {
                invalid(
                    "clients.app",
                    format!("client `{name}`: no app named `{}`", self.app),
                )
            })?;
        let rate = match (self.rate_per_second, self.burst) {
            (None, None) => None,
            (Some(r), b) => {
                let per_second = NonZeroU32::new(r).ok_or_else(|| {
                    invalid(
                        "clients.rate_per_second",
                        format!("client `{name}`: must be at least 1"),
                    )
                })?;
                let burst = NonZeroU32::new(b.unwrap_or(r)).ok_or_else(|| {
                    invalid(
                        "clients.burst",
                        format!("client `{name}`: must be at least 1"),
                    )
                })?;
                Some(RateLimit { per_second, burst })
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "clients.burst",
                    format!("client `{name}`: burst needs rate_per_second"),
                ))
            }
        };
        let at_least_one = |key: &'static str, v: Option<u32>| {
            v.map(|n| {
                NonZeroU32::new(n)
                    .ok_or_else(|| invalid(key, format!("client `{name}`: must be at least 1")))
            })
            .transpose()
        };
        let starts = StartLimits {
            runs_per_minute: at_least_one("clients.runs_per_minute", self.runs_per_minute)?,
            max_open_streams: at_least_one("clients.max_open_streams", self.max_open_streams)?,
        };
        if self.max_waiters == Some(0) {
            return Err(invalid(
                "clients.max_waiters",
                format!("client `{name}`: must be at least 1"),
            ));
        }
        let user_prefix = self
            .user_prefix
            .map(|p| {
                UserPrefix::new(&p)
                    .map_err(|e| invalid("clients.user_prefix", format!("client `{name}`: {e}")))
            })
            .transpose()?;
        let at_least_one_64 = |key: &'static str, v: Option<u64>| {
            v.map(|n| {
                NonZeroU64::new(n)
                    .ok_or_else(|| invalid(key, format!("client `{name}`: must be at least 1")))
            })
            .transpose()
        };
        let quota = Quota {
            runs_per_day: at_least_one_64("clients.quota_runs_per_day", self.quota_runs_per_day)?,
            tokens_per_day: at_least_one_64(
                "clients.quota_tokens_per_day",
                self.quota_tokens_per_day,
            )?,
        };
        let webhook = super::webhooks::target(
            self.webhook_url,
            self.webhook_secret_env,
            self.webhook_secret_file,
            ctx,
            &|key, m| invalid(key, format!("client `{name}`: {m}")),
        )?;
        Ok(ClientConfig {
            webhook,
            name: self.name,
            token_sha256,
            app,
            rate,
            starts,
            read_app_logs: self.read_app_logs.unwrap_or(false),
            max_waiters: self.max_waiters,
            user_prefix,
            quota,
        })
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

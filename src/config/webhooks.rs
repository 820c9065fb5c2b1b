//! `[webhooks]` and each client's webhook (`[[clients]] webhook_url`, `webhook_secret_env` /
//! `webhook_secret_file`): where a finished run is announced, how it is signed, how delivery
//! is retried.
//!
//! Invariant: a client's webhook has an `http`/`https` URL with a host and a secret of at least
//! [`MIN_SECRET_LEN`] visible characters, read from the environment or a file — never from the
//! config file or a command line — and no error names the secret; delivery settings are above
//! zero and the backoff's cap is at least its base.

use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use secrecy::SecretString;
use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, HumanDuration};

/// Default [`WebhooksConfig::retry_base_delay`].
pub const DEFAULT_RETRY_BASE_DELAY: Duration = Duration::from_secs(5);
/// Default [`WebhooksConfig::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default [`WebhooksConfig::timeout`].
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`WebhooksConfig::max_delay`].
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(3600);
/// Default [`WebhooksConfig::max_pending`].
pub const DEFAULT_MAX_PENDING: usize = 100_000;
/// Shortest accepted secret: shorter ones can be guessed from signed bodies.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    pub retry_base_delay: Option<HumanDuration>,
    pub max_delay: Option<HumanDuration>,
    pub max_attempts: Option<u32>,
    pub timeout: Option<HumanDuration>,
    pub max_pending: Option<usize>,
}

/// How webhooks are delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhooksConfig {
    /// Wait before the first retry; each retry doubles it (with jitter), up to `max_delay`.
    pub retry_base_delay: Duration,
    /// Longest wait between two attempts.
    pub max_delay: Duration,
    /// Attempts in all (the first included) before a delivery is given up.
    pub max_attempts: u32,
    /// Bound on one attempt (connect, send, answer).
    pub timeout: Duration,
    /// Deliveries waiting at once; past it, new events are dropped (logged and counted).
    pub max_pending: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            retry_base_delay: DEFAULT_RETRY_BASE_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout: DEFAULT_WEBHOOK_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

impl RawWebhooks {
    /// Checks `[webhooks]`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<WebhooksConfig, ConfigError> {
        let c = WebhooksConfig {
            retry_base_delay: dur(self.retry_base_delay, DEFAULT_RETRY_BASE_DELAY),
            max_delay: dur(self.max_delay, DEFAULT_MAX_DELAY),
            max_attempts: self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            timeout: dur(self.timeout, DEFAULT_WEBHOOK_TIMEOUT),
            max_pending: self.max_pending.unwrap_or(DEFAULT_MAX_PENDING),
        };
        let above_zero = |key: &'static str, zero: bool| {
            if zero {
                Err(ctx.invalid(key, "must be above zero".into()))
            } else {
                Ok(())
            }
        };
        above_zero("webhooks.retry_base_delay", c.retry_base_delay.is_zero())?;
        above_zero("webhooks.max_attempts", c.max_attempts == 0)?;
        above_zero("webhooks.timeout", c.timeout.is_zero())?;
        above_zero("webhooks.max_pending", c.max_pending == 0)?;
        if c.max_delay < c.retry_base_delay {
            return Err(ctx.invalid(
                "webhooks.max_delay",
                "must be at least webhooks.retry_base_delay".into(),
            ));
        }
        Ok(c)
    }
}

/// One client's webhook: where finished runs are posted and the key that signs them.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub url: Uri,
    /// HMAC-SHA256 key of `X-Dify-Gateway-Signature`; never logged or shown.
    pub secret: SecretString,
}

/// Reads a client's webhook from its raw fields; `None` without `webhook_url`. `invalid`
/// builds the error for this client's entry.
pub(super) fn target(
    url: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    ctx: &Context<'_>,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<Option<WebhookTarget>, ConfigError> {
    let Some(url) = url else {
        if secret_env.is_some() || secret_file.is_some() {
            return Err(invalid(
                "clients.webhook_url",
                "a webhook secret is set but no webhook_url".into(),
            ));
        }
        return Ok(None);
    };
    let parsed: Uri = url.parse().map_err(|_| {
        invalid(
            "clients.webhook_url",
            "not a URL (expected http:// or https://host/path)".into(),
        )
    })?;
    let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
    if !scheme_ok || parsed.host().is_none_or(str::is_empty) {
        return Err(invalid(
            "clients.webhook_url",
            "must be an http:// or https:// URL with a host".into(),
        ));
    }
    let secret = match (secret_env, secret_file) {
        (Some(var), None) => ctx.env(&var).ok_or_else(|| {
            invalid(
                "clients.webhook_secret_env",
                format!("environment variable {var} is not set"),
            )
        })?,
        (None, Some(path)) => std::fs::read_to_string(&path).map_err(|e| {
            invalid(
                "clients.webhook_secret_file",
                format!("cannot read {}: {}", path.display(), e.kind()),
            )
        })?,
        (Some(_), Some(_)) => {
            return Err(invalid(
                "clients.webhook_secret_env",
                "give webhook_secret_env or webhook_secret_file, not both".into(),
            ))
        }
        (None, None) => {
            return Err(invalid(
                "clients.webhook_url",
                "needs webhook_secret_env or webhook_secret_file (the signing secret)".into(),
            ))
        }
    };
    let secret = secret.trim();
    if secret.len() < MIN_SECRET_LEN || secret.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(invalid(
            "clients.webhook_secret_env",
            format!(
                "the webhook secret must be at least {MIN_SECRET_LEN} visible ASCII characters"
            ),
        ));
    }
    Ok(Some(WebhookTarget {
        url: parsed,
        secret: SecretString::from(secret.to_owned()),
    }))
}

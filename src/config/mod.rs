//! Configuration: a raw TOML layer and the validated types the rest of the code sees.
//!
//! Invariant: nothing outside this module reads a raw value; every setting reaches the gateway
//! through [`Config`], already checked, with durations as [`Duration`] and the upstream key as a
//! [`SecretString`] read from the environment or a key file — never from a command-line value.
//! Each section validates itself in its own file, with its defaults as named constants; this
//! module imports nothing else of the crate, so any module may import it.
//!
//! [`SecretString`]: secrecy::SecretString
//! [`Duration`]: std::time::Duration

use std::path::Path;

use serde::Deserialize;

mod admin;
mod apps;
mod cache;
mod clients;
mod context;
mod idempotency;
mod log;
mod longpoll;
mod ownership;
mod passthrough;
mod position;
mod server;
mod shared;
mod stream;
mod upstream;
#[cfg(test)]
mod validation_tests;
mod values;
mod webhooks;

pub use admin::{
    AdminConfig, RawAdmin, ADMIN_TOKEN_ENV, DEFAULT_ADMIN_LISTEN, DEFAULT_ADMIN_MAX_CONNECTIONS,
};
pub use apps::{AppConfig, KeySource, RawApp, DEFAULT_APP};
pub use cache::{CacheConfig, RawCache, DEFAULT_TERMINAL_STATUSES, NON_TERMINAL_STATUSES};
pub use clients::{ClientConfig, Quota, RateLimit, RawClient, StartLimits};
pub use context::{ConfigError, Context, Origins, Overrides, API_KEY_ENV};
pub use idempotency::{
    IdempotencyConfig, RawIdempotency, DEFAULT_IDEMPOTENCY_MAX_BYTES, DEFAULT_IDEMPOTENCY_TTL,
};
pub use log::{LogConfig, LogFormat, RawLog};
pub use longpoll::{LongPollConfig, RawLongPoll, DEFAULT_MAX_WAIT, DEFAULT_MAX_WAITERS};
pub use ownership::{OwnershipConfig, RawOwnership, DEFAULT_MAX_RECORDS, DEFAULT_OWNERSHIP_TTL};
pub use passthrough::{
    PassthroughConfig, RawPassthrough, DEFAULT_MAX_JSON_BYTES, DEFAULT_MAX_UPLOAD_BYTES,
};
pub use position::{KeyPositions, TomlError};
pub use server::{
    RawServer, RawTls, ServerConfig, TlsConfig, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEP_ALIVE_INTERVAL, DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_MAX_RESPONSE_TIME, DEFAULT_TCP_KEEPALIVE,
};
pub use shared::{
    RawShared, SharedConfig, Urls, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEY_PREFIX, DEFAULT_LOCK_TTL,
    DEFAULT_TIMEOUT, DEFAULT_WAIT_TIMEOUT, MAX_KEY_PREFIX,
};
pub use stream::{RawStream, StreamConfig, DEFAULT_HEARTBEAT, DEFAULT_STREAM_IDLE_TIMEOUT};
pub use upstream::{
    RawUpstream, RetrySettings, UpstreamConfig, DEFAULT_MAX_SHARE_PER_APP,
    DEFAULT_MAX_SHARE_PER_CLIENT, DEFAULT_UPSTREAM,
};
pub use values::{parse_listen, redact_url, HumanDuration};
pub use webhooks::{
    RawWebhooks, WebhookTarget, WebhooksConfig, DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BASE_DELAY,
};

/// The file as written. Every field is optional; defaults live in each section's `validate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub apps: Vec<RawApp>,
    #[serde(default)]
    pub clients: Vec<RawClient>,
    pub shared: Option<RawShared>,
    #[serde(default)]
    pub stream: RawStream,
    #[serde(default)]
    pub ownership: RawOwnership,
    #[serde(default)]
    pub longpoll: RawLongPoll,
    #[serde(default)]
    pub passthrough: RawPassthrough,
    #[serde(default)]
    pub idempotency: RawIdempotency,
    #[serde(default)]
    pub webhooks: RawWebhooks,
    /// Where each key sits in the file, for errors found by [`RawConfig::validate`].
    #[serde(skip)]
    pub positions: KeyPositions,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    /// The Dify apps served; never empty. Without `[[apps]]` it is one app named `default`
    /// with `upstream.base_url` and `DIFY_API_KEY` / `upstream.api_key_file`.
    pub apps: Vec<AppConfig>,
    /// Clients allowed in; empty means the gateway runs open.
    pub clients: Vec<ClientConfig>,
    /// The Redis/Valkey tier shared by replicas; `None` keeps everything in-process.
    pub shared: Option<SharedConfig>,
    /// Event streams: heartbeats and the upstream silence allowed.
    pub stream: StreamConfig,
    /// Bounds of the records of which client created which run, task and file.
    pub ownership: OwnershipConfig,
    /// Held requests: long-polls and status streams.
    pub longpoll: LongPollConfig,
    /// The passed-through routes' body caps and the unlisted-path switch.
    pub passthrough: PassthroughConfig,
    /// Run starts made idempotent by an `Idempotency-Key`.
    pub idempotency: IdempotencyConfig,
    /// How finished runs are announced to clients' webhooks.
    pub webhooks: WebhooksConfig,
}

impl RawConfig {
    /// Reads and parses a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })
    }

    /// Parses TOML text; the error is [`TomlError`]'s text (position, key, never a value).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| e.to_string())
    }

    /// Parses TOML text, remembering where each key sits.
    pub fn parse(text: &str) -> Result<Self, TomlError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| TomlError::new(text, &e))?;
        raw.positions = KeyPositions::of(text);
        Ok(raw)
    }

    /// Checks every value and fills defaults, section by section. `env` looks up environment
    /// variables (injected so tests need not touch the process environment); `file` names the
    /// source in errors.
    pub fn validate(
        mut self,
        overrides: &Overrides,
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut ctx = Context::new(overrides, file, env);
        ctx.positions = std::mem::take(&mut self.positions);
        let server = self.server.validate(&ctx)?;
        // `upstream.api_key_file` is the default app's key source: the apps section reads it.
        let default_key_file = self.upstream.api_key_file.take();
        let upstream = self.upstream.validate(&ctx)?;
        let clients_configured = !self.clients.is_empty();
        let apps = apps::validate(
            self.apps,
            default_key_file,
            &upstream.base_url,
            clients_configured,
            &ctx,
        )?;
        let clients = clients::validate(self.clients, &apps, &ctx)?;
        let cache = self.cache.validate(&ctx)?;
        let log = self.log.validate(&ctx)?;
        let admin = self.admin.validate(&ctx)?;
        let shared = shared::validate(self.shared, &ctx)?;
        let stream = self.stream.validate(&ctx)?;
        let ownership = self.ownership.validate(&ctx)?;
        let longpoll = self.longpoll.validate(&ctx, server.max_response_time)?;
        let passthrough = self.passthrough.validate(&ctx)?;
        let idempotency = self.idempotency.validate(&ctx)?;
        let webhooks = self.webhooks.validate(&ctx)?;
        Ok(Config {
            server,
            upstream,
            cache,
            log,
            admin,
            apps,
            clients,
            shared,
            stream,
            ownership,
            longpoll,
            passthrough,
            idempotency,
            webhooks,
        })
    }
}

impl Config {
    /// A configuration with every default, for the given upstream and key (used by tests and
    /// benchmarks that build a gateway in-process).
    pub fn for_upstream(base_url: &str, api_key: &str) -> Result<Config, ConfigError> {
        let key = api_key.to_owned();
        RawConfig::default().validate(
            &Overrides {
                upstream: Some(base_url.to_owned()),
                ..Overrides::default()
            },
            None,
            &move |name| (name == API_KEY_ENV).then(|| key.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    pub(super) fn no_env(_: &str) -> Option<String> {
        None
    }

    pub(super) fn key_env(name: &str) -> Option<String> {
        (name == API_KEY_ENV).then(|| "app-secretkey123".to_owned())
    }

    #[test]
    fn defaults_apply() {
        let c = RawConfig::default()
            .validate(&Overrides::default(), None, &key_env)
            .unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstream.base_url.to_string(), "https://api.dify.ai/v1");
        assert_eq!(c.cache.running_ttl, Duration::from_secs(1));
        assert_eq!(c.cache.not_found_ttl, Duration::from_secs(2));
        assert_eq!(c.cache.max_bytes, 256 * 1024 * 1024);
        assert_eq!(c.upstream.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.cache.terminal_statuses.len(), 4);
    }

    #[test]
    fn missing_key_is_an_error() {
        let e = RawConfig::default()
            .validate(&Overrides::default(), None, &no_env)
            .unwrap_err();
        assert!(matches!(e, ConfigError::MissingKey));
        assert!(e.to_string().contains(API_KEY_ENV));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = RawConfig::from_toml("[cache]\nrunning_tt = \"1s\"\n").unwrap_err();
        assert!(e.contains("running_tt"), "{e}");
    }

    #[test]
    fn bad_durations_are_named() {
        let e = RawConfig::from_toml("[cache]\nrunning_ttl = \"soon\"\n").unwrap_err();
        assert!(e.contains("running_ttl"), "{e}");
        let ok = RawConfig::from_toml("[cache]\nrunning_ttl = \"500ms\"\n")
            .unwrap()
            .validate(&Overrides::default(), None, &key_env)
            .unwrap();
        assert_eq!(ok.cache.running_ttl, Duration::from_millis(500));
    }

    #[test]
    fn bad_values_name_the_key_and_file() {
        let raw = RawConfig::from_toml("[upstream]\nbase_url = \"ftp://x\"\n").unwrap();
        let e = raw
            .validate(&Overrides::default(), Some(Path::new("gw.toml")), &key_env)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("upstream.base_url") && msg.contains("gw.toml"),
            "{msg}"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = RawConfig::default()
            .validate(&Overrides::default(), None, &key_env)
            .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secretkey123"), "{dbg}");
    }

    #[test]
    fn example_config_is_valid_and_complete() {
        let text = include_str!("../../config/dify-gateway.toml");
        let raw = RawConfig::from_toml(text).expect("example parses");
        raw.validate(&Overrides::default(), None, &key_env)
            .expect("example validates");
    }
}

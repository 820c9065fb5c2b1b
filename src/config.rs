//! Configuration: a raw TOML layer and the validated types the rest of the code sees.
//!
//! Invariant: nothing outside this module reads a raw value; every setting reaches the gateway
//! through [`Config`], already checked, with durations as [`Duration`] and the upstream key as a
//! [`SecretString`] read from the environment or a key file — never from a command-line value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use secrecy::SecretString;
use serde::Deserialize;

mod position;
mod values;
pub use position::{KeyPositions, TomlError};
use values::check_terminal_status;
pub use values::{parse_listen, redact_url};
#[cfg(test)]
mod validation_tests;

/// Name of the environment variable that holds the upstream app key.
pub const API_KEY_ENV: &str = "DIFY_API_KEY";

/// Dify's cloud API base, the default upstream.
pub const DEFAULT_UPSTREAM: &str = "https://api.dify.ai/v1";

/// The default listen address of the public side.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Default `upstream.max_share_per_app`: with several apps, one app's fetches may hold up to
/// three quarters of the upstream slots, so the others always find a quarter free.
pub const DEFAULT_MAX_SHARE_PER_APP: f64 = 0.75;

/// Default `upstream.max_share_per_client`: with several clients, one client's fetches may hold
/// up to half of the upstream slots, so one flooding client cannot starve the others.
pub const DEFAULT_MAX_SHARE_PER_CLIENT: f64 = 0.5;

/// Statuses Dify never moves a run out of.
pub const DEFAULT_TERMINAL_STATUSES: [&str; 4] =
    ["succeeded", "failed", "stopped", "partial-succeeded"];

/// Statuses Dify gives a run that can still change.
pub const NON_TERMINAL_STATUSES: [&str; 3] = ["running", "paused", "scheduled"];

/// The message of a duration that does not parse; it does not echo the value.
pub(crate) const NOT_A_DURATION: &str = "not a duration; write e.g. \"1s\" or \"500ms\"";

/// Why a configuration could not be used. Every variant names the key (and file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds unknown keys or wrongly typed values.
    #[error("invalid config file {path}: {error}")]
    Parse { path: PathBuf, error: TomlError },
    /// A value parsed but is not acceptable.
    #[error("invalid value for `{key}`{}: {message}", file_suffix(.file))]
    Invalid {
        key: &'static str,
        file: Option<PathBuf>,
        message: String,
    },
    /// No upstream key anywhere.
    #[error(
        "no upstream API key: set the {API_KEY_ENV} environment variable or `upstream.api_key_file` in the config file"
    )]
    MissingKey,
}

fn file_suffix(file: &Option<PathBuf>) -> String {
    match file {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

/// A duration written as humans write it (`1s`, `500ms`, `2m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // humantime's error quotes the value, which could be anything pasted by mistake.
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|_| serde::de::Error::custom(NOT_A_DURATION))
    }
}

/// The file as written. Every field is optional; defaults live in [`RawConfig::validate`].
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
    pub shared: Option<crate::shared::RawShared>,
    /// Where each key sits in the file, for errors found by [`RawConfig::validate`].
    #[serde(skip)]
    pub positions: KeyPositions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub name: String,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub base_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub name: String,
    pub token_sha256: String,
    pub app: String,
    pub rate_per_second: Option<u32>,
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub handshake_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub max_connections: Option<usize>,
    pub token_file: Option<PathBuf>,
    pub probe_interval: Option<HumanDuration>,
    pub ready_max_age: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub header_read_timeout: Option<HumanDuration>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub drain_timeout: Option<HumanDuration>,
    pub idle_timeout: Option<HumanDuration>,
    pub keep_alive_interval: Option<HumanDuration>,
    pub keep_alive_timeout: Option<HumanDuration>,
    pub tcp_keepalive: Option<HumanDuration>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub base_url: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<HumanDuration>,
    pub total_timeout: Option<HumanDuration>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub max_bytes: Option<u64>,
    pub terminal_statuses: Option<Vec<String>>,
    pub terminal_max_age: Option<HumanDuration>,
    pub running_ttl: Option<HumanDuration>,
    pub not_found_ttl: Option<HumanDuration>,
    pub stale_if_error: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub access_log: Option<bool>,
}

/// Values given on the command line or in `DIFY_GATEWAY_*` variables; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub log_format: Option<String>,
    pub admin_listen: Option<String>,
    /// A single Redis/Valkey URL for the shared tier (`--redis-url`).
    pub redis_url: Option<String>,
    /// Which flag or variable gave each value, named in its errors.
    pub origins: Origins,
}

/// The flag (`--listen`) or environment variable (`DIFY_GATEWAY_LISTEN`) each override came
/// from, so an error about it names what the operator wrote rather than a config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origins {
    pub listen: &'static str,
    pub upstream: &'static str,
    pub log_format: &'static str,
    pub admin_listen: &'static str,
    pub redis_url: &'static str,
}

impl Default for Origins {
    /// Every value given as a flag.
    fn default() -> Self {
        Origins {
            listen: "--listen",
            upstream: "--upstream",
            log_format: "--log-format",
            admin_listen: "--admin-listen",
            redis_url: "--redis-url",
        }
    }
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
    pub shared: Option<crate::shared::SharedConfig>,
}

/// Name of the app built from the top-level upstream settings.
pub const DEFAULT_APP: &str = "default";

/// One Dify app: its name, upstream base and key.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    pub base_url: Uri,
    pub api_key: SecretString,
    /// Where the key was read; a reload reads it again from there (key rotation).
    pub key_source: KeySource,
}

/// Where an app key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An environment variable, by name.
    Env(String),
    /// A file (a mounted Secret), trimmed.
    File(PathBuf),
}

/// One client: who it is, how it proves it, what it may use.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    /// SHA-256 of the client's bearer token; the token itself is never stored.
    pub token_sha256: [u8; 32],
    /// Index into [`Config::apps`].
    pub app: usize,
    pub rate: Option<RateLimit>,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: std::num::NonZeroU32,
    pub burst: std::num::NonZeroU32,
}

/// TLS on the public listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// A client must finish its TLS handshake within this time.
    pub handshake_timeout: Duration,
}

/// Default [`ServerConfig::header_read_timeout`]: a real client sends its first request within
/// a round trip or two of connecting (TLS included); ten seconds leaves room for slow mobile
/// links while a stalled socket gives its slot back quickly.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`ServerConfig::idle_timeout`]: above the 60 s idle timeout of common load balancers,
/// so the gateway is not the side that closes a pooled connection under a request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Default [`ServerConfig::keep_alive_interval`]: finds a dead HTTP/2 peer within a minute
/// without noticeable traffic.
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Default [`ServerConfig::keep_alive_timeout`]: several round trips of even a poor mobile link.
/// It also bounds how long shutdown waits for an idle HTTP/2 client to acknowledge its GOAWAY.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`ServerConfig::tcp_keepalive`]: a peer that vanished without a FIN (a NAT or a
/// machine gone) is found in minutes, not the two hours of the kernel's default.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Default [`AdminConfig::max_connections`]: scrapers, probes and operators, not clients.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

/// Name of the environment variable that may hold the admin token.
pub const ADMIN_TOKEN_ENV: &str = "DIFY_GATEWAY_ADMIN_TOKEN";

/// The default admin listen address: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

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

/// Settings of the public listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the public side listens.
    pub listen: SocketAddr,
    /// From the moment a connection is admitted, its first complete request head must arrive
    /// within this time — protocol sniff, TLS handshake, HTTP/1 head or HTTP/2 preface, SETTINGS
    /// and first HEADERS alike — or the connection is cut.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; beyond it the client gets 431.
    pub max_header_bytes: usize,
    /// Connections served at once. When all are taken, a newcomer gets the slot of the connection
    /// that has gone longest without a request in flight; when every one is busy, it waits.
    pub max_connections: usize,
    /// On SIGINT/SIGTERM, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// A served connection with no request in flight for this long is closed (HTTP/1 keep-alive
    /// or HTTP/2 with no open stream; a later HTTP/1 head must also be complete by then).
    pub idle_timeout: Duration,
    /// HTTP/2 PINGs are sent this often; `None` sends none.
    pub keep_alive_interval: Option<Duration>,
    /// A PING — a keep-alive one, or the one that follows a GOAWAY — must be answered within this
    /// or the connection is closed.
    pub keep_alive_timeout: Duration,
    /// TCP keepalive on accepted sockets: idle time before the first probe and between probes;
    /// `None` leaves it off.
    pub tcp_keepalive: Option<Duration>,
    /// Serve HTTPS with these files when set.
    pub tls: Option<TlsConfig>,
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
    pub retry: crate::upstream::RetryPolicy,
    /// Consecutive upstream failures (connect errors, timeouts, 5xx) that open an app's circuit;
    /// 0 disables the breaker.
    pub circuit_failure_threshold: u32,
    /// How long an open circuit fails fast before one probe request is let through.
    pub circuit_cooldown: Duration,
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
    /// How long an upstream 404 is reused; zero disables.
    pub not_found_ttl: Duration,
    /// How long past its TTL a running entry is still served (as `X-Cache: STALE`) when a
    /// refresh fails; zero disables.
    pub stale_if_error: Duration,
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One line per request at INFO level on target `access`.
    pub access_log: bool,
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

    /// Checks every value and fills defaults. `env` looks up environment variables (injected so
    /// tests need not touch the process environment); `file` names the source in errors.
    pub fn validate(
        mut self,
        overrides: &Overrides,
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = file.map(Path::to_path_buf);
        let positions = std::mem::take(&mut self.positions);
        // `path` is `key` with array indices (`apps[1].base_url`) when known: the error then
        // points at that value's line and column.
        let invalid_at = |key: &'static str, path: &str, message: String| ConfigError::Invalid {
            key,
            file: file.clone(),
            message: match positions.find(path) {
                Some(at) => format!("{at}: {message}"),
                None => message,
            },
        };
        let invalid = |key: &'static str, message: String| invalid_at(key, key, message);
        // A value from a flag or variable is that flag's or variable's problem, not the file's.
        let bad = |from: Given, message: String| match from {
            Given::Override(origin) => ConfigError::Invalid {
                key: origin,
                file: None,
                message,
            },
            Given::File(key) => invalid(key, message),
        };
        let origins = overrides.origins;

        let (listen_s, from) = given(
            &overrides.listen,
            origins.listen,
            self.server.listen,
            "server.listen",
            DEFAULT_LISTEN,
        );
        let listen = parse_listen(&listen_s).map_err(|m| bad(from, m))?;
        let max_header_bytes = self.server.max_header_bytes.unwrap_or(16 * 1024);
        if !(8192..=1024 * 1024).contains(&max_header_bytes) {
            return Err(invalid(
                "server.max_header_bytes",
                format!("{max_header_bytes} is outside 8192..=1048576"),
            ));
        }
        let max_connections = self.server.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                "must be at least 1".into(),
            ));
        }
        let header_read_timeout = dur(self.server.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        let idle_timeout = dur(self.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let keep_alive_timeout = dur(self.server.keep_alive_timeout, DEFAULT_KEEP_ALIVE_TIMEOUT);
        for (key, d) in [
            ("server.header_read_timeout", header_read_timeout),
            ("server.idle_timeout", idle_timeout),
            ("server.keep_alive_timeout", keep_alive_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be above zero".into()));
            }
        }
        let keep_alive_interval = dur(self.server.keep_alive_interval, DEFAULT_KEEP_ALIVE_INTERVAL);
        let tcp_keepalive = dur(self.server.tcp_keepalive, DEFAULT_TCP_KEEPALIVE);
        // The kernel counts keepalive in whole seconds; a shorter value would be refused.
        if !tcp_keepalive.is_zero() && tcp_keepalive < Duration::from_secs(1) {
            return Err(invalid(
                "server.tcp_keepalive",
                "must be at least 1s, or \"0s\" to turn it off".into(),
            ));
        }
        let server = ServerConfig {
            listen,
            header_read_timeout,
            max_header_bytes,
            max_connections,
            drain_timeout: dur(self.server.drain_timeout, Duration::from_secs(30)),
            idle_timeout,
            keep_alive_interval: (!keep_alive_interval.is_zero()).then_some(keep_alive_interval),
            keep_alive_timeout,
            tcp_keepalive: (!tcp_keepalive.is_zero()).then_some(tcp_keepalive),
            tls: match self.server.tls {
                None => None,
                Some(t) => {
                    for (key, path) in [
                        ("server.tls.cert_file", &t.cert_file),
                        ("server.tls.key_file", &t.key_file),
                    ] {
                        if !path.is_file() {
                            return Err(invalid(
                                key,
                                format!("{} is not a readable file", path.display()),
                            ));
                        }
                    }
                    Some(TlsConfig {
                        cert_file: t.cert_file,
                        key_file: t.key_file,
                        handshake_timeout: dur(t.handshake_timeout, Duration::from_secs(10)),
                    })
                }
            },
        };

        let (base_s, from) = given(
            &overrides.upstream,
            origins.upstream,
            self.upstream.base_url,
            "upstream.base_url",
            DEFAULT_UPSTREAM,
        );
        let base_url = parse_base_url(&base_s).map_err(|m| bad(from, m))?;
        let connect_timeout = dur(self.upstream.connect_timeout, Duration::from_secs(5));
        let total_timeout = dur(self.upstream.total_timeout, Duration::from_secs(30));
        if connect_timeout.is_zero() {
            return Err(invalid(
                "upstream.connect_timeout",
                "must be above zero".into(),
            ));
        }
        if total_timeout.is_zero() {
            return Err(invalid(
                "upstream.total_timeout",
                "must be above zero".into(),
            ));
        }
        let max_body_bytes = self.upstream.max_body_bytes.unwrap_or(16 * 1024 * 1024);
        if max_body_bytes == 0 || max_body_bytes > u32::MAX as usize {
            return Err(invalid(
                "upstream.max_body_bytes",
                format!("{max_body_bytes} is outside 1..=4294967295"),
            ));
        }
        let max_concurrent = self.upstream.max_concurrent.unwrap_or(64);
        if max_concurrent == 0 {
            return Err(invalid(
                "upstream.max_concurrent",
                "must be at least 1".into(),
            ));
        }
        let share = |key: &'static str, v: Option<f64>, default: f64| match v {
            None => Ok(default),
            Some(f) if f > 0.0 && f <= 1.0 => Ok(f),
            Some(f) => Err(invalid(
                key,
                format!("{f} is outside (0, 1]: it is a fraction of upstream.max_concurrent"),
            )),
        };
        let max_share_per_app = share(
            "upstream.max_share_per_app",
            self.upstream.max_share_per_app,
            DEFAULT_MAX_SHARE_PER_APP,
        )?;
        let max_share_per_client = share(
            "upstream.max_share_per_client",
            self.upstream.max_share_per_client,
            DEFAULT_MAX_SHARE_PER_CLIENT,
        )?;
        let apps = if self.apps.is_empty() {
            let (key, key_source) = match &self.upstream.api_key_file {
                Some(path) => {
                    let key = read_key_file(path)
                        .and_then(|k| check_key(&k).map(|()| k))
                        .map_err(|m| invalid("upstream.api_key_file", m))?;
                    (key, KeySource::File(path.clone()))
                }
                None => match env(API_KEY_ENV) {
                    Some(k) if !k.trim().is_empty() => {
                        let key = k.trim().to_owned();
                        check_key(&key).map_err(|m| ConfigError::Invalid {
                            key: API_KEY_ENV,
                            file: None,
                            message: format!("in this environment variable, {m}"),
                        })?;
                        (key, KeySource::Env(API_KEY_ENV.to_owned()))
                    }
                    _ => return Err(ConfigError::MissingKey),
                },
            };
            vec![AppConfig {
                name: DEFAULT_APP.to_owned(),
                base_url: base_url.clone(),
                api_key: SecretString::from(key),
                key_source,
            }]
        } else {
            if self.upstream.api_key_file.is_some() {
                return Err(invalid(
                    "upstream.api_key_file",
                    "with [[apps]], give each app its own api_key_env or api_key_file".into(),
                ));
            }
            let mut apps: Vec<AppConfig> = Vec::with_capacity(self.apps.len());
            for (i, a) in self.apps.into_iter().enumerate() {
                let at = |key: &'static str, message: String| {
                    let field = key.trim_start_matches("apps.");
                    invalid_at(key, &format!("apps[{i}].{field}"), message)
                };
                check_name(&a.name).map_err(|m| at("apps.name", m))?;
                if apps.iter().any(|x| x.name == a.name) {
                    return Err(at("apps.name", format!("`{}` is defined twice", a.name)));
                }
                let (key, key_source) = match (&a.api_key_env, &a.api_key_file) {
                    (Some(var), None) => {
                        let key = env(var)
                            .map(|k| k.trim().to_owned())
                            .filter(|k| !k.is_empty())
                            .ok_or_else(|| {
                                format!("app `{}`: environment variable {var} is not set", a.name)
                            })
                            .and_then(|k| {
                                check_key(&k).map(|()| k).map_err(|m| {
                                    format!("app `{}`: environment variable {var}: {m}", a.name)
                                })
                            })
                            .map_err(|m| at("apps.api_key_env", m))?;
                        (key, KeySource::Env(var.clone()))
                    }
                    (None, Some(path)) => {
                        let key = read_key_file(path)
                            .and_then(|k| check_key(&k).map(|()| k))
                            .map_err(|m| {
                                at("apps.api_key_file", format!("app `{}`: {m}", a.name))
                            })?;
                        (key, KeySource::File(path.clone()))
                    }
                    _ => {
                        return Err(at(
                            "apps.api_key_env",
                            format!(
                                "app `{}`: set exactly one of api_key_env and api_key_file",
                                a.name
                            ),
                        ))
                    }
                };
                let base = match &a.base_url {
                    Some(u) => parse_base_url(u).map_err(|m| at("apps.base_url", m))?,
                    None => base_url.clone(),
                };
                apps.push(AppConfig {
                    name: a.name,
                    base_url: base,
                    api_key: SecretString::from(key),
                    key_source,
                });
            }
            apps
        };
        let mut clients: Vec<ClientConfig> = Vec::with_capacity(self.clients.len());
        for (i, c) in self.clients.into_iter().enumerate() {
            // Errors point at this client's entry in the file.
            let invalid = |key: &'static str, message: String| {
                let field = key.trim_start_matches("clients.");
                invalid_at(key, &format!("clients[{i}].{field}"), message)
            };
            check_name(&c.name).map_err(|m| invalid("clients.name", m))?;
            if clients.iter().any(|x| x.name == c.name) {
                return Err(invalid(
                    "clients.name",
                    format!("`{}` is defined twice", c.name),
                ));
            }
            let token_sha256 = parse_sha256(&c.token_sha256).ok_or_else(|| {
                invalid(
                    "clients.token_sha256",
                    format!("client `{}`: expected 64 hex digits", c.name),
                )
            })?;
            if clients.iter().any(|x| x.token_sha256 == token_sha256) {
                return Err(invalid(
                    "clients.token_sha256",
                    format!("client `{}` shares its token with another client", c.name),
                ));
            }
            let app = apps.iter().position(|a| a.name == c.app).ok_or_else(|| {
                invalid(
                    "clients.app",
                    format!("client `{}`: no app named `{}`", c.name, c.app),
                )
            })?;
            let rate = match (c.rate_per_second, c.burst) {
                (None, None) => None,
                (Some(r), b) => {
                    let per_second = std::num::NonZeroU32::new(r).ok_or_else(|| {
                        invalid(
                            "clients.rate_per_second",
                            format!("client `{}`: must be at least 1", c.name),
                        )
                    })?;
                    let burst = std::num::NonZeroU32::new(b.unwrap_or(r)).ok_or_else(|| {
                        invalid(
                            "clients.burst",
                            format!("client `{}`: must be at least 1", c.name),
                        )
                    })?;
                    Some(RateLimit { per_second, burst })
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "clients.burst",
                        format!("client `{}`: burst needs rate_per_second", c.name),
                    ))
                }
            };
            clients.push(ClientConfig {
                name: c.name,
                token_sha256,
                app,
                rate,
            });
        }
        if clients.is_empty() && apps.len() > 1 {
            return Err(invalid(
                "clients",
                "several apps are configured but no clients: each request must map to an app through its client".into(),
            ));
        }
        let upstream = UpstreamConfig {
            base_url,
            ca_file: self.upstream.ca_file,
            connect_timeout,
            total_timeout,
            max_body_bytes,
            pool_idle_timeout: dur(self.upstream.pool_idle_timeout, Duration::from_secs(90)),
            pool_max_idle_per_host: self.upstream.pool_max_idle_per_host.unwrap_or(64),
            max_concurrent,
            queue_timeout: dur(self.upstream.queue_timeout, Duration::from_secs(1)),
            max_share_per_app,
            max_share_per_client,
            retry: crate::upstream::RetryPolicy {
                max_attempts: self.upstream.retry_attempts.unwrap_or(3),
                base_delay: dur(self.upstream.retry_base_delay, Duration::from_millis(100)),
                max_delay: dur(self.upstream.retry_max_delay, Duration::from_secs(1)),
                retry_after_cap: dur(self.upstream.retry_after_cap, Duration::from_secs(5)),
            },
            circuit_failure_threshold: self.upstream.circuit_failure_threshold.unwrap_or(5),
            circuit_cooldown: dur(self.upstream.circuit_cooldown, Duration::from_secs(10)),
        };
        if !(1..=10).contains(&upstream.retry.max_attempts) {
            return Err(invalid(
                "upstream.retry_attempts",
                "must be within 1..=10 (1 = no retries)".into(),
            ));
        }
        if upstream.circuit_cooldown.is_zero() {
            return Err(invalid(
                "upstream.circuit_cooldown",
                "must be above zero".into(),
            ));
        }
        if let Some(ca) = &upstream.ca_file {
            if !ca.is_file() {
                return Err(invalid(
                    "upstream.ca_file",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }

        let max_bytes = self.cache.max_bytes.unwrap_or(256 * 1024 * 1024);
        if max_bytes < 1024 * 1024 {
            return Err(invalid(
                "cache.max_bytes",
                format!("{max_bytes} is below the minimum of 1048576 (1 MiB)"),
            ));
        }
        let terminal_statuses = self.cache.terminal_statuses.unwrap_or_else(|| {
            DEFAULT_TERMINAL_STATUSES
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        for (i, s) in terminal_statuses.iter().enumerate() {
            check_terminal_status(s).map_err(|m| {
                invalid_at(
                    "cache.terminal_statuses",
                    &format!("cache.terminal_statuses[{i}]"),
                    m,
                )
            })?;
        }
        let cache = CacheConfig {
            max_bytes,
            terminal_statuses,
            terminal_max_age: self.cache.terminal_max_age.map(|d| d.0),
            running_ttl: dur(self.cache.running_ttl, Duration::from_secs(1)),
            not_found_ttl: dur(self.cache.not_found_ttl, Duration::from_secs(2)),
            stale_if_error: dur(self.cache.stale_if_error, Duration::from_secs(30)),
        };
        if cache.terminal_max_age.is_some_and(|d| d.is_zero()) {
            return Err(invalid(
                "cache.terminal_max_age",
                "must be above zero (leave it out for no expiry)".into(),
            ));
        }

        let (format_s, from) = given(
            &overrides.log_format,
            origins.log_format,
            self.log.format,
            "log.format",
            "text",
        );
        let format = LogFormat::parse(&format_s)
            .ok_or_else(|| bad(from, format!("`{format_s}`: expected text or json")))?;
        let log = LogConfig {
            format,
            access_log: self.log.access_log.unwrap_or(true),
        };

        let (admin_s, from) = given(
            &overrides.admin_listen,
            origins.admin_listen,
            self.admin.listen,
            "admin.listen",
            DEFAULT_ADMIN_LISTEN,
        );
        let admin_listen = parse_listen(&admin_s).map_err(|m| bad(from, m))?;
        let token = match &self.admin.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "admin.token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(text.trim().to_owned())
            }
            None => env(ADMIN_TOKEN_ENV).map(|t| t.trim().to_owned()),
        };
        if token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid(
                if self.admin.token_file.is_some() {
                    "admin.token_file"
                } else {
                    "admin.token (DIFY_GATEWAY_ADMIN_TOKEN)"
                },
                "the admin token must be at least 16 characters".into(),
            ));
        }
        let probe_interval = dur(self.admin.probe_interval, Duration::from_secs(15));
        if probe_interval < Duration::from_secs(1) {
            return Err(invalid(
                "admin.probe_interval",
                "must be at least 1s".into(),
            ));
        }
        let ready_max_age = dur(self.admin.ready_max_age, Duration::from_secs(60));
        if ready_max_age < probe_interval {
            return Err(invalid(
                "admin.ready_max_age",
                "must be at least admin.probe_interval".into(),
            ));
        }
        let admin_max_connections = self
            .admin
            .max_connections
            .unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS);
        if admin_max_connections == 0 {
            return Err(invalid(
                "admin.max_connections",
                "must be at least 1".into(),
            ));
        }
        let admin = AdminConfig {
            listen: admin_listen,
            max_connections: admin_max_connections,
            token: token.map(SecretString::from),
            probe_interval,
            ready_max_age,
        };

        let raw_shared = match (&overrides.redis_url, self.shared) {
            (Some(url), raw) => {
                let mut raw = raw.unwrap_or_default();
                raw.urls = Some(crate::shared::Urls(vec![url.clone()]));
                Some(raw)
            }
            (None, raw) => raw,
        };
        let shared = match raw_shared {
            None => None,
            Some(raw) => Some(raw.validate().map_err(|e| {
                if e.key == "shared.urls" && overrides.redis_url.is_some() {
                    bad(Given::Override(origins.redis_url), e.message)
                } else {
                    invalid(e.key, e.message)
                }
            })?),
        };

        Ok(Config {
            server,
            upstream,
            cache,
            log,
            admin,
            apps,
            clients,
            shared,
        })
    }
}

/// Where a setting's value came from, for its errors.
#[derive(Debug, Clone, Copy)]
enum Given {
    /// A flag or environment variable, by the name the operator wrote.
    Override(&'static str),
    /// The file (or the default), by config key.
    File(&'static str),
}

/// The override if given, else the file's value, else `default`; and where it came from.
fn given(
    over: &Option<String>,
    origin: &'static str,
    file: Option<String>,
    key: &'static str,
    default: &str,
) -> (String, Given) {
    match over {
        Some(v) => (v.clone(), Given::Override(origin)),
        None => (file.unwrap_or_else(|| default.to_owned()), Given::File(key)),
    }
}

fn read_key_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(key.to_owned())
}

/// Keys must be sendable as a header value. The message deliberately does not echo the key.
fn check_key(key: &str) -> Result<(), String> {
    if key.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err("the key holds whitespace or non-printable characters".into());
    }
    Ok(())
}

/// Names become metric labels and admin API parameters: keep them short and plain.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}`: use 1-64 characters of [A-Za-z0-9._-]"))
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

fn dur(v: Option<HumanDuration>, default: Duration) -> Duration {
    v.map(|d| d.0).unwrap_or(default)
}

/// A base URL; its errors show it through [`redact_url`] only.
fn parse_base_url(s: &str) -> Result<Uri, String> {
    let shown = redact_url(s);
    let trimmed = s.trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|e| format!("`{shown}`: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return Err(format!("`{shown}`: the scheme must be https:// or http://")),
    }
    if uri.authority().is_none() {
        return Err(format!("`{shown}`: no host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{shown}`: a query string is not allowed"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "`{shown}`: credentials in the URL are not allowed (the app key is the credential)"
        ));
    }
    Ok(uri)
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
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn key_env(name: &str) -> Option<String> {
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

    #[test]
    fn overrides_win_over_file() {
        let raw = RawConfig::from_toml("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let c = raw
            .validate(
                &Overrides {
                    listen: Some("127.0.0.1:2".into()),
                    ..Overrides::default()
                },
                None,
                &key_env,
            )
            .unwrap();
        assert_eq!(c.server.listen.port(), 2);
    }

    #[test]
    fn key_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "app-fromfile\n").unwrap();
        let raw =
            RawConfig::from_toml(&format!("[upstream]\napi_key_file = \"{}\"\n", p.display()))
                .unwrap();
        let c = raw.validate(&Overrides::default(), None, &no_env).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(c.apps[0].api_key.expose_secret(), "app-fromfile");
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
    fn connection_deadlines_have_defaults_and_are_checked() {
        let c = RawConfig::default()
            .validate(&Overrides::default(), None, &key_env)
            .unwrap();
        assert_eq!(c.server.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(c.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(
            c.server.keep_alive_interval,
            Some(DEFAULT_KEEP_ALIVE_INTERVAL)
        );
        assert_eq!(c.server.keep_alive_timeout, DEFAULT_KEEP_ALIVE_TIMEOUT);
        assert_eq!(c.server.tcp_keepalive, Some(DEFAULT_TCP_KEEPALIVE));
        assert_eq!(c.admin.max_connections, DEFAULT_ADMIN_MAX_CONNECTIONS);
        let off = RawConfig::from_toml(
            "[server]\nkeep_alive_interval = \"0s\"\ntcp_keepalive = \"0s\"\n",
        )
        .unwrap()
        .validate(&Overrides::default(), None, &key_env)
        .unwrap();
        assert_eq!(off.server.keep_alive_interval, None);
        assert_eq!(off.server.tcp_keepalive, None);
        for (toml, key) in [
            ("[server]\nidle_timeout = \"0s\"\n", "server.idle_timeout"),
            (
                "[server]\nkeep_alive_timeout = \"0s\"\n",
                "server.keep_alive_timeout",
            ),
            (
                "[server]\nheader_read_timeout = \"0s\"\n",
                "server.header_read_timeout",
            ),
            (
                "[server]\ntcp_keepalive = \"500ms\"\n",
                "server.tcp_keepalive",
            ),
            ("[admin]\nmax_connections = 0\n", "admin.max_connections"),
        ] {
            let e = RawConfig::from_toml(toml)
                .unwrap()
                .validate(&Overrides::default(), None, &key_env)
                .unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn example_config_is_valid_and_complete() {
        let text = include_str!("../config/dify-gateway.toml");
        let raw = RawConfig::from_toml(text).expect("example parses");
        raw.validate(&Overrides::default(), None, &key_env)
            .expect("example validates");
    }
}

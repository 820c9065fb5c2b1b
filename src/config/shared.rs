//! `[shared]`: settings of the Redis/Valkey tier shared by replicas, the raw table and its
//! validated form.
//!
//! Invariant: a [`SharedConfig`] only exists validated — at least one parseable Redis/Valkey URL
//! (exactly one unless `cluster`), every timeout above zero, `wait_timeout <= lock_ttl`, and a key
//! prefix that cannot break a cluster hash tag or a SCAN pattern; its `Debug` never shows a
//! password from a URL.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::context::{ConfigError, Context, Given};
use super::position::TomlError;
use super::values::{redact_url, HumanDuration};

/// Default per-call timeout: a healthy Redis on the same network answers in about a millisecond,
/// so this only bounds how long a request waits on a sick one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest accepted per-call timeout: the tier is an optimisation, and a request held longer
/// than this by it is worse than a fetch of its own.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time to open one connection (TCP and, for `rediss://`, TLS) in the background.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default lifetime of a fleet-wide fetch lock: longer than a normal upstream fetch, short
/// enough that a crashed holder blocks the fleet only briefly.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);
/// Shortest lock lifetime: Redis expiries are in milliseconds.
pub(crate) const MIN_LOCK_TTL: Duration = Duration::from_millis(1);
/// Default longest wait for another gateway's fetch: half the lock's lifetime, so a waiter
/// fetches itself well before a stuck lock would free.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default prefix of every key and channel name.
pub const DEFAULT_KEY_PREFIX: &str = "dify-gateway:";
/// Longest accepted key prefix.
pub const MAX_KEY_PREFIX: usize = 64;

/// URL schemes accepted for a standalone server.
const STANDALONE_SCHEMES: [&str; 7] = [
    "redis",
    "rediss",
    "valkey",
    "valkeys",
    "redis+unix",
    "valkey+unix",
    "unix",
];
/// URL schemes accepted for cluster seed nodes (cluster nodes are reached over TCP).
const CLUSTER_SCHEMES: [&str; 4] = ["redis", "rediss", "valkey", "valkeys"];

/// The `[shared]` table as written. Every field but `urls` is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShared {
    /// Server URL(s): one for a standalone server, one or more seed nodes with `cluster = true`.
    pub urls: Option<Urls>,
    /// Talk the Redis Cluster protocol.
    pub cluster: Option<bool>,
    /// Per-call timeout.
    pub timeout: Option<HumanDuration>,
    /// Time to open one connection.
    pub connect_timeout: Option<HumanDuration>,
    /// Lifetime of a fetch lock.
    pub lock_ttl: Option<HumanDuration>,
    /// Longest wait for another gateway's fetch.
    pub wait_timeout: Option<HumanDuration>,
    /// Prefix of every key and channel.
    pub key_prefix: Option<String>,
}

/// Redis/Valkey URLs as written (they may hold a password); `Debug` shows them redacted.
#[derive(Default, Deserialize)]
#[serde(transparent)]
pub struct Urls(pub Vec<String>);

impl fmt::Debug for Urls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|u| redact_url(u)))
            .finish()
    }
}

/// The validated shared-tier settings.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedConfig {
    /// Redis/Valkey URLs (`redis://`, `rediss://`, `valkey://`, `valkeys://`, and for a standalone
    /// server `redis+unix://`/`unix://`). Standalone: exactly one. Cluster: seed nodes, any of
    /// which lets the client discover the rest. May carry a password; never logged.
    pub urls: Vec<String>,
    /// When true the urls are cluster seed nodes and keys are routed by hash slot.
    pub cluster: bool,
    /// Longest a request waits on one shared-tier call before treating the tier as unavailable
    /// and carrying on without it. Default 100 ms.
    pub timeout: Duration,
    /// Longest one connection attempt (TCP, TLS, handshake) may take; attempts run in the
    /// background, so this never delays a request. Default 1 s.
    pub connect_timeout: Duration,
    /// Lifetime of a fleet-wide fetch lock: a holder that crashes blocks other gateways for at
    /// most this long. Should exceed a normal upstream fetch. Default 10 s.
    pub lock_ttl: Duration,
    /// Longest a request waits for another gateway's fetch before fetching itself; at most
    /// `lock_ttl`. Default 5 s.
    pub wait_timeout: Duration,
    /// Prefix of every key and of the notification channel, so several deployments can share a
    /// server and `purge_all` touches only this one. Default `dify-gateway:`.
    pub key_prefix: String,
}

impl fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConfig")
            .field("urls", &self.redacted_urls())
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("lock_ttl", &self.lock_ttl)
            .field("wait_timeout", &self.wait_timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl SharedConfig {
    /// The urls with any password replaced by `***`, for summaries and logs.
    pub fn redacted_urls(&self) -> Vec<String> {
        self.urls.iter().map(|u| redact_url(u)).collect()
    }

    /// A standalone configuration for `url` with every default (for tests and tools).
    pub fn for_url(url: &str) -> Result<SharedConfig, ConfigError> {
        RawShared {
            urls: Some(Urls(vec![url.to_owned()])),
            ..RawShared::default()
        }
        .validate(&Context::standalone())
    }
}

/// The shared tier, when `[shared]` or `--redis-url` (or its variable) turns it on; the flag's
/// URL replaces `shared.urls`, and the other settings still come from the file.
pub(super) fn validate(
    raw: Option<RawShared>,
    ctx: &Context<'_>,
) -> Result<Option<SharedConfig>, ConfigError> {
    let raw = match (&ctx.overrides().redis_url, raw) {
        (Some(url), raw) => {
            let mut raw = raw.unwrap_or_default();
            raw.urls = Some(Urls(vec![url.clone()]));
            Some(raw)
        }
        (None, raw) => raw,
    };
    raw.map(|r| r.validate(ctx)).transpose()
}

impl RawShared {
    /// Parses a `[shared]` table on its own (tests, tools).
    pub fn from_toml(text: &str) -> Result<RawShared, String> {
        toml::from_str(text).map_err(|e| TomlError::new(text, &e).to_string())
    }

    /// Checks every value and fills the defaults. A bad URL given by `--redis-url` (or its
    /// variable) is that flag's problem, not the file's.
    pub fn validate(self, ctx: &Context<'_>) -> Result<SharedConfig, ConfigError> {
        let invalid = |key: &'static str, message: String| ctx.invalid(key, message);
        let o = ctx.overrides();
        let urls_from = match o.redis_url {
            Some(_) => Given::Override(o.origins.redis_url),
            None => Given::File("shared.urls"),
        };
        let bad_urls = |message: String| ctx.blame(urls_from, message);
        let cluster = self.cluster.unwrap_or(false);
        let urls = self.urls.unwrap_or_default().0;
        if urls.is_empty() {
            return Err(bad_urls(
                "at least one URL is required, e.g. [\"redis://127.0.0.1:6379\"]".into(),
            ));
        }
        if !cluster && urls.len() > 1 {
            return Err(bad_urls(format!(
                "{} URLs given: a standalone server takes one (set `shared.cluster = true` for cluster seed nodes)",
                urls.len()
            )));
        }
        let schemes: &[&str] = if cluster {
            &CLUSTER_SCHEMES
        } else {
            &STANDALONE_SCHEMES
        };
        for (i, u) in urls.iter().enumerate() {
            check_url(u, schemes)
                .map_err(|m| bad_urls(format!("entry {i} ({}): {m}", redact_url(u))))?;
        }

        let positive = |key: &'static str, v: Option<HumanDuration>, default: Duration| {
            let d = v.map(|d| d.0).unwrap_or(default);
            if d.is_zero() {
                Err(invalid(key, "must be above zero".into()))
            } else {
                Ok(d)
            }
        };
        let timeout = positive("shared.timeout", self.timeout, DEFAULT_TIMEOUT)?;
        let connect_timeout = positive(
            "shared.connect_timeout",
            self.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let lock_ttl = positive("shared.lock_ttl", self.lock_ttl, DEFAULT_LOCK_TTL)?;
        let wait_timeout = positive(
            "shared.wait_timeout",
            self.wait_timeout,
            DEFAULT_WAIT_TIMEOUT,
        )?;
        if lock_ttl < MIN_LOCK_TTL {
            return Err(invalid(
                "shared.lock_ttl",
                "must be at least 1ms (Redis expiries are in milliseconds)".into(),
            ));
        }
        if wait_timeout > lock_ttl {
            return Err(invalid(
                "shared.wait_timeout",
                format!(
                    "{wait_timeout:?} exceeds shared.lock_ttl ({lock_ttl:?}); a lock never lives longer than its ttl"
                ),
            ));
        }
        if timeout > MAX_TIMEOUT {
            return Err(invalid(
                "shared.timeout",
                format!(
                    "{timeout:?} is above {MAX_TIMEOUT:?}; the shared tier must never hold requests that long"
                ),
            ));
        }

        let key_prefix = self
            .key_prefix
            .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
        if key_prefix.len() > MAX_KEY_PREFIX {
            return Err(invalid(
                "shared.key_prefix",
                format!("longer than {MAX_KEY_PREFIX} bytes"),
            ));
        }
        if let Some(c) = key_prefix
            .chars()
            .find(|c| !c.is_ascii_graphic() || "{}*?[]\\".contains(*c))
        {
            return Err(invalid(
                "shared.key_prefix",
                format!(
                    "`{key_prefix}` holds {c:?}; use printable ASCII without braces, glob characters or spaces"
                ),
            ));
        }

        Ok(SharedConfig {
            urls,
            cluster,
            timeout,
            connect_timeout,
            lock_ttl,
            wait_timeout,
            key_prefix,
        })
    }
}

/// Checks one URL without echoing it (it may hold a password).
fn check_url(u: &str, schemes: &[&str]) -> Result<(), String> {
    let parsed = url::Url::parse(u).map_err(|e| format!("not a URL ({e})"))?;
    if !schemes.contains(&parsed.scheme()) {
        return Err(format!(
            "scheme `{}` is not one of {}",
            parsed.scheme(),
            schemes.join(", ")
        ));
    }
    redis::Client::open(u)
        .map(drop)
        .map_err(|_| "not a usable Redis URL (check host, port and database number)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::key_env;
    use crate::config::{Overrides, RawConfig};

    fn parse(text: &str) -> Result<SharedConfig, ConfigError> {
        RawShared::from_toml(text)
            .expect("toml parses")
            .validate(&Context::standalone())
    }

    #[test]
    fn defaults_apply() {
        let c = parse("urls = [\"redis://127.0.0.1:6379\"]").unwrap();
        assert!(!c.cluster);
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.lock_ttl, DEFAULT_LOCK_TTL);
        assert_eq!(c.wait_timeout, DEFAULT_WAIT_TIMEOUT);
        assert_eq!(c.key_prefix, DEFAULT_KEY_PREFIX);
    }

    #[test]
    fn every_field_parses() {
        let c = parse(
            r#"
            urls = ["redis://a:7000", "rediss://b:7001"]
            cluster = true
            timeout = "50ms"
            connect_timeout = "2s"
            lock_ttl = "30s"
            wait_timeout = "10s"
            key_prefix = "gw:prod:"
            "#,
        )
        .unwrap();
        assert!(c.cluster);
        assert_eq!(c.urls.len(), 2);
        assert_eq!(c.timeout, Duration::from_millis(50));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.lock_ttl, Duration::from_secs(30));
        assert_eq!(c.wait_timeout, Duration::from_secs(10));
        assert_eq!(c.key_prefix, "gw:prod:");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = RawShared::from_toml("urls = [\"redis://x\"]\nurl = \"redis://y\"").unwrap_err();
        assert!(e.contains("url"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("", "shared.urls"),
            ("urls = []", "shared.urls"),
            ("urls = [\"http://x\"]", "shared.urls"),
            ("urls = [\"not a url\"]", "shared.urls"),
            ("urls = [\"redis://a\", \"redis://b\"]", "shared.urls"),
            (
                "urls = [\"unix:///tmp/r.sock\"]\ncluster = true",
                "shared.urls",
            ),
            ("urls = [\"redis://a\"]\ntimeout = \"0s\"", "shared.timeout"),
            ("urls = [\"redis://a\"]\ntimeout = \"1m\"", "shared.timeout"),
            (
                "urls = [\"redis://a\"]\nlock_ttl = \"0s\"",
                "shared.lock_ttl",
            ),
            (
                "urls = [\"redis://a\"]\nlock_ttl = \"1s\"\nwait_timeout = \"2s\"",
                "shared.wait_timeout",
            ),
            (
                "urls = [\"redis://a\"]\nkey_prefix = \"a{b}\"",
                "shared.key_prefix",
            ),
            (
                "urls = [\"redis://a\"]\nkey_prefix = \"a b\"",
                "shared.key_prefix",
            ),
            (
                "urls = [\"redis://a\"]\nkey_prefix = \"a*\"",
                "shared.key_prefix",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(
                matches!(e, ConfigError::Invalid { key: k, .. } if k == key),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn passwords_never_show() {
        let c = parse("urls = [\"redis://user:hunter2secret@cache:6379/0\"]").unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2secret"), "{dbg}");
        assert!(dbg.contains("cache:6379"), "{dbg}");
        let raw = RawShared::from_toml("urls = [\"redis://user:hunter2secret@cache:6379/0\"]");
        let dbg = format!("{:?}", raw.unwrap());
        assert!(
            !dbg.contains("hunter2secret") && dbg.contains("cache:6379"),
            "{dbg}"
        );
        let e = parse("urls = [\"ftp://user:hunter2secret@cache\"]").unwrap_err();
        assert!(!e.to_string().contains("hunter2secret"), "{e}");
    }

    #[test]
    fn a_redis_url_override_replaces_the_urls_and_takes_the_blame() {
        let file = "[shared]\nurls = [\"redis://a:6379\"]\nkey_prefix = \"gw:\"\n";
        let gw = Some(Path::new("gw.toml"));
        let over = |url: &str| Overrides {
            redis_url: Some(url.to_owned()),
            ..Overrides::default()
        };
        let c = RawConfig::parse(file)
            .unwrap()
            .validate(&over("redis://b:6380"), gw, &key_env)
            .unwrap()
            .shared
            .expect("the tier is on");
        assert_eq!(c.urls, ["redis://b:6380"]);
        assert_eq!(c.key_prefix, "gw:", "the file's other settings still apply");
        // Without a [shared] table the flag alone turns the tier on.
        let c = RawConfig::default()
            .validate(&over("redis://b:6380"), None, &key_env)
            .unwrap();
        assert_eq!(c.shared.expect("the tier is on").urls, ["redis://b:6380"]);

        // A bad URL from the variable is the variable's, not the file's.
        let mut o = over("http://b:6380");
        o.origins.redis_url = "DIFY_GATEWAY_REDIS_URL";
        let e = RawConfig::parse(file)
            .unwrap()
            .validate(&o, gw, &key_env)
            .unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Invalid {
                    key: "DIFY_GATEWAY_REDIS_URL",
                    file: None,
                    ..
                }
            ),
            "{e:?}"
        );
        // The same URL in the file is the file's, at its line and column.
        let e = RawConfig::parse("[shared]\nurls = [\"http://b:6380\"]\n")
            .unwrap()
            .validate(&Overrides::default(), gw, &key_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`shared.urls` in gw.toml: line 2, column 8"),
            "{e}"
        );
        // Other `[shared]` keys stay the file's even with the flag given.
        let e = RawConfig::parse("[shared]\ntimeout = \"0s\"\n")
            .unwrap()
            .validate(&over("redis://b:6380"), gw, &key_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`shared.timeout` in gw.toml: line 2"), "{e}");
    }
}

//! Reloading the configuration while serving (SIGHUP): what changes, what is refused, and the
//! record of it.
//!
//! Invariant: a reload applies whole or not at all. The client table and the app keys (re-read
//! from their variables or files, so a rotated Secret is picked up) change together, and only
//! when the new configuration validates and names the same apps — names, base URLs and key
//! sources — as the running one. Every reload's result is counted in
//! `reloads_total{result}` and the last one is kept for `/admin/reload`; no error text here
//! carries a value from the file (config errors never do, see [`crate::config::TomlError`]).

use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{AppConfig, Config, ConfigError, KeySource};
use crate::metrics::{Metrics, ResultLabel};
use crate::tls::TlsAcceptor;
use crate::upstream::App;
use crate::upstream::UpstreamSetupError;

/// How a reload ended; the `result` label of `reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// Applied.
    Ok,
    /// The file could not be read, parsed or validated; nothing changed.
    InvalidConfig,
    /// The app list changed (added, removed, renamed, moved, or a base URL or key source
    /// changed); nothing changed. App changes need a restart.
    AppsChanged,
    /// The new client list is empty while clients are configured: applying it would open the
    /// gateway to anyone; nothing changed.
    WouldOpen,
    /// The configuration applied but the TLS certificate could not be reloaded; the old one
    /// stays.
    TlsFailed,
}

impl ReloadResult {
    /// Every result, so the counter shows each at zero before it happens.
    pub const ALL: [ReloadResult; 5] = [
        ReloadResult::Ok,
        ReloadResult::InvalidConfig,
        ReloadResult::AppsChanged,
        ReloadResult::WouldOpen,
        ReloadResult::TlsFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::InvalidConfig => "invalid_config",
            ReloadResult::AppsChanged => "apps_changed",
            ReloadResult::WouldOpen => "would_open",
            ReloadResult::TlsFailed => "tls_failed",
        }
    }
}

/// Why a reload was refused or only partly applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("{0}; app changes need a restart")]
    AppsChanged(String),
    #[error("the new configuration has no clients, which would open the gateway to anyone; restart to run open")]
    WouldOpen,
    #[error("app `{app}`: {source}")]
    Key {
        app: String,
        source: UpstreamSetupError,
    },
    #[error("TLS certificate reload failed, the old certificate stays: {0}")]
    Tls(String),
}

impl ReloadError {
    /// The metric label of this failure.
    pub fn result(&self) -> ReloadResult {
        match self {
            ReloadError::Invalid(_) | ReloadError::Key { .. } => ReloadResult::InvalidConfig,
            ReloadError::AppsChanged(_) => ReloadResult::AppsChanged,
            ReloadError::WouldOpen => ReloadResult::WouldOpen,
            ReloadError::Tls(_) => ReloadResult::TlsFailed,
        }
    }
}

/// What an applied reload changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    /// Clients now configured.
    pub clients: usize,
    /// Apps whose key changed and now goes upstream.
    pub keys_rotated: Vec<String>,
    /// Config sections that changed but are not applied until a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The last reload, as `/admin/reload` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    /// Wall-clock time of the reload, seconds since the Unix epoch.
    pub at_unix: u64,
    /// Seconds since the reload.
    pub seconds_ago: u64,
    /// `ok`, `invalid_config`, `apps_changed`, …
    pub result: &'static str,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// What it changed, when it applied.
    pub applied: Option<Applied>,
}

/// `/admin/reload` body.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    /// Reloads since start.
    pub reloads: u64,
    pub last: Option<LastReload>,
}

/// The record of reloads and the sections a reload cannot change.
#[derive(Debug)]
pub struct ReloadLog {
    state: Mutex<State>,
    /// `Debug` text of each section applied only at start, as the running gateway has it.
    restart_only: Vec<(&'static str, String)>,
}

#[derive(Debug, Default)]
struct State {
    count: u64,
    last: Option<(Instant, LastReload)>,
}

impl ReloadLog {
    /// A log for a gateway started with `config`; every result shows in `metrics` at zero.
    pub fn new(config: &Config, metrics: &Metrics) -> ReloadLog {
        for r in ReloadResult::ALL {
            let _ = metrics
                .reloads
                .get_or_create(&ResultLabel { result: r.as_str() });
        }
        ReloadLog {
            state: Mutex::default(),
            restart_only: restart_only(config),
        }
    }

    /// Sections of `config` that differ from the running ones and cannot change without a
    /// restart.
    pub fn needs_restart(&self, config: &Config) -> Vec<&'static str> {
        restart_only(config)
            .into_iter()
            .zip(&self.restart_only)
            .filter(|((_, new), (_, old))| new != old)
            .map(|((name, _), _)| name)
            .collect()
    }

    /// Logs, counts and records one reload's outcome.
    pub fn record(&self, outcome: &Result<Applied, ReloadError>, metrics: &Metrics) {
        let result = match outcome {
            Ok(_) => ReloadResult::Ok,
            Err(e) => e.result(),
        };
        metrics
            .reloads
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
        match outcome {
            Ok(a) => {
                tracing::info!(
                    clients = a.clients,
                    keys_rotated = ?a.keys_rotated,
                    "configuration reloaded"
                );
                if !a.needs_restart.is_empty() {
                    tracing::warn!(sections = ?a.needs_restart, "these sections changed but apply only at the next restart");
                }
            }
            Err(e) => tracing::error!(
                result = result.as_str(),
                error = %e,
                "reload refused; the running configuration stays"
            ),
        }
        let at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = LastReload {
            at_unix,
            seconds_ago: 0,
            result: match outcome {
                Ok(_) => ReloadResult::Ok.as_str(),
                Err(e) => e.result().as_str(),
            },
            error: outcome.as_ref().err().map(ToString::to_string),
            applied: outcome.as_ref().ok().cloned(),
        };
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.count += 1;
        s.last = Some((Instant::now(), last));
    }

    /// The count and the last reload.
    pub fn report(&self) -> ReloadReport {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        ReloadReport {
            reloads: s.count,
            last: s.last.as_ref().map(|(at, l)| LastReload {
                seconds_ago: at.elapsed().as_secs(),
                ..l.clone()
            }),
        }
    }
}

/// `outcome` once the TLS certificate is reloaded too: its failure fails an applied reload. The
/// certificate is reloaded whatever the configuration's fate (it rotates on its own schedule).
pub fn with_tls(
    outcome: Result<Applied, ReloadError>,
    tls: Option<&TlsAcceptor>,
) -> Result<Applied, ReloadError> {
    let Some(tls) = tls else {
        return outcome;
    };
    match (tls.reload(), outcome) {
        (Ok(()), o) => {
            tracing::info!("reloaded the TLS certificate");
            o
        }
        (Err(e), Ok(_)) => Err(ReloadError::Tls(e.to_string())),
        (Err(e), o) => {
            tracing::error!(error = %e, "TLS reload failed; keeping the old certificate");
            o
        }
    }
}

/// The sections a reload does not apply, by name, as `Debug` text (which never shows a secret)
/// followed, for sections that hold one, by a digest of the secret: a change of only the admin
/// token or only a Redis password is still a change. The text is compared, never shown.
fn restart_only(c: &Config) -> Vec<(&'static str, String)> {
    use secrecy::ExposeSecret;
    let admin_token = c.admin.token.as_ref().map(|t| t.expose_secret());
    let shared_urls = c
        .shared
        .iter()
        .flat_map(|s| s.urls.iter().map(String::as_str));
    vec![
        ("server", format!("{:?}", c.server)),
        ("upstream", format!("{:?}", c.upstream)),
        ("cache", format!("{:?}", c.cache)),
        ("log", format!("{:?}", c.log)),
        (
            "admin",
            format!("{:?} {}", c.admin, secret_digest(admin_token.into_iter())),
        ),
        (
            "shared",
            format!("{:?} {}", c.shared, secret_digest(shared_urls)),
        ),
        ("stream", format!("{:?}", c.stream)),
        ("ownership", format!("{:?}", c.ownership)),
    ]
}

/// SHA-256 of `parts`, each length-prefixed, in hex: equal for equal secrets, and nothing of a
/// secret can be read back from it.
fn secret_digest<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    format!("{:x}", h.finalize())
}

/// `Err` with what changed when `new` does not name the same apps as `running`, in the same
/// order, with the same base URLs and key sources. The keys themselves may differ.
pub fn check_apps(running: &[std::sync::Arc<App>], new: &[AppConfig]) -> Result<(), ReloadError> {
    let changed = |what: String| Err(ReloadError::AppsChanged(what));
    for (i, a) in running.iter().enumerate() {
        let Some(n) = new.get(i) else {
            return changed(format!("app `{}` was removed", a.name));
        };
        if n.name != a.name {
            return changed(format!(
                "app `{}` was replaced or renamed (now `{}` in its place)",
                a.name, n.name
            ));
        }
        if n.base_url != a.base_url {
            return changed(format!("the base_url of app `{}` changed", a.name));
        }
        if n.key_source != a.key_source {
            return changed(format!(
                "the key source of app `{}` changed (was {}, now {})",
                a.name,
                describe(&a.key_source),
                describe(&n.key_source)
            ));
        }
    }
    match new.get(running.len()) {
        Some(n) => changed(format!("app `{}` was added", n.name)),
        None => Ok(()),
    }
}

/// A key source in words (a variable name or a path; never the key).
fn describe(s: &KeySource) -> String {
    match s {
        KeySource::Env(var) => format!("variable {var}"),
        KeySource::File(path) => format!("file {}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_have_distinct_words() {
        let words: std::collections::HashSet<_> =
            ReloadResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(words.len(), ReloadResult::ALL.len());
    }

    fn config(toml: &str, admin_token: &str) -> Config {
        let token = admin_token.to_owned();
        crate::config::RawConfig::from_toml(toml)
            .unwrap()
            .validate(
                &crate::config::Overrides::default(),
                None,
                &move |name| match name {
                    crate::config::API_KEY_ENV => Some("app-reloadtestkey".to_owned()),
                    crate::config::ADMIN_TOKEN_ENV => Some(token.clone()),
                    _ => None,
                },
            )
            .unwrap()
    }

    #[test]
    fn a_change_of_only_a_secret_needs_a_restart() {
        let metrics = Metrics::new();
        let shared = |pw: &str| format!("[shared]\nurls = [\"redis://:{pw}@127.0.0.1:6379\"]\n");
        let running = config(&shared("first-password"), "admin-token-number-one");
        let log = ReloadLog::new(&running, &metrics);
        assert!(log.needs_restart(&running).is_empty());
        let new_password = config(&shared("second-password"), "admin-token-number-one");
        assert_eq!(log.needs_restart(&new_password), vec!["shared"]);
        let new_token = config(&shared("first-password"), "admin-token-number-two");
        assert_eq!(log.needs_restart(&new_token), vec!["admin"]);
    }
}

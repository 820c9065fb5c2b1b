//! The Dify apps the gateway fronts, each with its own key and upstream client.
//!
//! Invariant: an app's identity in every cache key is its [`AppId`], and its identity across
//! replicas (the shared tier) is its `tag` — a fingerprint of its upstream URL and key that
//! reveals neither — so two apps never share a cache entry, whatever their names. When its key
//! rotates (reload), the new key and its tag are installed together, as a restart would have
//! them; a request already in flight finishes with the key it started with.

use std::borrow::Cow;
use std::sync::Arc;

use http::Uri;
use prometheus_client::metrics::gauge::Gauge;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::config::{AppConfig, KeySource, UpstreamConfig};

use super::breaker::CircuitBreaker;
use super::{Credentials, Upstream, UpstreamSetupError};

/// Which configured app: its index in the app table. Dify scopes runs to the key's app, so the
/// app is part of every cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId(pub u32);

/// One configured app.
#[derive(Debug)]
pub struct App {
    /// Index in the app table; part of every in-process cache key.
    pub id: AppId,
    /// Configured name, for logs, metrics and the admin API.
    pub name: Cow<'static, str>,
    /// The upstream base URL, as configured.
    pub base_url: Uri,
    /// Where the key is read from; a reload may re-read it, never move it.
    pub key_source: KeySource,
    /// The pooled client carrying this app's key.
    pub upstream: Upstream,
    /// Fails fast while this app's upstream keeps failing.
    pub breaker: CircuitBreaker,
}

impl App {
    /// Builds an app from its settings and the shared upstream settings; its breaker counts
    /// itself in `circuit_open` while open.
    pub fn new(
        id: AppId,
        app: &AppConfig,
        cfg: &UpstreamConfig,
        circuit_open: &Gauge,
    ) -> Result<App, UpstreamSetupError> {
        Ok(App {
            id,
            name: Cow::Owned(app.name.clone()),
            base_url: app.base_url.clone(),
            key_source: app.key_source.clone(),
            upstream: Upstream::new(cfg, app)?,
            breaker: CircuitBreaker::new(
                cfg.circuit_failure_threshold,
                cfg.circuit_cooldown,
                circuit_open.clone(),
            ),
        })
    }

    /// The key and cross-replica identity in use now, as one pair (see [`fingerprint`]). A
    /// fetch loads it once and uses it for its shared-tier keys and every upstream attempt.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.upstream.credentials()
    }

    /// The current cross-replica identity (see [`fingerprint`]).
    pub fn tag(&self) -> String {
        self.credentials().tag.clone()
    }

    /// The key `app` now holds, ready to install, or `None` when it is the key in use. Fails
    /// before anything changes, so a reload can check every app first.
    pub fn prepare_key(&self, app: &AppConfig) -> Result<Option<NewKey>, UpstreamSetupError> {
        let credentials = Credentials::new(&self.base_url.to_string(), &app.api_key)?;
        if self.credentials().tag == credentials.tag {
            return Ok(None);
        }
        Ok(Some(NewKey(credentials)))
    }

    /// Installs a key from [`App::prepare_key`]: the next exchange carries it.
    pub fn install_key(&self, key: NewKey) {
        self.upstream.set_credentials(key.0);
    }
}

/// A rotated key and its tag, checked and ready to install.
#[derive(Debug)]
pub struct NewKey(Credentials);

/// The app fingerprint (see [`App::tag`]).
pub fn fingerprint(base_url: &str, key: &SecretString) -> String {
    let mut h = Sha256::new();
    h.update(b"dify-gateway app\0");
    h.update(base_url.trim_end_matches('/').as_bytes());
    h.update(b"\0");
    h.update(key.expose_secret().as_bytes());
    let d = h.finalize();
    crate::clients::hex(&d[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_key_and_url_and_hide_the_key() {
        let k1 = SecretString::from("app-one-secret");
        let k2 = SecretString::from("app-two-secret");
        let a = fingerprint("https://api.dify.ai/v1", &k1);
        assert_eq!(a.len(), 24);
        assert_eq!(a, fingerprint("https://api.dify.ai/v1/", &k1));
        assert_ne!(a, fingerprint("https://api.dify.ai/v1", &k2));
        assert_ne!(a, fingerprint("http://dify.local/v1", &k1));
        assert!(!a.contains("secret"));
    }
}

//! Clients of the gateway and the tokens they present.
//!
//! Invariant: a client token is never stored or logged; it is hashed with SHA-256 on arrival
//! and only the digest is looked up, so the lookup's timing depends on a digest the caller
//! cannot steer, not on how much of a real token it guessed. A client reaches only the app its
//! configuration names.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use prometheus_client::metrics::counter::Counter;

use crate::config::ClientConfig;
use crate::metrics::{ClientLabel, Metrics};
use crate::rewrite::UserPrefix;

/// One configured client.
pub struct Client {
    /// Its configured name (a metric label and log field).
    pub name: Cow<'static, str>,
    /// Index of the app it may use.
    pub app: usize,
    /// Its token's digest, compared once more in constant time after the lookup.
    digest: [u8; 32],
    /// Its token bucket, when it has a rate limit.
    limiter: Option<DefaultDirectRateLimiter>,
    /// May read the app's run logs, which list every client's runs, while the app isolates
    /// clients (`read_app_logs`).
    pub read_app_logs: bool,
    /// Its hit counter, resolved once (see [`Metrics::client_hit_counter`]).
    pub hit_requests: Counter,
    /// The upstream slots its fetches may hold at once (its fair share, taken before the global
    /// cap); `None` when it may use them all.
    pub(crate) upstream_share: Option<Semaphore>,
    /// Its requests that may be held at once (`[[clients]] max_waiters`); `None`: only the
    /// global cap.
    pub(crate) waiters: Option<Arc<Semaphore>>,
    /// Put before each end-user id the client sends upstream (`[[clients]] user_prefix`).
    pub user_prefix: Option<UserPrefix>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Its label and hit counter, for the request counters.
    pub fn label(&self) -> ClientLabel<'_> {
        ClientLabel {
            name: &self.name,
            hits: &self.hit_requests,
        }
    }

    /// `Ok` when the request may proceed; otherwise how long until it may.
    pub fn check_rate(&self) -> Result<(), Duration> {
        match &self.limiter {
            None => Ok(()),
            Some(l) => l
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that belongs to no client.
    Unknown,
}

impl AuthFailure {
    /// Label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_token",
            AuthFailure::Unknown => "unknown_token",
        }
    }
}

/// The clients, looked up by token digest.
#[derive(Debug, Default)]
pub struct ClientTable {
    by_digest: HashMap<[u8; 32], Arc<Client>>,
}

impl ClientTable {
    /// The table of `clients`, each allowed `upstream_share` upstream slots at once (`None`:
    /// no per-client limit under the global cap).
    pub fn new(
        clients: &[ClientConfig],
        upstream_share: Option<usize>,
        metrics: &Metrics,
    ) -> ClientTable {
        let by_digest = clients
            .iter()
            .map(|c| {
                let limiter = c.rate.map(|r| {
                    RateLimiter::direct(Quota::per_second(r.per_second).allow_burst(r.burst))
                });
                let name: Cow<'static, str> = Cow::Owned(c.name.clone());
                let client = Client {
                    hit_requests: metrics.client_hit_counter(name.clone()),
                    name,
                    app: c.app,
                    digest: c.token_sha256,
                    limiter,
                    read_app_logs: c.read_app_logs,
                    upstream_share: upstream_share.map(Semaphore::new),
                    waiters: c.max_waiters.map(|n| Arc::new(Semaphore::new(n))),
                    user_prefix: c.user_prefix.clone(),
                };
                (c.token_sha256, Arc::new(client))
            })
            .collect();
        ClientTable { by_digest }
    }

    /// No clients configured: every request is let in and goes to the default app.
    pub fn is_open(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// True when there are no clients.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The client whose token the request carries as `Authorization: Bearer <token>`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Client>, AuthFailure> {
        let token = bearer_token(headers).ok_or(AuthFailure::Missing)?;
        let digest: [u8; 32] = Sha256::digest(token).into();
        match self.by_digest.get(&digest) {
            Some(c) if bool::from(c.digest.ct_eq(&digest)) => Ok(Arc::clone(c)),
            _ => Err(AuthFailure::Unknown),
        }
    }
}

/// The credential of `Authorization: Bearer <credential>` (scheme in any letter case).
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let b = headers.get(AUTHORIZATION)?.as_bytes();
    (b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &b[7..])
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a token, as hex (the form the config stores).
pub fn token_sha256_hex(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A new random client token: `dgw_` and 32 random bytes in hex, from the OS generator.
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!("dgw_{}", hex(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;
    use http::HeaderValue;
    use std::num::NonZeroU32;

    fn table(rate: Option<RateLimit>) -> (ClientTable, String) {
        let token = generate_token().unwrap();
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&Sha256::digest(token.as_bytes()));
        let t = ClientTable::new(
            &[ClientConfig {
                name: "team-a".into(),
                token_sha256: digest,
                app: 0,
                rate,
                starts: Default::default(),
                read_app_logs: false,
                quota: Default::default(),
                webhook: None,
                max_waiters: None,
                user_prefix: None,
            }],
            None,
            &Metrics::new(),
        );
        (t, token)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[test]
    fn tokens_map_to_their_client_only() {
        let (t, token) = table(None);
        assert_eq!(t.authenticate(&bearer(&token)).unwrap().name, "team-a");
        assert_eq!(
            t.authenticate(&bearer("dgw_wrong")).unwrap_err(),
            AuthFailure::Unknown
        );
        assert_eq!(
            t.authenticate(&HeaderMap::new()).unwrap_err(),
            AuthFailure::Missing
        );
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(t.authenticate(&basic).unwrap_err(), AuthFailure::Missing);
        assert!(!format!("{:?}", t.authenticate(&bearer(&token)).unwrap()).contains(&token));
    }

    #[test]
    fn generated_tokens_are_random_and_hash_as_configured() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(token_sha256_hex(&a).len(), 64);
    }

    #[test]
    fn rate_limit_allows_the_burst_then_refuses() {
        let rate = RateLimit {
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
        };
        let (t, token) = table(Some(rate));
        let c = t.authenticate(&bearer(&token)).unwrap();
        for _ in 0..3 {
            assert!(c.check_rate().is_ok());
        }
        let wait = c.check_rate().unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
    }
}

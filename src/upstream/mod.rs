//! The upstream: Dify's API, reached with each app's key through one pooled HTTP/1.1 + HTTP/2
//! client per app over rustls, behind each app's circuit breaker, under the shared upstream
//! slots, with retries of transient failures.
//!
//! Invariant: the app keys are read here and nowhere else — from [`AppConfig`] into the
//! `Authorization` header of an upstream request, marked sensitive, and into the app's
//! [`fingerprint`]; nothing from the client's request except the validated run id (and a
//! validated request id) is sent upstream. Only an answer the gateway can read as sent is
//! accepted: a final status (never 1xx) and no content coding (`Accept-Encoding: identity` is
//! asked for); anything else is [`UpstreamError::BadResponse`]. This module knows no client
//! request and no cache: it answers with the upstream's status, headers and body, and what of
//! them is kept is the cache's business.

mod app;
mod breaker;
mod connect;
mod error;
mod inline;
mod retry;
mod slots;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING,
    CONTENT_LENGTH, TRANSFER_ENCODING, USER_AGENT,
};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{AppConfig, Config, UpstreamConfig};
use crate::metrics::Metrics;
use crate::run_id::RunId;

pub use app::{fingerprint, App, AppId, NewKey};
pub use breaker::{CircuitBreaker, Refused};
pub use error::{ConnectCause, UpstreamError};
pub use retry::{jitter, retry_after, RetryPolicy};
pub(crate) use slots::client_share_slots;

use connect::classify_client_error;
pub use inline::UpstreamBody;
use inline::{InlinePool, Rebuild as _, Sent};
use slots::UpstreamSlots;

/// `X-Version`, Dify's API version header, kept and forwarded.
pub static X_VERSION: HeaderName = HeaderName::from_static("x-version");
/// `X-Env`, Dify's deployment header, kept and forwarded.
pub static X_ENV: HeaderName = HeaderName::from_static("x-env");
/// `X-Request-Id`, forwarded so upstream logs can be matched.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot load CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the upstream API key cannot be sent as a header")]
    BadKey,
}

/// What came back from one upstream exchange: the answer as sent.
#[derive(Debug)]
pub struct UpstreamAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl UpstreamAnswer {
    /// Worth another attempt: 429, 502, 503 and 504 say "not now" rather than "no".
    pub fn retryable(&self) -> bool {
        matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        )
    }

    /// A sign of an unhealthy upstream for its circuit breaker: a 5xx. Answers the upstream
    /// chose to give (2xx, 4xx incl. 429) are not.
    pub fn is_failure(&self) -> bool {
        self.status.is_server_error()
    }
}

/// Every configured app's upstream, and what their fetches share: the slots under the global
/// cap and the retry policy. A run is fetched through [`Upstreams::fetch_run`].
pub struct Upstreams {
    /// The apps, indexed by [`AppId`]; the first is the default app.
    apps: Vec<Arc<App>>,
    /// Upstream exchanges in flight: the global cap and each app's share (each client's share
    /// is a semaphore its client carries, handed in per fetch).
    slots: UpstreamSlots,
    /// Retries of transient failures.
    retry: RetryPolicy,
    /// Deadline of one fetch, retries included.
    total_timeout: Duration,
    /// Attempts, retries and refusals are counted here.
    metrics: Arc<Metrics>,
}

impl Upstreams {
    /// The apps of validated `config`, each with its client and its breaker (which reports to
    /// `metrics`' `upstream_circuit_open`).
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Result<Upstreams, UpstreamSetupError> {
        let apps = config
            .apps
            .iter()
            .enumerate()
            .map(|(i, a)| {
                App::new(AppId(i as u32), a, &config.upstream, &metrics.circuit_open).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Upstreams {
            apps,
            slots: UpstreamSlots::new(&config.upstream, config.apps.len()),
            retry: RetryPolicy::new(&config.upstream.retry),
            total_timeout: config.upstream.total_timeout,
            metrics: Arc::clone(metrics),
        })
    }

    /// The apps, the default first.
    pub fn apps(&self) -> &[Arc<App>] {
        &self.apps
    }
}

/// A pooled client bound to one upstream base URL and key.
#[derive(Clone)]
pub struct Upstream {
    /// Run-detail and other GETs over HTTP/1.1: connections driven by the requests using them.
    /// Passed-through requests too (their bodies stream): the answer's reader drives them.
    inline: Option<InlinePool>,
    /// Run-detail GETs when the upstream speaks HTTP/2 (or the base has no authority to dial).
    client: Client<HttpsConnector<HttpConnector>, PassBody>,
    /// Passed-through requests then: a pool (so an HTTP/2 connection) of their own, so long
    /// streams filling a connection's concurrent-stream limit or flow-control window never
    /// queue the run-detail GETs behind them.
    pass_client: Client<HttpsConnector<HttpConnector>, PassBody>,
    /// `scheme://authority/path` of the base, without a trailing slash.
    base: Arc<str>,
    /// The key and its tag, swapped together when the key rotates; a fetch loads them once
    /// ([`Upstream::credentials`]) and carries that pair through every attempt, so a request in
    /// flight finishes with the key it started with and its answer is filed under that key's tag.
    credentials: Arc<ArcSwap<Credentials>>,
    user_agent: HeaderValue,
    total_timeout: Duration,
    max_body_bytes: usize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("authorization", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// An app's key as the upstream sees it (`Bearer <key>`, a sensitive header value that never
/// appears in `Debug` output or HPACK tables) and its cross-replica tag (see
/// [`app::fingerprint`]): always the pair of one key.
pub struct Credentials {
    /// The tag of this key: shared-tier entries fetched with it are filed under it.
    pub tag: String,
    authorization: HeaderValue,
}

impl Credentials {
    /// The pair for `key` at `base_url`.
    pub fn new(base_url: &str, key: &SecretString) -> Result<Credentials, UpstreamSetupError> {
        Ok(Credentials {
            tag: app::fingerprint(base_url, key),
            authorization: authorization(key)?,
        })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tag", &self.tag)
            .field("authorization", &"[REDACTED]")
            .finish()
    }
}

/// The crypto provider, named once: `ring`.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Upstream {
    /// Builds the client for one app: web PKI roots plus the optional CA file, HTTP/1.1 and
    /// HTTP/2 by ALPN, the app's key in a sensitive header value.
    pub fn new(cfg: &UpstreamConfig, app: &AppConfig) -> Result<Upstream, UpstreamSetupError> {
        let credentials = Credentials::new(&app.base_url.to_string(), &app.api_key)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            let ca_err = |message: String| UpstreamSetupError::CaFile {
                path: path.display().to_string(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no certificates found".into()));
            }
            for c in certs {
                roots.add(c)?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host);
        let inline = InlinePool::new(
            connector.clone(),
            &app.base_url,
            cfg.pool_max_idle_per_host,
            cfg.pool_idle_timeout,
        );
        if inline.is_some() {
            // The multiplexing clients serve only an upstream the pool found speaking HTTP/2:
            // told so, each dials one connection however many requests arrive at once.
            builder.http2_only(true);
        }
        let client = builder.build(connector.clone());
        let pass_client = builder.build(connector);

        Ok(Upstream {
            inline,
            client,
            pass_client,
            base: app.base_url.to_string().trim_end_matches('/').into(),
            credentials: Arc::new(ArcSwap::from_pointee(credentials)),
            user_agent: HeaderValue::from_static(concat!(
                "dify-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
            total_timeout: cfg.total_timeout,
            max_body_bytes: cfg.max_body_bytes,
        })
    }

    /// From now on, exchanges that did not load their credentials yet carry `credentials`.
    pub fn set_credentials(&self, credentials: Credentials) {
        self.credentials.store(Arc::new(credentials));
    }

    /// The key and tag in use now; load them once per fetch and pass them to every attempt.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.load_full()
    }

    /// The run-detail URL for `run`.
    pub fn run_url(&self, run: RunId) -> Result<Uri, UpstreamError> {
        const PATH: &str = "/workflows/run/";
        let mut buf = [0u8; 36];
        let id = run.encode(&mut buf);
        // One buffer, handed to the `Uri` without a copy: this is on every fetch.
        let mut url = Vec::with_capacity(self.base.len() + PATH.len() + id.len());
        url.extend_from_slice(self.base.as_bytes());
        url.extend_from_slice(PATH.as_bytes());
        url.extend_from_slice(id.as_bytes());
        Uri::try_from(url).map_err(|_| UpstreamError::Url)
    }

    /// `base` + `path` (path starting with `/`).
    pub fn path_url(&self, path: &str) -> Result<Uri, UpstreamError> {
        format!("{}{path}", self.base)
            .parse()
            .map_err(|_| UpstreamError::Url)
    }

    /// Fetches one run's detail: head and whole body before `deadline`, body capped.
    pub async fn fetch_run(
        &self,
        run: RunId,
        request_id: Option<&HeaderValue>,
        deadline: Instant,
        credentials: &Credentials,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        let uri = self.run_url(run)?;
        self.exchange_until(uri, request_id, deadline, credentials)
            .await
    }

    /// The deadline of an exchange starting now: `upstream.total_timeout` away.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.total_timeout
    }

    /// One GET with the app key, within the total timeout from now.
    pub async fn get(
        &self,
        uri: Uri,
        request_id: Option<&HeaderValue>,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        self.get_until(uri, request_id, self.deadline()).await
    }

    /// One GET with the app key in use now, abandoned at `deadline`.
    pub async fn get_until(
        &self,
        uri: Uri,
        request_id: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        let credentials = self.credentials();
        self.exchange_until(uri, request_id, deadline, &credentials)
            .await
    }

    /// One GET with `credentials`, abandoned at `deadline` (a fetch's retries share one).
    async fn exchange_until(
        &self,
        uri: Uri,
        request_id: Option<&HeaderValue>,
        deadline: Instant,
        credentials: &Credentials,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        let exchange = self.exchange(uri, request_id, credentials);
        match tokio::time::timeout_at(deadline.into(), exchange).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    async fn exchange(
        &self,
        uri: Uri,
        request_id: Option<&HeaderValue>,
        credentials: &Credentials,
    ) -> Result<UpstreamAnswer, UpstreamError> {
        let request = RunGet {
            uri,
            request_id: request_id.cloned(),
            authorization: credentials.authorization.clone(),
            user_agent: self.user_agent.clone(),
        };
        let (resp, mut lease) = match &self.inline {
            // A GET: rebuilt and sent again if a reused connection closes before answering.
            Some(pool) => match pool
                .send(request.build(), Some(&request), &self.base)
                .await?
            {
                Sent::Answer(resp, lease) => (resp, Some(lease)),
                Sent::Multiplexed(req) => (self.multiplexed(req).await?, None),
            },
            None => (self.multiplexed(request.build()).await?, None),
        };
        let (parts, body) = resp.into_parts();
        if parts.status.is_informational() {
            // Interim answers are consumed by hyper; one that arrives as the final answer
            // (a 101 to a request that asked for no upgrade) carries no run.
            tracing::warn!(
                status = parts.status.as_u16(),
                "upstream gave an interim (1xx) status as its final answer"
            );
            return Err(UpstreamError::BadResponse);
        }
        if let Some(coding) = unasked_coding(&parts.headers) {
            tracing::warn!(
                coding,
                "upstream answered with a coding despite Accept-Encoding: identity; not passed on"
            );
            return Err(UpstreamError::BadResponse);
        }
        if let Some(len) = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > self.max_body_bytes as u64 {
                return Err(UpstreamError::BodyTooLarge);
            }
        }
        let collect = Limited::new(body, self.max_body_bytes).collect();
        let collected = match lease.as_mut() {
            Some(lease) => lease.drive(collect).await.map_err(|_| {
                tracing::debug!("upstream connection ended inside an answer's body");
                UpstreamError::Protocol
            })?,
            None => collect.await,
        };
        let body = collected
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    UpstreamError::BodyTooLarge
                } else {
                    UpstreamError::Protocol
                }
            })?
            .to_bytes();
        if let Some(lease) = lease {
            lease.release();
        }
        Ok(UpstreamAnswer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// A run-detail (or other) GET with the app key: built once, and again if it must be resent.
struct RunGet {
    uri: Uri,
    request_id: Option<HeaderValue>,
    authorization: HeaderValue,
    user_agent: HeaderValue,
}

impl inline::Rebuild for RunGet {
    fn build(&self) -> Request<PassBody> {
        // An empty body, boxed: zero-sized, so no allocation.
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.reserve(5);
        h.insert(AUTHORIZATION, self.authorization.clone());
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        // Bodies are cached and served as received, to clients that negotiated nothing.
        h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        h.insert(USER_AGENT, self.user_agent.clone());
        if let Some(id) = &self.request_id {
            h.insert(X_REQUEST_ID.clone(), id.clone());
        }
        req
    }
}

impl Upstream {
    /// A passed-through request through the passthroughs' multiplexing client.
    async fn pass_multiplexed(
        &self,
        req: Request<PassBody>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let resp = self
            .pass_client
            .request(req)
            .await
            .map_err(|e| classify_client_error(e, &self.base))?;
        Ok(resp.map(UpstreamBody::from))
    }

    /// A GET through the multiplexing client.
    async fn multiplexed(
        &self,
        req: Request<PassBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        self.client
            .request(req)
            .await
            .map_err(|e| classify_client_error(e, &self.base))
    }
}

/// The body of a passed-through request: buffered or streamed, see [`crate::passthrough`].
pub type PassBody = http_body_util::combinators::UnsyncBoxBody<Bytes, crate::body::BodyError>;

impl Upstream {
    /// Sends a passed-through request: `path_and_query` (starting with `/`, relative to the
    /// app's base URL) with the caller's filtered headers, plus the app key in use now, the
    /// gateway's `User-Agent` and `Accept-Encoding: identity`. Returns once the answer's head is
    /// in; its body streams. No retry and no deadline here: the caller owns both.
    pub async fn pass(
        &self,
        mut req: Request<PassBody>,
        path_and_query: &str,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        *req.uri_mut() = self.path_url(path_and_query)?;
        let credentials = self.credentials();
        let h = req.headers_mut();
        h.insert(AUTHORIZATION, credentials.authorization.clone());
        h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        h.insert(USER_AGENT, self.user_agent.clone());
        // Not sent again once the upstream may have read it: it need not be idempotent.
        let resp = match &self.inline {
            Some(pool) => match pool.send(req, None::<&inline::Once>, &self.base).await? {
                Sent::Answer(resp, lease) => resp.map(|body| UpstreamBody::leased(body, lease)),
                Sent::Multiplexed(req) => self.pass_multiplexed(req).await?,
            },
            None => self.pass_multiplexed(req).await?,
        };
        if resp.status().is_informational() {
            return Err(UpstreamError::BadResponse);
        }
        if unasked_coding(resp.headers()).is_some() {
            return Err(UpstreamError::BadResponse);
        }
        Ok(resp)
    }
}

/// The `Authorization` value for `key`, marked sensitive.
pub fn authorization(key: &SecretString) -> Result<HeaderValue, UpstreamSetupError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
        .map_err(|_| UpstreamSetupError::BadKey)?;
    v.set_sensitive(true);
    Ok(v)
}

/// The first content or transfer coding of an answer that is not the identity (or chunked
/// framing, which hyper removes), cut to 32 bytes for the log.
fn unasked_coding(h: &HeaderMap) -> Option<&str> {
    let codings = h
        .get_all(CONTENT_ENCODING)
        .iter()
        .chain(h.get_all(TRANSFER_ENCODING));
    codings
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .find(|c| {
            !c.is_empty()
                && !c.eq_ignore_ascii_case(b"identity")
                && !c.eq_ignore_ascii_case(b"chunked")
        })
        .map(|c| std::str::from_utf8(&c[..c.len().min(32)]).unwrap_or("(not text)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer of status `code`, no headers and no body.
    pub(super) fn answer(code: u16) -> Result<UpstreamAnswer, UpstreamError> {
        Ok(UpstreamAnswer {
            status: StatusCode::from_u16(code).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        })
    }

    #[test]
    fn the_run_url_is_the_base_and_the_canonical_id() {
        let cfg = Config::for_upstream("https://dify.example:8443/prefix/v1/", "app-k").unwrap();
        let up = Upstream::new(&cfg.upstream, &cfg.apps[0]).unwrap();
        let run = RunId::parse("5B4C0A53-2C4F-4F63-9F5E-8D7F2A1B3C4D").unwrap();
        let url = up.run_url(run).unwrap();
        assert_eq!(
            url.to_string(),
            "https://dify.example:8443/prefix/v1/workflows/run/5b4c0a53-2c4f-4f63-9f5e-8d7f2a1b3c4d"
        );
        assert_eq!(url.authority().unwrap().as_str(), "dify.example:8443");
    }

    #[test]
    fn only_the_identity_and_chunked_framing_are_accepted() {
        let mut h = HeaderMap::new();
        assert_eq!(unasked_coding(&h), None);
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("Identity"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(unasked_coding(&h), None);
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(unasked_coding(&h), Some("gzip"));
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("br, chunked"));
        assert_eq!(unasked_coding(&h), Some("br"));
    }
}

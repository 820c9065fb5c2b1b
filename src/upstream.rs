//! The client side: one pooled HTTP/1.1 + HTTP/2 client to Dify over rustls.
//!
//! Invariant: the upstream key is read from [`UpstreamConfig`] and written only into the
//! `Authorization` header of an upstream request, marked sensitive; nothing from the client's
//! request except the validated run id (and a validated request id) is sent upstream.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
    USER_AGENT,
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

use crate::cache::KeptHeaders;
use crate::config::{AppConfig, UpstreamConfig};
use crate::error::GatewayError;
use crate::run_id::RunId;

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

/// What came back from one upstream exchange.
#[derive(Debug)]
pub struct UpstreamAnswer {
    pub status: StatusCode,
    pub headers: KeptHeaders,
    pub body: Bytes,
}

/// A pooled client bound to one upstream base URL and key.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// `scheme://authority/path` of the base, without a trailing slash.
    base: Arc<str>,
    /// `Bearer <key>`, marked sensitive so it never appears in `Debug` output or HPACK tables.
    /// Swapped whole when the key rotates; an exchange copies it once, so a request in flight
    /// finishes with the key it started with.
    authorization: Arc<ArcSwap<HeaderValue>>,
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

/// The crypto provider, named once: `ring`.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Upstream {
    /// Builds the client for one app: web PKI roots plus the optional CA file, HTTP/1.1 and
    /// HTTP/2 by ALPN, the app's key in a sensitive header value.
    pub fn new(cfg: &UpstreamConfig, app: &AppConfig) -> Result<Upstream, UpstreamSetupError> {
        let authorization = authorization(&app.api_key)?;
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
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(connector);

        Ok(Upstream {
            client,
            base: app.base_url.to_string().trim_end_matches('/').into(),
            authorization: Arc::new(ArcSwap::from_pointee(authorization)),
            user_agent: HeaderValue::from_static(concat!(
                "dify-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
            total_timeout: cfg.total_timeout,
            max_body_bytes: cfg.max_body_bytes,
        })
    }

    /// From now on, exchanges carry `authorization` (see [`authorization`]).
    pub fn set_authorization(&self, authorization: HeaderValue) {
        self.authorization.store(Arc::new(authorization));
    }

    /// The run-detail URL for `run`.
    pub fn run_url(&self, run: RunId) -> Result<Uri, GatewayError> {
        let mut buf = [0u8; 36];
        self.path_url(&format!("/workflows/run/{}", run.encode(&mut buf)))
    }

    /// `base` + `path` (path starting with `/`).
    pub fn path_url(&self, path: &str) -> Result<Uri, GatewayError> {
        format!("{}{path}", self.base)
            .parse()
            .map_err(|_| GatewayError::Internal)
    }

    /// Fetches one run's detail: head and whole body before `deadline`, body capped.
    pub async fn fetch_run(
        &self,
        run: RunId,
        request_id: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Result<UpstreamAnswer, GatewayError> {
        let uri = self.run_url(run)?;
        self.get_until(uri, request_id, deadline).await
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
    ) -> Result<UpstreamAnswer, GatewayError> {
        self.get_until(uri, request_id, self.deadline()).await
    }

    /// One GET with the app key, abandoned at `deadline` (a fetch's retries share one).
    pub async fn get_until(
        &self,
        uri: Uri,
        request_id: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Result<UpstreamAnswer, GatewayError> {
        match tokio::time::timeout_at(deadline.into(), self.exchange(uri, request_id)).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::UpstreamTimeout),
        }
    }

    async fn exchange(
        &self,
        uri: Uri,
        request_id: Option<&HeaderValue>,
    ) -> Result<UpstreamAnswer, GatewayError> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(
            AUTHORIZATION,
            HeaderValue::clone(&self.authorization.load()),
        );
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        h.insert(USER_AGENT, self.user_agent.clone());
        if let Some(id) = request_id {
            h.insert(X_REQUEST_ID.clone(), id.clone());
        }
        let resp = self
            .client
            .request(req)
            .await
            .map_err(classify_client_error)?;
        let (parts, body) = resp.into_parts();
        if let Some(len) = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > self.max_body_bytes as u64 {
                return Err(GatewayError::UpstreamBodyTooLarge);
            }
        }
        let body = Limited::new(body, self.max_body_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    GatewayError::UpstreamBodyTooLarge
                } else {
                    GatewayError::UpstreamProtocol
                }
            })?
            .to_bytes();
        let keep = |name: &HeaderName| parts.headers.get(name).cloned();
        Ok(UpstreamAnswer {
            status: parts.status,
            headers: KeptHeaders {
                content_type: keep(&CONTENT_TYPE),
                x_version: keep(&X_VERSION),
                x_env: keep(&X_ENV),
                retry_after: keep(&RETRY_AFTER),
            },
            body,
        })
    }
}

/// The `Authorization` value for `key`, marked sensitive.
pub fn authorization(key: &SecretString) -> Result<HeaderValue, UpstreamSetupError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
        .map_err(|_| UpstreamSetupError::BadKey)?;
    v.set_sensitive(true);
    Ok(v)
}

/// Maps a client error to the gateway's vocabulary without carrying its text along.
fn classify_client_error(e: hyper_util::client::legacy::Error) -> GatewayError {
    if e.is_connect() {
        let mut src: Option<&(dyn StdError + 'static)> = e.source();
        while let Some(s) = src {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::TimedOut {
                    return GatewayError::UpstreamTimeout;
                }
            }
            src = s.source();
        }
        tracing::debug!(error = %e, "upstream connect failed");
        GatewayError::UpstreamConnect
    } else {
        tracing::debug!(error = %e, "upstream exchange failed");
        GatewayError::UpstreamProtocol
    }
}

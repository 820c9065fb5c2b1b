//! The client side: one pooled HTTP/1.1 + HTTP/2 client to Dify over rustls.
//!
//! Invariant: the upstream key is read from [`UpstreamConfig`] and written only into the
//! `Authorization` header of an upstream request, marked sensitive; nothing from the client's
//! request except the validated run id (and a validated request id) is sent upstream. Only an
//! answer the gateway can read as sent is accepted: a final status (never 1xx) and no content
//! coding (`Accept-Encoding: identity` is asked for); anything else is `upstream_bad_response`.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING,
    CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, TRANSFER_ENCODING, USER_AGENT,
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
        // Bodies are cached and served as received, to clients that negotiated nothing.
        h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        h.insert(USER_AGENT, self.user_agent.clone());
        if let Some(id) = request_id {
            h.insert(X_REQUEST_ID.clone(), id.clone());
        }
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| classify_client_error(e, &self.base))?;
        let (parts, body) = resp.into_parts();
        if parts.status.is_informational() {
            // Interim answers are consumed by hyper; one that arrives as the final answer
            // (a 101 to a request that asked for no upgrade) carries no run.
            tracing::warn!(
                status = parts.status.as_u16(),
                "upstream gave an interim (1xx) status as its final answer"
            );
            return Err(GatewayError::UpstreamProtocol);
        }
        if let Some(coding) = unasked_coding(&parts.headers) {
            tracing::warn!(
                coding,
                "upstream answered with a coding despite Accept-Encoding: identity; not passed on"
            );
            return Err(GatewayError::UpstreamProtocol);
        }
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

/// Why a connection to the upstream could not be opened, as one word for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectCause {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens on the port.
    Refused,
    /// The connection (TCP or TLS) was not up within `upstream.connect_timeout`.
    Timeout,
    /// No route to the host or its network.
    Unreachable,
    /// The peer reset or dropped the connection while it was being set up.
    Reset,
    /// The upstream's certificate was refused (unknown issuer, expired, wrong name, …).
    TlsCertificate,
    /// The upstream ended the handshake with a TLS alert.
    TlsAlert,
    /// The peer does not speak TLS (an `https://` URL on a plain-HTTP port, say) or broke the
    /// handshake.
    TlsProtocol,
    /// No TLS version, cipher suite or key exchange in common.
    TlsIncompatible,
    /// Another TLS failure.
    TlsOther,
    /// None of the above.
    Other,
}

impl ConnectCause {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectCause::Dns => "dns",
            ConnectCause::Refused => "refused",
            ConnectCause::Timeout => "timeout",
            ConnectCause::Unreachable => "unreachable",
            ConnectCause::Reset => "reset",
            ConnectCause::TlsCertificate => "tls_certificate",
            ConnectCause::TlsAlert => "tls_alert",
            ConnectCause::TlsProtocol => "tls_protocol",
            ConnectCause::TlsIncompatible => "tls_incompatible",
            ConnectCause::TlsOther => "tls_other",
            ConnectCause::Other => "other",
        }
    }

    fn of_tls(e: &rustls::Error) -> ConnectCause {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(_) | E::InvalidCertRevocationList(_) => {
                ConnectCause::TlsCertificate
            }
            E::AlertReceived(_) => ConnectCause::TlsAlert,
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::DecryptError => ConnectCause::TlsProtocol,
            E::PeerIncompatible(_) => ConnectCause::TlsIncompatible,
            _ => ConnectCause::TlsOther,
        }
    }
}

/// The cause of a failed connect and the text of the innermost error that says which (a
/// resolver, socket or TLS message; none of them holds the key, which is not sent before the
/// connection is up).
pub(crate) fn connect_failure(e: &(dyn StdError + 'static)) -> (ConnectCause, String) {
    let mut cause = ConnectCause::Other;
    let mut detail = e.to_string();
    let mut src = Some(e);
    while let Some(s) = src {
        detail = s.to_string();
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return (ConnectCause::of_tls(tls), detail);
        }
        // hyper-util's connector names a failed resolution only in its message.
        if detail == "dns error" {
            cause = ConnectCause::Dns;
        }
        src = match s.downcast_ref::<std::io::Error>() {
            Some(io) => {
                use std::io::ErrorKind as K;
                match io.kind() {
                    K::ConnectionRefused => cause = ConnectCause::Refused,
                    K::TimedOut => cause = ConnectCause::Timeout,
                    K::HostUnreachable | K::NetworkUnreachable => cause = ConnectCause::Unreachable,
                    K::ConnectionReset | K::ConnectionAborted => cause = ConnectCause::Reset,
                    // Only a TLS handshake reads while connecting: the peer closed it.
                    K::UnexpectedEof => cause = ConnectCause::TlsProtocol,
                    _ => {}
                }
                // An io::Error's own `source` skips the error it wraps (a rustls error, say).
                match io.get_ref() {
                    Some(inner) => Some(inner as &(dyn StdError + 'static)),
                    None => s.source(),
                }
            }
            None => s.source(),
        };
    }
    (cause, detail)
}

/// Maps a client error to the gateway's vocabulary; a connect failure's cause is logged here,
/// with the upstream's base URL (which holds no credentials), and its text goes no further.
fn classify_client_error(e: hyper_util::client::legacy::Error, base: &str) -> GatewayError {
    if e.is_connect() {
        let (cause, detail) = connect_failure(&e);
        tracing::warn!(
            upstream = base,
            cause = cause.as_str(),
            detail,
            "upstream connect failed"
        );
        if cause == ConnectCause::Timeout {
            GatewayError::UpstreamTimeout
        } else {
            GatewayError::UpstreamConnect
        }
    } else {
        tracing::debug!(error = %e, "upstream exchange failed");
        GatewayError::UpstreamProtocol
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio::net::TcpListener;

    const KEY: &str = "app-connect-test-key";

    /// The cause of the connect failure a run-detail request to `base` runs into.
    async fn cause_for(base: &str) -> (ConnectCause, String) {
        let cfg = Config::for_upstream(base, KEY).unwrap();
        let up = Upstream::new(&cfg.upstream, &cfg.apps[0]).unwrap();
        let run = RunId::parse("3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c").unwrap();
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = up.run_url(run).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(30), up.client.request(req)).await;
        let e = r.expect("the connect fails in time").unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        let (cause, detail) = connect_failure(&e);
        assert!(!detail.contains(KEY));
        (cause, detail)
    }

    /// A port nothing listens on.
    async fn closed_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let port = closed_port().await;
        let (cause, detail) = cause_for(&format!("http://127.0.0.1:{port}/v1")).await;
        assert_eq!(cause, ConnectCause::Refused, "{detail}");
    }

    #[tokio::test]
    async fn an_unresolvable_host_is_dns() {
        let (cause, detail) = cause_for("http://nonexistent.invalid/v1").await;
        assert_eq!(cause, ConnectCause::Dns, "{detail}");
    }

    #[cfg(feature = "mock")]
    #[tokio::test]
    async fn https_to_a_plain_http_server_is_a_tls_protocol_failure() {
        let mock = crate::mock::MockDify::start(KEY).await.unwrap();
        let base = format!("https://{}/v1", mock.addr());
        let (cause, detail) = cause_for(&base).await;
        assert_eq!(cause, ConnectCause::TlsProtocol, "{detail}");
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_a_tls_certificate_failure() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(
            ck.key_pair.serialize_pem().as_bytes(),
        )
        .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let (cause, detail) = cause_for(&format!("https://127.0.0.1:{port}/v1")).await;
        assert_eq!(cause, ConnectCause::TlsCertificate, "{detail}");
        assert!(detail.contains("UnknownIssuer"), "{detail}");
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

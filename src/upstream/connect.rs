//! Why a connection to the upstream could not be opened, found in the client's error chain.
//!
//! Invariant: a connect failure is logged once, here, with its cause and the text of the
//! innermost error that says which — never the key, which is not sent before the connection is
//! up — and leaves as [`UpstreamError::Connect`] (or `Timeout`) with nothing but its cause.

use std::error::Error as StdError;

use super::error::{ConnectCause, UpstreamError};

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

/// A failed connect to `base`, logged with its cause (see [`connect_failure`]).
pub(super) fn connect_failed(e: &(dyn StdError + 'static), base: &str) -> UpstreamError {
    let (cause, detail) = connect_failure(e);
    tracing::warn!(
        upstream = base,
        cause = cause.as_str(),
        detail,
        "upstream connect failed"
    );
    UpstreamError::Connect { cause }
}

/// Sorts a client error into the upstream's vocabulary; a connect failure's cause is logged
/// here, with the upstream's base URL (which holds no credentials), and its text goes no further.
pub(super) fn classify_client_error(
    e: hyper_util::client::legacy::Error,
    base: &str,
) -> UpstreamError {
    if e.is_connect() {
        connect_failed(&e, base)
    } else {
        tracing::debug!(error = %e, "upstream exchange failed");
        UpstreamError::Protocol
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use http::Request;
    use http_body_util::{BodyExt, Empty};
    use rustls::pki_types::pem::PemObject;
    use tokio::net::TcpListener;

    use crate::config::Config;
    use crate::run_id::RunId;
    use crate::upstream::{crypto_provider, Upstream};

    const KEY: &str = "app-connect-test-key";

    /// The cause of the connect failure a run-detail request to `base` runs into.
    async fn cause_for(base: &str) -> (ConnectCause, String) {
        let cfg = Config::for_upstream(base, KEY).unwrap();
        let up = Upstream::new(&cfg.upstream, &cfg.apps[0]).unwrap();
        let run = RunId::parse("3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c").unwrap();
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
        *req.uri_mut() = up.run_url(run).unwrap();
        // The multiplexing client's error chain (an HTTP/2 upstream's).
        let r = tokio::time::timeout(Duration::from_secs(30), up.client.request(req)).await;
        let e = r.expect("the connect fails in time").unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        let (cause, detail) = connect_failure(&e);
        assert!(!detail.contains(KEY));
        // The request-driven connections' (every HTTP/1.1 upstream's) finds the same cause.
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            up.get(up.run_url(run).unwrap(), None),
        );
        match r.await.expect("the connect fails in time") {
            Err(UpstreamError::Connect { cause: c }) => assert_eq!(c, cause, "{detail}"),
            other => panic!("{other:?}"),
        }
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
}

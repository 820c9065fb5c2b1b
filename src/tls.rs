//! TLS on the public listener, with a certificate that can be replaced while serving.
//!
//! Invariant: every handshake uses the certificate current at its start; reloading swaps the
//! certificate for new handshakes only, so open connections are never dropped, and a reload
//! that fails to load keeps the old certificate.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;
use crate::upstream::crypto_provider;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {message}")]
    Cert { path: String, message: String },
    #[error("cannot read private key {path}: {message}")]
    Key { path: String, message: String },
    #[error("certificate and key do not form a usable pair: {0}")]
    Pair(rustls::Error),
    #[error("TLS setup failed: {0}")]
    Setup(#[from] rustls::Error),
}

/// Hands rustls the current certificate.
struct CurrentCert(ArcSwap<CertifiedKey>);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Accepts TLS connections with a reloadable certificate.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<CurrentCert>,
    config: TlsConfig,
}

fn load(cfg: &TlsConfig) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cfg.cert_file.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cfg.cert_file.display().to_string(),
            message: "no certificates found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| TlsError::Key {
        path: cfg.key_file.display().to_string(),
        message: e.to_string(),
    })?;
    let signing = crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::Pair)?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(TlsError::Pair)?;
    Ok(Arc::new(ck))
}

impl TlsAcceptor {
    /// Loads the certificate and builds the acceptor (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn new(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
        let current = Arc::new(CurrentCert(ArcSwap::new(load(cfg)?)));
        let mut server = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            current,
            config: cfg.clone(),
        })
    }

    /// Re-reads the certificate and key files; on failure the old pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load(&self.config)?;
        self.current.0.store(fresh);
        Ok(())
    }

    /// Time a handshake may take.
    pub fn handshake_timeout(&self) -> Duration {
        self.config.handshake_timeout
    }

    /// Completes the handshake within the timeout; `None` when it fails or takes too long.
    pub async fn accept(&self, stream: TcpStream) -> Option<TlsStream<TcpStream>> {
        match tokio::time::timeout(self.config.handshake_timeout, self.acceptor.accept(stream))
            .await
        {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                None
            }
        }
    }
}

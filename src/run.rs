//! Running the gateway: what the binary, the demo and the integration tests all call.
//!
//! Invariant: the caller binds the listeners and says when to stop; everything between — the
//! gateway, TLS, the readiness probes, the admin listener, reloads and the drain — is built
//! here and nowhere else, so a test serves exactly what the binary serves. The admin listener
//! stops when the public one does.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::config::{Config, ConfigError};
use crate::gateway::{Gateway, SetupError};
use crate::server::{self, Drain};
use crate::tls::{TlsAcceptor, TlsError};

/// The two listeners, bound by the caller (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    /// Where clients come in.
    pub public: TcpListener,
    /// Where `/metrics`, `/readyz` and `/admin/*` are served.
    pub admin: TcpListener,
}

/// What the caller hands over besides the configuration and the listeners.
pub struct RunOptions {
    /// Where access lines go when `log.access_log` is on.
    pub access_log: Option<Arc<AccessLog>>,
    /// When and how to re-read the configuration while serving; `None`: never.
    pub reload: Option<Reload>,
    /// Probe every app's upstream at `admin.probe_interval` from the start, for `/readyz`. The
    /// binary does; tests that count upstream requests probe by hand instead.
    pub probes: bool,
}

/// Reloading while serving: when to re-read the configuration, and how.
pub struct Reload {
    /// One item per reload asked for (SIGHUP, in the binary); reloads end with the stream.
    pub requests: BoxStream<'static, ()>,
    /// Re-reads the configuration. It may block (files, host names), so it runs off the
    /// runtime's workers.
    pub load: Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The apps, their upstreams or the shared tier could not be set up.
    #[error(transparent)]
    Gateway(#[from] SetupError),
    /// The TLS certificate or key could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Serves `config` on `listeners` until `shutdown` resolves, then drains (connections, then
/// the runs still followed upstream, all within `server.drain_timeout`); how the public
/// listener's drain ended.
pub async fn run(
    listeners: Listeners,
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Drain, RunError> {
    Ok(Prepared::new(listeners, config, options)?
        .serve(shutdown)
        .await)
}

/// A gateway built on its listeners, not serving yet: [`run`] in two steps, for callers that
/// need the gateway or the bound addresses before it serves.
pub struct Prepared {
    gateway: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    listeners: Listeners,
    /// The bound addresses: with port 0 configured, the port the system picked.
    addrs: (SocketAddr, SocketAddr),
    config: Config,
    reload: Option<Reload>,
    probes: bool,
}

impl Prepared {
    /// Builds the gateway and the TLS acceptor for `config`.
    pub fn new(
        listeners: Listeners,
        config: Config,
        options: RunOptions,
    ) -> Result<Prepared, RunError> {
        let gateway = Gateway::with_access_log(&config, options.access_log)?;
        let tls = config
            .server
            .tls
            .as_ref()
            .map(TlsAcceptor::new)
            .transpose()?;
        let bound = |l: &TcpListener, configured| l.local_addr().unwrap_or(configured);
        let addrs = (
            bound(&listeners.public, config.server.listen),
            bound(&listeners.admin, config.admin.listen),
        );
        Ok(Prepared {
            gateway,
            tls,
            listeners,
            addrs,
            config,
            reload: options.reload,
            probes: options.probes,
        })
    }

    /// The gateway that will serve.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The TLS acceptor, when `server.tls` is configured.
    pub fn tls(&self) -> Option<&TlsAcceptor> {
        self.tls.as_ref()
    }

    /// The public listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs.0
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.1
    }

    /// Serves until `shutdown` resolves, then drains both listeners; how the public one's drain
    /// ended.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Drain {
        let Prepared {
            gateway,
            tls,
            listeners,
            addrs: (listen_addr, admin_addr),
            config,
            reload,
            probes,
        } = self;
        let probes = probes.then(|| {
            gateway
                .readiness()
                .spawn(gateway.metrics().clone(), config.admin.probe_interval)
        });
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let admin = Admin::new(Arc::clone(&gateway), config.admin.token.as_ref());
        let admin_cfg = config.server.clone();
        let admin_max = config.admin.max_connections;
        let admin_task = tokio::spawn(async move {
            let stopped = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            server::run_admin(listeners.admin, admin, &admin_cfg, admin_max, stopped).await
        });
        let reloader = reload.map(|r| tokio::spawn(reloads(r, Arc::clone(&gateway), tls.clone())));
        tracing::info!(
            listen = %listen_addr,
            admin = %admin_addr,
            tls = config.server.tls.is_some(),
            apps = config.apps.len(),
            clients = config.clients.len(),
            "dify-gateway serving"
        );
        let held = Arc::clone(&gateway);
        let stopped_at = Arc::new(std::sync::OnceLock::new());
        let mark = Arc::clone(&stopped_at);
        let stop = async move {
            shutdown.await;
            let _ = mark.set(tokio::time::Instant::now());
            held.release_waiters();
            let _ = stop_tx.send(true);
        };
        let followed = Arc::clone(gateway.followed_runs());
        let after_drain = Arc::clone(&gateway);
        let drain = server::run(listeners.public, gateway, &config.server, tls, stop).await;
        // Runs still followed upstream (async runs, streams whose client left) get the rest of
        // the drain timeout: Dify may interrupt a run whose stream reader goes away.
        if !followed.is_empty() {
            let start = stopped_at
                .get()
                .copied()
                .unwrap_or_else(tokio::time::Instant::now);
            let deadline = start + config.server.drain_timeout;
            tracing::info!(runs = followed.len(), "waiting for runs followed upstream");
            if tokio::time::timeout_at(deadline, followed.until_idle())
                .await
                .is_err()
            {
                tracing::warn!(
                    runs = followed.len(),
                    "drain timeout passed with runs still followed upstream; their streams are cut and Dify may interrupt them"
                );
            }
        }
        after_drain.stop_webhooks().await;
        for task in probes.into_iter().chain(reloader) {
            task.abort();
        }
        let _ = admin_task.await;
        drain
    }
}

/// Says loudly when `config` lets anyone in: the binary's start-up warnings (the demo is open
/// and on loopback by design, and says so itself).
pub fn warn_if_exposed(config: &Config) {
    if config.clients.is_empty() {
        tracing::warn!(
            "NO CLIENTS CONFIGURED: the gateway is open; anyone who can reach {} can read runs with the app key. Add [[clients]] unless only trusted callers can reach it.",
            config.server.listen
        );
    }
    if config.admin.token.is_none() && !config.admin.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.admin.listen, "admin listener is not on loopback and has no admin token: anyone who can reach it can purge the cache");
    }
}

/// Applies a re-read configuration per request: what may change while serving (clients,
/// rotated keys) and the TLS certificate. A file that no longer validates, or that changes the
/// apps, changes nothing; the outcome is logged, counted and shown on `/admin/reload`.
async fn reloads(reload: Reload, gateway: Arc<Gateway>, tls: Option<TlsAcceptor>) {
    let Reload { mut requests, load } = reload;
    while requests.next().await.is_some() {
        let load = Arc::clone(&load);
        let Ok(loaded) = tokio::task::spawn_blocking(move || load()).await else {
            continue;
        };
        if let Ok(applied) = gateway.reload(loaded, tls.as_ref()) {
            if !applied.keys_rotated.is_empty() {
                // Key health on /readyz follows the new key now, not at the next probe.
                gateway.readiness().probe_all(gateway.metrics()).await;
            }
        }
    }
}

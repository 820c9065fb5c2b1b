//! The binary: parse arguments, load config, start logging, bind, serve until a signal.

use std::process::ExitCode;
use std::sync::Arc;

use dify_gateway::access_log::AccessLog;
use dify_gateway::admin::Admin;
use dify_gateway::cli::{Cli, Command};
use dify_gateway::config::LogFormat;
#[cfg(feature = "mock")]
use dify_gateway::demo::{self, DemoOptions};
use dify_gateway::server::{self, Drain};
use dify_gateway::tls::TlsAcceptor;
use dify_gateway::{telemetry, Config, Gateway};

fn main() -> ExitCode {
    let cli = Cli::from_env();
    if let Some(addr) = cli.health_probe {
        return if dify_gateway::cli::health_probe(addr) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if let Some(Command::GenToken { client, app }) = &cli.command {
        return match dify_gateway::cli::print_new_token(client, app) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dify-gateway: {e}");
                ExitCode::FAILURE
            }
        };
    }
    #[cfg(feature = "mock")]
    if let Some(Command::Demo {
        listen,
        admin_listen,
        running_for,
    }) = &cli.command
    {
        let opts = DemoOptions {
            listen: listen.clone(),
            admin_listen: admin_listen.clone(),
            running_for: *running_for,
        };
        return run_in_runtime(LogFormat::Text, |access| async move {
            match demo::run(&opts, access, shutdown_signal()).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the demo");
                    ExitCode::FAILURE
                }
            }
        });
    }
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dify-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!(
            "configuration OK: listen {}{}, admin {}, {} app(s), {} client(s), cache {} bytes, running_ttl {:?}",
            config.server.listen,
            if config.server.tls.is_some() { " (TLS)" } else { "" },
            config.admin.listen,
            config.apps.len(),
            config.clients.len(),
            config.cache.max_bytes,
            config.cache.running_ttl
        );
        return ExitCode::SUCCESS;
    }
    let format = config.log.format;
    run_in_runtime(format, |access| serve(cli, config, access))
}

/// Starts the runtime and logging, runs `main` to its end, then flushes the log.
fn run_in_runtime<F, Fut>(format: LogFormat, main: F) -> ExitCode
where
    F: FnOnce(Option<Arc<AccessLog>>) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dify-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = telemetry::init(format);
    let code = runtime.block_on(main(telemetry.access.clone()));
    // Requests still running after the drain timeout end here, before the log's last batch.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    drop(telemetry);
    code
}

/// How long tasks still running at exit get to finish before the last log lines are written.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn serve(cli: Cli, config: Config, access_log: Option<Arc<AccessLog>>) -> ExitCode {
    let gateway = match Gateway::with_access_log(&config, access_log) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the gateway");
            return ExitCode::FAILURE;
        }
    };
    let tls = match &config.server.tls {
        None => None,
        Some(t) => match TlsAcceptor::new(t) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(error = %e, "cannot set up TLS");
                return ExitCode::FAILURE;
            }
        },
    };
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.server.listen, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let admin_listener = match tokio::net::TcpListener::bind(config.admin.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.admin.listen, error = %e, "cannot bind the admin listener");
            return ExitCode::FAILURE;
        }
    };
    // The bound addresses: with port 0 in the config, the port the system picked.
    let bound = |l: &tokio::net::TcpListener, configured| l.local_addr().unwrap_or(configured);
    let listen_addr = bound(&listener, config.server.listen);
    let admin_addr = bound(&admin_listener, config.admin.listen);
    if gateway.is_open() {
        tracing::warn!(
            "NO CLIENTS CONFIGURED: the gateway is open; anyone who can reach {} can read runs with the app key. Add [[clients]] unless only trusted callers can reach it.",
            config.server.listen
        );
    }
    if config.admin.token.is_none() && !config.admin.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.admin.listen, "admin listener is not on loopback and has no admin token: anyone who can reach it can purge the cache");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let probes = gateway
        .readiness()
        .spawn(gateway.metrics().clone(), config.admin.probe_interval);
    let admin = Admin::new(gateway.clone(), config.admin.token.as_ref());
    let admin_cfg = config.server.clone();
    let admin_max = config.admin.max_connections;
    let admin_task = tokio::spawn({
        let rx = stop_rx.clone();
        async move { server::run_admin(admin_listener, admin, &admin_cfg, admin_max, stopped(rx)).await }
    });
    let reloader = tokio::spawn(reload_on_sighup(
        Arc::new(cli),
        gateway.clone(),
        tls.clone(),
    ));
    tracing::info!(
        listen = %listen_addr,
        admin = %admin_addr,
        tls = config.server.tls.is_some(),
        apps = config.apps.len(),
        clients = config.clients.len(),
        "dify-gateway serving"
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    match server::run(listener, gateway, &config.server, tls, stopped(stop_rx)).await {
        Drain::Complete => tracing::info!("drained; exiting"),
        Drain::TimedOut => tracing::warn!("drain timeout passed; dropping remaining connections"),
    }
    probes.abort();
    reloader.abort();
    let _ = admin_task.await;
    ExitCode::SUCCESS
}

/// On SIGHUP: re-read the config file and the app keys, apply what may change while serving
/// (clients, rotated keys) and reload the TLS certificate. A file that no longer validates, or
/// that changes the apps, changes nothing; the outcome is logged, counted and shown on
/// `/admin/reload`.
async fn reload_on_sighup(cli: Arc<Cli>, gateway: Arc<Gateway>, tls: Option<TlsAcceptor>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let c = Arc::clone(&cli);
            // Reading files and resolving listen host names block.
            let Ok(loaded) = tokio::task::spawn_blocking(move || c.load_config()).await else {
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
    #[cfg(not(unix))]
    {
        let _ = (cli, gateway, tls);
        std::future::pending::<()>().await;
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}

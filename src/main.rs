//! The binary: parse arguments, load config, start logging, bind, and [`dify_gateway::run`]
//! until a signal.

use std::process::ExitCode;
use std::sync::Arc;

use dify_gateway::access_log::AccessLog;
use dify_gateway::cli::{Cli, Command};
use dify_gateway::config::LogFormat;
#[cfg(feature = "mock")]
use dify_gateway::demo::{self, DemoOptions};
use dify_gateway::server::Drain;
use dify_gateway::{telemetry, Config, Listeners, Reload, RunError, RunOptions};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::net::TcpListener;

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

/// Binds both listeners and serves `config` on them until SIGINT or SIGTERM; SIGHUP reloads.
async fn serve(cli: Cli, config: Config, access_log: Option<Arc<AccessLog>>) -> ExitCode {
    let public = match TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.server.listen, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let admin = match TcpListener::bind(config.admin.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.admin.listen, error = %e, "cannot bind the admin listener");
            return ExitCode::FAILURE;
        }
    };
    dify_gateway::warn_if_exposed(&config);
    let options = RunOptions {
        access_log,
        reload: sighups().map(|requests| Reload {
            requests,
            load: Arc::new(move || cli.load_config()),
        }),
        probes: true,
    };
    let listeners = Listeners { public, admin };
    match dify_gateway::run(listeners, config, options, shutdown_signal()).await {
        Ok(Drain::Complete) => tracing::info!("drained; exiting"),
        Ok(Drain::TimedOut) => {
            tracing::warn!("drain timeout passed; dropping remaining connections")
        }
        Err(RunError::Gateway(e)) => {
            tracing::error!(error = %e, "cannot set up the gateway");
            return ExitCode::FAILURE;
        }
        Err(RunError::Tls(e)) => {
            tracing::error!(error = %e, "cannot set up TLS");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// One item per SIGHUP (re-read the config file and the app keys, reload the TLS certificate);
/// `None` where there is no SIGHUP. The handler is in place before the gateway serves, so a
/// SIGHUP never ends the process.
fn sighups() -> Option<BoxStream<'static, ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let hup = signal(SignalKind::hangup()).ok()?;
        Some(
            futures_util::stream::unfold(hup, |mut hup| async move {
                hup.recv().await?;
                tracing::info!("SIGHUP: reloading the configuration");
                Some(((), hup))
            })
            .boxed(),
        )
    }
    #[cfg(not(unix))]
    {
        None
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

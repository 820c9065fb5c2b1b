//! `dify-gateway demo`: the gateway in front of the built-in mock Dify, for a first try with no
//! Dify account, no key and no network.
//!
//! Invariant: everything the demo starts listens on loopback only, and its only key is a
//! throwaway one shared by the mock and the gateway; nothing leaves the machine.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::access_log::AccessLog;
use crate::config::{ConfigError, Overrides, RawConfig, API_KEY_ENV};
use crate::mock::{auto_final_status, AutoRuns, MockDify, UNKNOWN_RUN_PREFIX};
use crate::run::{Listeners, Prepared, RunError, RunOptions};
use crate::server::Drain;

/// The key the mock expects and the gateway sends; not a Dify key.
const DEMO_KEY: &str = "app-demo-key-of-the-built-in-mock";

/// Output text per mock run body: enough to look like a run, short enough to read.
const DEMO_OUTPUT_BYTES: usize = 120;

/// What the demo runs with.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Public listener (loopback).
    pub listen: String,
    /// Admin listener (loopback).
    pub admin_listen: String,
    /// How long each mock run stays `running` after it is first asked for.
    pub running_for: Duration,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the demo listens on loopback only, but `{flag}` is {addr}")]
    NotLoopback {
        flag: &'static str,
        addr: SocketAddr,
    },
    #[error("cannot listen on {addr} ({source}); choose another address with `{flag}`")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the mock Dify on a loopback port: {0}")]
    Mock(std::io::Error),
    #[error(transparent)]
    Setup(#[from] RunError),
}

/// Starts the mock and the gateway in front of it, prints what to try, and serves until
/// `shutdown` resolves.
pub async fn run(
    opts: &DemoOptions,
    access_log: Option<Arc<AccessLog>>,
    shutdown: impl Future<Output = ()>,
) -> Result<Drain, DemoError> {
    let mock_listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(DemoError::Mock)?;
    let mock = MockDify::serve(
        mock_listener,
        DEMO_KEY,
        Some(AutoRuns {
            running_for: opts.running_for,
            output_bytes: DEMO_OUTPUT_BYTES,
        }),
    );
    let config = RawConfig::default().validate(
        &Overrides {
            listen: Some(opts.listen.clone()),
            admin_listen: Some(opts.admin_listen.clone()),
            upstream: Some(mock.base_url()),
            ..Overrides::default()
        },
        None,
        &|name| (name == API_KEY_ENV).then(|| DEMO_KEY.to_owned()),
    )?;
    let bind = |flag: &'static str, addr: SocketAddr| async move {
        if !addr.ip().is_loopback() {
            return Err(DemoError::NotLoopback { flag, addr });
        }
        TcpListener::bind(addr)
            .await
            .map_err(|source| DemoError::Bind { flag, addr, source })
    };
    let listeners = Listeners {
        public: bind("--listen", config.server.listen).await?,
        admin: bind("--admin-listen", config.admin.listen).await?,
    };
    let options = RunOptions {
        access_log,
        reload: None,
        probes: true,
    };
    let prepared = Prepared::new(listeners, config, options)?;
    println!(
        "{}",
        instructions(
            prepared.addr(),
            prepared.admin_addr(),
            &mock,
            opts.running_for
        )
    );
    let drain = prepared.serve(shutdown).await;
    mock.stop();
    Ok(drain)
}

/// A run id the mock ends as `succeeded`.
fn succeeding_run() -> uuid::Uuid {
    loop {
        let id = uuid::Uuid::new_v4();
        if auto_final_status(&id) == "\"succeeded\"" {
            return id;
        }
    }
}

/// What to try, with the addresses actually bound.
fn instructions(
    gateway: SocketAddr,
    admin: SocketAddr,
    mock: &MockDify,
    running_for: Duration,
) -> String {
    let run_url = format!("http://{gateway}/v1/workflows/run/{}", succeeding_run());
    let unknown = format!("{UNKNOWN_RUN_PREFIX}0000-4000-8000-000000000000");
    let secs = running_for.as_secs_f64();
    format!(
        "\
dify-gateway demo: the gateway in front of a built-in mock Dify, all on this machine (no key, no network).

  gateway    http://{gateway}   open: no client tokens, loopback only
  admin      http://{admin}   / (status page) /metrics /readyz /admin/usage
  mock Dify  {mock_url}

Every run id (a UUID) is a run that is \"running\" for {secs}s after it is first asked for, then
ends: \"succeeded\" for most ids, \"failed\" or \"partial-succeeded\" for some. Ids starting with
{UNKNOWN_RUN_PREFIX} are unknown runs: the mock answers 404 not_found.

Try, in another terminal:

  curl -si {run_url}

  # poll it twice a second: X-Cache MISS, then HIT while running (an answer is kept 1 s), and
  # once the run has ended HIT for good, with a growing Age
  for i in $(seq 24); do curl -si {run_url} | grep -ioE '^(x-cache|age): [^[:space:]]+|\"status\": \"[a-z-]+\"' | paste -sd' ' -; sleep 0.5; done

  curl -si http://{gateway}/v1/workflows/run/{unknown}   # 404
  curl -s http://{admin}/metrics | grep dify_gateway_requests_total

Ctrl-C stops the demo.
",
        mock_url = mock.base_url(),
    )
}

//! Upstream requests of a three-replica fleet, with and without the shared tier, for one load.
//!
//! Starts a mock Dify and `redis-server` on loopback, then runs the same workload twice against
//! three in-process gateways behind a round-robin client: once with each replica on its own
//! cache, once with the three sharing Redis. The workload: 300 clients polling 30 runs that are
//! `running` for 6 s and then `succeeded`, for 12 s in all, then one read of 200 terminal runs
//! from every replica. Prints a Markdown table. Bounded in time; loopback only.
//!
//! ```text
//! cargo run --release --example fleet-load
//! ```

#[path = "support/in_process.rs"]
mod in_process;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dify_gateway::mock::{AutoRuns, MockDify, Reply};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

const KEY: &str = "app-fleet-load";
const POLLERS: usize = 300;
const RUNNING_RUNS: usize = 30;
const TERMINAL_RUNS: usize = 200;
const POLL_FOR: Duration = Duration::from_secs(12);

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_redis() -> (Redis, String) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (apt-get install redis-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (Redis(child), format!("redis://127.0.0.1:{port}"))
}

async fn replica(mock: &MockDify, redis: Option<&str>) -> SocketAddr {
    let shared = redis
        .map(|u| format!("[shared]\nurls = [\"{u}\"]\n"))
        .unwrap_or_default();
    let toml = format!("[cache]\nrunning_ttl = \"1s\"\n[log]\naccess_log = false\n{shared}");
    in_process::gateway(&mock.base_url(), KEY, &toml).await
}

struct Figures {
    client_requests: u64,
    /// Upstream requests during the polling phase.
    polling_upstream: u64,
    /// Upstream requests for the terminal reads.
    terminal_upstream: u64,
    terminal_lag_ms_max: f64,
}

async fn run(shared: Option<&str>) -> Figures {
    let mock_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mock = MockDify::serve(
        mock_listener,
        KEY,
        Some(AutoRuns {
            running_for: Duration::from_secs(6),
            output_bytes: 1024,
        }),
    );
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&mock, shared).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replicas = Arc::new(replicas);
    let runs: Arc<Vec<String>> = Arc::new(
        (0..RUNNING_RUNS)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect(),
    );
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..POLLERS {
        let (client, replicas, runs) = (client.clone(), replicas.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            let run = &runs[i % runs.len()];
            let mut sent = 0u64;
            let mut seen_terminal: Option<Duration> = None;
            let mut k = i;
            while start.elapsed() < POLL_FOR {
                let addr = replicas[k % 3];
                k += 1;
                let uri = format!("http://{addr}/v1/workflows/run/{run}")
                    .parse()
                    .expect("uri");
                if let Ok(resp) = client.get(uri).await {
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    if seen_terminal.is_none() && !body.windows(9).any(|w| w == b"\"running\"") {
                        seen_terminal = Some(start.elapsed());
                    }
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (sent, seen_terminal)
        }));
    }
    let mut client_requests = 0;
    let mut lag_max: f64 = 0.0;
    for t in tasks {
        let (sent, seen) = t.await.expect("poller");
        client_requests += sent;
        if let Some(s) = seen {
            // Runs finish 6 s after their first request, which came at ~0 s.
            lag_max = lag_max.max(s.as_secs_f64() * 1e3 - 6000.0);
        }
    }
    let polling_upstream = mock.total();
    // Terminal reads: 200 finished runs, each read once from every replica.
    let terminal: Vec<String> = (0..TERMINAL_RUNS)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    for id in &terminal {
        mock.set(id, Reply::run(id, "\"succeeded\""));
    }
    for id in &terminal {
        for addr in replicas.iter() {
            let uri = format!("http://{addr}/v1/workflows/run/{id}")
                .parse()
                .expect("uri");
            if let Ok(resp) = client.get(uri).await {
                let _ = resp.into_body().collect().await;
            }
            client_requests += 1;
        }
    }
    Figures {
        client_requests,
        polling_upstream,
        terminal_upstream: mock.total() - polling_upstream,
        terminal_lag_ms_max: lag_max,
    }
}

#[tokio::main]
async fn main() {
    let (_redis, url) = start_redis().await;
    let alone = run(None).await;
    let shared = run(Some(&url)).await;
    println!("| setup (3 replicas) | client requests | upstream requests (polling) | per running run per second | upstream for {TERMINAL_RUNS} terminal runs read on every replica | worst lag to terminal |");
    println!("|---|---|---|---|---|---|");
    for (name, f) in [
        ("in-process caches only", &alone),
        ("shared Redis tier", &shared),
    ] {
        println!(
            "| {name} | {} | {} | {:.2} | {} | {:.0} ms |",
            f.client_requests,
            f.polling_upstream,
            f.polling_upstream as f64 / RUNNING_RUNS as f64 / POLL_FOR.as_secs_f64(),
            f.terminal_upstream,
            f.terminal_lag_ms_max
        );
    }
}

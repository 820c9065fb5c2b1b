//! Held long-polls, measured: 10,000 clients each holding `Prefer: wait=N` on one of 1,000
//! running runs. Reports the gateway's RSS per held request beyond its connection (the same
//! connections idle, measured first) and its CPU while nothing changes, with 1,000 held
//! requests (one per run) and with 10,000 (ten per run): per-run watchers refresh once per
//! `cache.running_ttl` whatever the number of waiters, so the two should cost the same.
//!
//! The gateway is the release binary as a child process (its memory and CPU are its own), in
//! front of the mock Dify (auto mode: every run id is a run that stays `running`) in this
//! process. Loopback only; bounded (the held requests are answered when the harness exits).
//!
//! ```text
//! cargo build --release --features mock && \
//!   cargo run --release --example held-longpolls -- --clients 10000 --runs 1000
//! ```

#[allow(dead_code)]
#[path = "soak/gateway_process.rs"]
mod gateway_process;

use std::time::Duration;

use clap::Parser;
use dify_gateway::mock::{AutoRuns, MockDify};
use gateway_process::{cpu_seconds, default_binary, get_text, memory, GatewayProcess};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "app-held-longpolls";

const CONFIG: &str = "[log]\naccess_log = false\n\
[server]\nmax_connections = 30000\nidle_timeout = \"10m\"\n\
[longpoll]\nmax_wait = \"120s\"\nmax_waiters = 30000\n";

#[derive(Parser)]
struct Args {
    /// Held requests at the end.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Running runs they wait on.
    #[arg(long, default_value_t = 1_000)]
    runs: usize,
    /// Seconds of CPU measured at each step.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

/// One keep-alive connection that has had one request answered (so it counts as a client's).
async fn idle_connection(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"}") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed");
        got.extend_from_slice(&buf[..n]);
    }
    s
}

fn run_id(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", i + 1, i + 1)
}

async fn hold(s: &mut TcpStream, run: &str) {
    let req =
        format!("GET /v1/workflows/run/{run} HTTP/1.1\r\nHost: gw\r\nPrefer: wait=120\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
}

async fn waiters(probe: &gateway_process::HttpClient, gw: &GatewayProcess) -> u64 {
    get_text(probe, gw.admin, "/metrics")
        .await
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("dify_gateway_longpoll_waiters "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn until_waiters(probe: &gateway_process::HttpClient, gw: &GatewayProcess, n: u64) {
    for _ in 0..600 {
        if waiters(probe, gw).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{n} waiters never held");
}

/// Gateway CPU over `secs`, in ms per second.
async fn cpu_ms_per_s(pid: u32, secs: u64) -> f64 {
    let c0 = cpu_seconds(pid).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    (cpu_seconds(pid).unwrap_or(0.0) - c0) * 1000.0 / secs as f64
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mock = MockDify::serve(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        KEY,
        Some(AutoRuns {
            running_for: Duration::from_secs(3600),
            output_bytes: 256,
        }),
    );
    let log = std::env::temp_dir().join("held-longpolls-gateway.log");
    let mut gw = GatewayProcess::spawn(&default_binary(), &mock.base_url(), KEY, CONFIG, &log)
        .expect("gateway starts (build it first: cargo build --release)");
    let probe: gateway_process::HttpClient = Client::builder(TokioExecutor::new()).build_http();
    assert!(gw.wait_healthy(&probe, Duration::from_secs(10)).await);
    // Every run is asked for once, so each is in the cache as running before anyone waits.
    for i in 0..args.runs {
        let _ = get_text(
            &probe,
            gw.public,
            &format!("/v1/workflows/run/{}", run_id(i)),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = memory(gw.pid).expect("rss").rss_kib;
    let mut conns = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        conns.push(idle_connection(gw.public).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = memory(gw.pid).expect("rss").rss_kib;
    let cpu_idle = cpu_ms_per_s(gw.pid, args.seconds).await;
    // One held request per run.
    for (i, c) in conns.iter_mut().take(args.runs).enumerate() {
        hold(c, &run_id(i)).await;
    }
    until_waiters(&probe, &gw, args.runs as u64).await;
    let rss_one = memory(gw.pid).expect("rss").rss_kib;
    let cpu_one = cpu_ms_per_s(gw.pid, args.seconds).await;
    // The rest: ten per run.
    for (i, c) in conns.iter_mut().enumerate().skip(args.runs) {
        hold(c, &run_id(i % args.runs)).await;
    }
    until_waiters(&probe, &gw, args.clients as u64).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_all = memory(gw.pid).expect("rss").rss_kib;
    let cpu_all = cpu_ms_per_s(gw.pid, args.seconds).await;
    let held = waiters(&probe, &gw).await;
    let per_conn = (rss_idle.saturating_sub(rss0)) as f64 / args.clients as f64;
    let per_held = (rss_all.saturating_sub(rss_idle)) as f64 / args.clients as f64;
    println!(
        "{} held long-polls on {} running runs, gateway as a child process (2-core VM):\n",
        args.clients, args.runs
    );
    println!("| Measure | Value |");
    println!("| --- | ---: |");
    println!("| RSS per idle keep-alive connection | {per_conn:.2} KiB |");
    println!("| RSS per held request beyond its connection ({held} held) | {per_held:.2} KiB |");
    println!(
        "| RSS growth, first {} held (one per run: watchers too) | {:.2} KiB each |",
        args.runs,
        rss_one.saturating_sub(rss_idle) as f64 / args.runs as f64
    );
    println!(
        "| CPU, {} idle connections | {cpu_idle:.1} ms/s |",
        args.clients
    );
    println!(
        "| CPU, {} held (one per run; {} watchers refresh once per running_ttl) | {cpu_one:.1} ms/s |",
        args.runs, args.runs
    );
    println!(
        "| CPU, {} held (ten per run; same watchers) | {cpu_all:.1} ms/s |",
        args.clients
    );
    drop(conns);
    let _ = gw.terminate();
    let _ = gw.wait_exit(Duration::from_secs(15));
}

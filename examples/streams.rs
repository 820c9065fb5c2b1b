//! Streams and uploads through the gateway against the same upstream reached directly and through
//! nginx (`proxy_buffering off`), in one run: first-event latency and per-event cost of a
//! streaming run, the memory and CPU of 1,000 open streams, and the memory growth of a 100 MiB
//! upload.
//!
//! Starts a mock Dify on loopback, the release gateway as a child process (its CPU and memory
//! its own, as nginx's are), and nginx as a child process when it is installed (its column
//! reads "–" otherwise); bounded in count and time. Prints a Markdown table. The gateway's and
//! nginx's columns of memory are this process's growth on the direct path (the client's and
//! the mock's ends) plus the proxy's own.
//!
//! ```text
//! cargo build --release --features mock && cargo run --release --example streams
//! ```

// Shared with the soak, which uses all of it.
#[allow(dead_code)]
#[path = "soak/gateway_process.rs"]
mod gateway_process;
#[path = "support/nginx.rs"]
mod nginx;

use std::time::{Duration, Instant};

use bytes::Bytes;
use dify_gateway::mock::{MockDify, RunScript};
use gateway_process::{default_binary, GatewayProcess};
use http::{Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const KEY: &str = "app-streams-bench";
/// Streaming runs timed per path.
const RUNS: usize = 300;
/// Text chunks per run in the per-event measurement.
const CHUNKS: usize = 200;
/// Streams held open at once.
const OPEN: usize = 1000;
/// Size of the upload.
const UPLOAD: usize = 100 * 1024 * 1024;

type Body = BoxBody<Bytes, std::io::Error>;

fn client() -> Client<HttpConnector, Body> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2000)
        .build(http)
}

/// The release gateway as a child process in front of `mock`.
async fn gateway(mock: &MockDify) -> GatewayProcess {
    let toml = "[log]\naccess_log = false\n[passthrough]\nmax_upload_bytes = 209715200\n";
    let log = std::env::temp_dir().join("streams-gateway.log");
    let mut gw = GatewayProcess::spawn(&default_binary(), &mock.base_url(), KEY, toml, &log)
        .expect("gateway starts (build it first: cargo build --release --features mock)");
    let probe: gateway_process::HttpClient = Client::builder(TokioExecutor::new()).build_http();
    assert!(gw.wait_healthy(&probe, Duration::from_secs(10)).await);
    gw
}

/// The gateway child's resident memory, KiB.
fn child_rss_kib(gw: &GatewayProcess) -> u64 {
    gateway_process::memory(gw.pid).map_or(0, |m| m.rss_kib)
}

fn start_request(base: &str, auth: bool) -> Request<Body> {
    let body = r#"{"inputs": {}, "response_mode": "streaming", "user": "bench"}"#;
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}/workflows/run"))
        .header("content-type", "application/json");
    if auth {
        b = b.header("authorization", format!("Bearer {KEY}"));
    }
    b.body(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    )
    .expect("request")
}

/// One streaming run: time to the first event, and to the end.
async fn one_run(c: &Client<HttpConnector, Body>, base: &str, auth: bool) -> (Duration, Duration) {
    let t = Instant::now();
    let resp = c.request(start_request(base, auth)).await.expect("answer");
    let mut body = resp.into_body();
    let mut first = None;
    while let Some(f) = body.frame().await {
        let f = f.expect("frame");
        if f.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
            first = Some(t.elapsed());
        }
    }
    (first.expect("an event"), t.elapsed())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (1-based) of the whole line: 12 and 13 after `)`.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn latencies(c: &Client<HttpConnector, Body>, base: &str, auth: bool) -> [Duration; 4] {
    let (mut first, mut total) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (f, t) = one_run(c, base, auth).await;
        first.push(f);
        total.push(t);
    }
    [
        pct(&mut first, 0.5),
        pct(&mut first, 0.99),
        pct(&mut total, 0.5),
        pct(&mut total, 0.99),
    ]
}

#[tokio::main]
async fn main() {
    let mock = MockDify::start(KEY).await.expect("mock");
    let gw = gateway(&mock).await;
    let nginx = nginx::Nginx::start(mock.addr(), KEY);
    let direct = mock.base_url();
    let through = format!("http://{}/v1", gw.public);
    // The proxies add the key; straight to the mock the client sends it.
    let mut paths = vec![(direct.clone(), true), (through.clone(), false)];
    if let Some(n) = &nginx {
        paths.push((format!("http://{}/v1", n.addr), false));
    }
    let c = client();
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let row = |what: &str, cells: Vec<String>| {
        let nginx_cell = cells
            .get(2)
            .cloned()
            .unwrap_or_else(|| "– (no nginx)".into());
        println!("| {what} | {} | {} | {nginx_cell} |", cells[0], cells[1]);
    };

    println!("| Measure | Direct | Through the gateway | Through nginx (`proxy_buffering off`) |");
    println!("| --- | --- | --- | --- |");
    // A short run: first event and whole stream.
    mock.set_run_script(RunScript::default());
    for (base, auth) in &paths {
        // Warm the pools.
        one_run(&c, base, *auth).await;
    }
    let mut short = Vec::new();
    for (base, auth) in &paths {
        short.push(latencies(&c, base, *auth).await);
    }
    row(
        &format!("first event, p50 / p99 ({RUNS} runs)"),
        short
            .iter()
            .map(|l| format!("{} / {}", us(l[0]), us(l[1])))
            .collect(),
    );
    // A long run: per-event cost.
    mock.set_run_script(RunScript::chunks(CHUNKS));
    let per = |t: Duration| format!("{:.1} µs", t.as_secs_f64() * 1e6 / (CHUNKS + 8) as f64);
    let mut long = Vec::new();
    for (base, auth) in &paths {
        let l = latencies(&c, base, *auth).await;
        long.push(format!("{} / {}; {}", us(l[2]), us(l[3]), per(l[2])));
    }
    row(
        &format!("whole stream of {CHUNKS} chunks, p50 / p99; per event at p50"),
        long,
    );

    // 1,000 open streams, held upstream after their first event.
    mock.set_run_script(RunScript::default());
    let mut open = Vec::new();
    let mut per_stream = Vec::new();
    for (i, (base, auth)) in paths.iter().enumerate() {
        // The gateway (the second path) and nginx (the third) hold their memory in their own
        // processes.
        let nginx_rss = || match i {
            1 => child_rss_kib(&gw),
            2 => nginx.as_ref().map_or(0, |n| n.rss_kib()),
            _ => 0,
        };
        mock.hold_events();
        let runs0 = mock.runs().len();
        let (rss0, outside0) = (rss_kib("VmRSS:"), nginx_rss());
        let mut held = Vec::with_capacity(OPEN);
        for _ in 0..OPEN {
            let c = c.clone();
            let req = start_request(base, *auth);
            held.push(tokio::spawn(async move {
                let resp = c.request(req).await.expect("answer");
                let mut body = resp.into_body();
                while let Some(f) = body.frame().await {
                    if f.is_err() {
                        break;
                    }
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while mock.runs().len() < (runs0 + OPEN).min(10_000) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss1, outside1) = (rss_kib("VmRSS:"), nginx_rss());
        let cpu0 = cpu_time();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let idle_cpu = cpu_time() - cpu0;
        let kib = |a: u64, b: u64| a.saturating_sub(b) as f64 / OPEN as f64;
        per_stream.push(kib(rss1, rss0));
        open.push(if i > 0 {
            // The client's and the mock's ends are those of the direct path (measured there:
            // this process has freed and reuses memory by now); the proxy's own is added.
            let own = kib(outside1, outside0);
            let name = if i == 1 { "the gateway" } else { "nginx" };
            format!(
                "{:.1} KiB ({name} itself {own:.1}); {} ms",
                per_stream[0] + own,
                idle_cpu.as_millis()
            )
        } else {
            format!("{:.1} KiB; {} ms", per_stream[i], idle_cpu.as_millis())
        });
        mock.free_events();
        for h in held {
            let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
        }
    }
    row(
        &format!("{OPEN} open streams: RSS growth per stream; this process's CPU over 5 s idle"),
        open,
    );

    // A 100 MiB upload, streamed from a generator in 64 KiB chunks, through a fresh gateway
    // (the first one's peak is the 1,000 streams'): its own memory.
    drop(gw);
    let gw = gateway(&mock).await;
    let through = format!("http://{}/v1", gw.public);
    let before = gateway_process::memory(gw.pid).expect("gateway memory");
    let (hwm0, rss0) = (before.hwm_kib, before.rss_kib);
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let head = Bytes::from_static(b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n");
    let tail = Bytes::from_static(b"\r\n--b0undary\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\nbench\r\n--b0undary--\r\n");
    let parts = std::iter::once(head)
        .chain(std::iter::repeat_n(chunk, UPLOAD / (64 * 1024)))
        .chain(std::iter::once(tail));
    let frames = futures_util::stream::iter(parts.map(|b| Ok(Frame::data(b))));
    mock.set_upload_limit(u64::MAX);
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{through}/files/upload"))
        .header("content-type", "multipart/form-data; boundary=b0undary")
        .body(StreamBody::new(frames).boxed())
        .expect("request");
    let t = Instant::now();
    let resp = c.request(req).await.expect("upload answer");
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    let after = gateway_process::memory(gw.pid).expect("gateway memory");
    let (rss1, hwm1) = (after.rss_kib, after.hwm_kib);
    println!(
        "| 100 MiB upload through the gateway ({status}, {:.2} s): RSS growth; peak growth | — | {:.1} MiB; {:.1} MiB | — |",
        t.elapsed().as_secs_f64(),
        rss1.saturating_sub(rss0) as f64 / 1024.0,
        hwm1.saturating_sub(hwm0.max(rss0)) as f64 / 1024.0,
    );
}

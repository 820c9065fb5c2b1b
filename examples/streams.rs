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
//!
//! `BASELINE=<gateway binary>` adds a column for another build, measured in the same run;
//! `PIN=0` leaves placement to the kernel; `LOOP=1 LOOP_SECS=10` only repeats short runs
//! through the gateway (column 1), for a profiler.

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
const RUNS: usize = 1000;
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

/// Write system calls (`write`, `writev`, ...) process `pid` has made: `syscw` of
/// `/proc/<pid>/io`.
fn writes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))?
        .trim()
        .parse()
        .ok()
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

/// Pins every thread of process `pid` to `cpu` (`taskset -a -p`); false when that is not
/// possible here (no `taskset`, or a single CPU).
fn pin(pid: u32, cpu: usize) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    // As in `benches/e2e.sh`: each proxy one thread on CPU 0 (nginx runs one worker), the
    // client and the mock on CPU 1, so the proxies are compared on the same CPU and neither
    // waits for the other's threads. `PIN=0` leaves placement to the kernel and the gateway
    // its default worker count.
    let pinned = std::env::var("PIN").map_or(true, |v| v != "0")
        && std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    if pinned {
        // Read by this runtime and passed to the gateway child.
        std::env::set_var("TOKIO_WORKER_THREADS", "1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pinned = pinned && pin(std::process::id(), 1);
    runtime.block_on(bench(pinned));
}

async fn bench(pinned: bool) {
    let mock = MockDify::start(KEY).await.expect("mock");
    let gw = gateway(&mock).await;
    let nginx = nginx::Nginx::start(mock.addr(), KEY);
    if pinned {
        pin(gw.pid, 0);
        if let Some(n) = &nginx {
            pin(n.pid(), 0);
        }
        println!("Placement: the gateway (one worker thread) and nginx (one worker) on CPU 0; this client and the mock on CPU 1.\n");
    } else {
        println!("Placement: left to the kernel (`PIN=0`); the gateway with its default worker threads, nginx with one worker.\n");
    }
    // Another build of the gateway beside this one, for a before-and-after in one run.
    let baseline = match std::env::var_os("BASELINE") {
        Some(bin) => {
            let toml = "[log]\naccess_log = false\n";
            let log = std::env::temp_dir().join("streams-baseline.log");
            let mut b = GatewayProcess::spawn(bin.as_ref(), &mock.base_url(), KEY, toml, &log)
                .expect("the BASELINE gateway starts");
            let probe: gateway_process::HttpClient =
                Client::builder(TokioExecutor::new()).build_http();
            assert!(b.wait_healthy(&probe, Duration::from_secs(10)).await);
            if pinned {
                pin(b.pid, 0);
            }
            Some(b)
        }
        None => None,
    };
    let direct = mock.base_url();
    let through = format!("http://{}/v1", gw.public);
    // The proxies add the key; straight to the mock the client sends it. Each path: its base,
    // whether the client sends the key, the proxy's pid.
    let mut paths = vec![
        (direct.clone(), true, None),
        (through.clone(), false, Some(gw.pid)),
    ];
    let mut columns = vec!["Direct".to_string(), "Through the gateway".to_string()];
    if let Some(n) = &nginx {
        paths.push((format!("http://{}/v1", n.addr), false, Some(n.pid())));
        columns.push("Through nginx (`proxy_buffering off`)".into());
    }
    // The open streams and the upload are measured on these (not the baseline).
    let main_paths = paths.len();
    if let Some(b) = &baseline {
        paths.push((format!("http://{}/v1", b.public), false, Some(b.pid)));
        columns.push("The gateway, `BASELINE` build".into());
    }
    let c = client();
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let row = |what: &str, mut cells: Vec<String>| {
        cells.resize(columns.len(), "—".into());
        println!("| {what} | {} |", cells.join(" | "));
    };

    println!("| Measure | {} |", columns.join(" | "));
    println!("|{}", " --- |".repeat(columns.len() + 1));
    // A short run: first event and whole stream.
    mock.set_run_script(RunScript::default());
    if let Some(i) = std::env::var("LOOP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        // For a profiler: short runs through column `i` (1: the gateway) for LOOP_SECS.
        let secs = std::env::var("LOOP_SECS").ok().and_then(|v| v.parse().ok());
        let end = Instant::now() + Duration::from_secs(secs.unwrap_or(10));
        let (base, auth, pid) = &paths[i];
        println!("looping short runs through {} (pid {pid:?})", columns[i]);
        let mut n = 0;
        while Instant::now() < end {
            one_run(&c, base, *auth).await;
            n += 1;
        }
        println!("{n} runs");
        return;
    }
    for (base, auth, _) in &paths {
        // Warm the pools.
        one_run(&c, base, *auth).await;
    }
    // The proxy's own CPU over a measurement, from `/proc` (the direct path has none).
    let proxy_pid = |i: usize| paths[i].2;
    let cpu_of = |i: usize| {
        let pid = proxy_pid(i)?;
        Some((gateway_process::cpu_seconds(pid)?, writes(pid)?))
    };
    let mut short = Vec::new();
    let mut short_cpu = Vec::new();
    for (i, (base, auth, _)) in paths.iter().enumerate() {
        let c0 = cpu_of(i);
        short.push(latencies(&c, base, *auth).await);
        short_cpu.push(c0.zip(cpu_of(i)).map(|(a, b)| (b.0 - a.0, b.1 - a.1)));
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
    let mut long_cpu = Vec::new();
    for (i, (base, auth, _)) in paths.iter().enumerate() {
        let c0 = cpu_of(i);
        let l = latencies(&c, base, *auth).await;
        long.push(format!("{} / {}; {}", us(l[2]), us(l[3]), per(l[2])));
        long_cpu.push(c0.zip(cpu_of(i)).map(|(a, b)| (b.0 - a.0, b.1 - a.1)));
    }
    row(
        &format!("whole stream of {CHUNKS} chunks, p50 / p99; per event at p50"),
        long,
    );
    // Each run of the long script is the short one's events plus CHUNKS more: the difference
    // is the proxy's CPU per passed event, the short one's its CPU per run start.
    let cells = |f: &dyn Fn((f64, u64), (f64, u64)) -> String| -> Vec<String> {
        short_cpu
            .iter()
            .zip(&long_cpu)
            .map(|(s, l)| match (s, l) {
                (Some(s), Some(l)) => f(*s, *l),
                _ => "—".into(),
            })
            .collect()
    };
    row(
        "the proxy's CPU: per short run; per event passed",
        cells(&|s, l| {
            format!(
                "{:.0} µs; {:.1} µs",
                s.0 * 1e6 / RUNS as f64,
                (l.0 - s.0) * 1e6 / (RUNS * CHUNKS) as f64
            )
        }),
    );
    row(
        "the proxy's socket writes (`write`/`writev` calls): per short run; per event passed",
        cells(&|s, l| {
            format!(
                "{:.1}; {:.2}",
                s.1 as f64 / RUNS as f64,
                (l.1 as f64 - s.1 as f64) / (RUNS * CHUNKS) as f64
            )
        }),
    );

    // 1,000 open streams, held upstream after their first event.
    mock.set_run_script(RunScript::default());
    let mut open = Vec::new();
    let mut per_stream = Vec::new();
    for (i, (base, auth, _)) in paths.iter().take(main_paths).enumerate() {
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
    if pinned {
        pin(gw.pid, 0);
    }
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

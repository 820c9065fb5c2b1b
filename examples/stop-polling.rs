//! Stop polling, measured: one workload — async runs of about 30 s, 1,000 clients each waiting
//! for one run's end — served three ways in one invocation: plain polling every second, long-poll
//! (`Prefer: wait=60`) and the status stream (`/v1/workflows/run/{id}/events`). For each: the
//! requests clients made, the run-detail requests that reached the upstream, the bytes clients
//! received (heads and bodies) and the gateway's CPU time.
//!
//! The gateway is the release binary as a child process (so its CPU is its own), in front of
//! the mock Dify in this process; runs are started through the gateway as async runs, whose
//! streams the gateway follows. Loopback only; bounded in count and time. Prints a Markdown
//! table.
//!
//! ```text
//! cargo build --release --features mock && \
//!   cargo run --release --example stop-polling -- --runs 100 --clients 1000 --run-seconds 30
//! ```

#[allow(dead_code)]
#[path = "soak/gateway_process.rs"]
mod gateway_process;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use dify_gateway::mock::{MockDify, RunScript};
use gateway_process::{cpu_seconds, default_binary, healthz, GatewayProcess};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const KEY: &str = "app-stop-polling-bench";

const CONFIG: &str = "[log]\naccess_log = false\n[server]\nmax_connections = 20000\n";

#[derive(Parser)]
struct Args {
    /// Runs started at once.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Clients in all, spread evenly over the runs.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// About how long each run lasts.
    #[arg(long, default_value_t = 30)]
    run_seconds: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Poll,
    LongPoll,
    Stream,
}

impl Way {
    fn as_str(self) -> &'static str {
        match self {
            Way::Poll => "polling every 1 s",
            Way::LongPoll => "long-poll (`Prefer: wait=60`)",
            Way::Stream => "status stream",
        }
    }
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// What the clients of one way saw.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    bytes: AtomicU64,
    /// Clients that saw their run's terminal state.
    done: AtomicU64,
    failures: AtomicU64,
}

/// One row of the report.
struct Row {
    way: Way,
    requests: u64,
    upstream: u64,
    bytes: u64,
    cpu: f64,
    wall: Duration,
    done: u64,
    failures: u64,
}

/// Bytes of a response head as sent over HTTP/1.1 (status line, headers, blank line).
fn head_bytes(headers: &HeaderMap) -> u64 {
    let fields: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
        .sum();
    (17 + fields + 2) as u64
}

fn is_terminal(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    serde_json::from_slice::<Status<'_>>(body)
        .ok()
        .and_then(|s| s.status)
        .is_some_and(|s| !matches!(s, "running" | "paused" | "scheduled"))
}

async fn get(c: &Http, url: &str, headers: &[(&str, &str)]) -> Option<(StatusCode, u64, Bytes)> {
    let mut b = Request::builder().method(Method::GET).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c.request(b.body(Full::default()).ok()?).await.ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    let n = head_bytes(&parts.headers) + body.len() as u64;
    Some((parts.status, n, body))
}

/// One client waiting for `run`'s end the `way` given.
async fn client(
    c: Http,
    base: String,
    run: String,
    way: Way,
    tally: Arc<Tally>,
    deadline: Instant,
) {
    let url = format!("{base}/v1/workflows/run/{run}");
    while Instant::now() < deadline {
        let got = match way {
            Way::Poll => get(&c, &url, &[]).await,
            Way::LongPoll => get(&c, &url, &[("prefer", "wait=60")]).await,
            Way::Stream => get(&c, &format!("{url}/events"), &[]).await,
        };
        tally.requests.fetch_add(1, Ordering::Relaxed);
        let Some((status, n, body)) = got else {
            tally.failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        tally.bytes.fetch_add(n, Ordering::Relaxed);
        let terminal = match way {
            // The stream ends after the event of a run no longer running: its last data line.
            Way::Stream => body
                .split(|b| *b == b'\n')
                .rev()
                .find_map(|l| l.strip_prefix(b"data: "))
                .is_some_and(is_terminal),
            _ => status == StatusCode::OK && is_terminal(&body),
        };
        if terminal {
            tally.done.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if way == Way::Poll {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Starts an async run through the gateway; its id.
async fn start_run(c: &Http, base: &str) -> Option<String> {
    let body = r#"{"inputs": {}, "response_mode": "async", "user": "bench"}"#;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}/v1/workflows/run"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .ok()?;
    let resp = c.request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["workflow_run_id"].as_str().map(str::to_owned)
}

async fn measure(args: &Args, mock: &MockDify, way: Way) -> Row {
    let log = std::env::temp_dir().join("stop-polling-gateway.log");
    let mut gw = GatewayProcess::spawn(&default_binary(), &mock.base_url(), KEY, CONFIG, &log)
        .expect("gateway starts (build it first: cargo build --release)");
    let probe: gateway_process::HttpClient = Client::builder(TokioExecutor::new()).build_http();
    assert!(
        gw.wait_healthy(&probe, Duration::from_secs(10)).await,
        "gateway healthy"
    );
    assert_eq!(healthz(&probe, gw.public).await, Some(200));
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let c: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.clients * 2)
        .build(http);
    let base = format!("http://{}", gw.public);
    let cpu0 = cpu_seconds(gw.pid).unwrap_or(0.0);
    let t = Instant::now();
    // All runs start together (each start is answered once its run has started).
    let starts: Vec<_> = (0..args.runs)
        .map(|_| {
            let (c, base) = (c.clone(), base.clone());
            tokio::spawn(async move { start_run(&c, &base).await })
        })
        .collect();
    let mut runs = Vec::new();
    for s in starts {
        runs.push(s.await.ok().flatten().expect("run started"));
    }
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(args.run_seconds * 3 + 30);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let run = runs[i % runs.len()].clone();
        let (c, base, tally) = (c.clone(), base.clone(), Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            // Pollers start spread over their first second, as real ones do.
            if way == Way::Poll {
                tokio::time::sleep(Duration::from_millis((i as u64 * 997) % 1000)).await;
            }
            client(c, base, run, way, tally, deadline).await
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = t.elapsed();
    let cpu = cpu_seconds(gw.pid).unwrap_or(0.0) - cpu0;
    let upstream = runs.iter().map(|r| mock.hits(r)).sum();
    let _ = gw.terminate();
    let _ = gw.wait_exit(Duration::from_secs(15));
    Row {
        way,
        requests: tally.requests.load(Ordering::Relaxed),
        upstream,
        bytes: tally.bytes.load(Ordering::Relaxed),
        cpu,
        wall,
        done: tally.done.load(Ordering::Relaxed),
        failures: tally.failures.load(Ordering::Relaxed),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mock = MockDify::start(KEY).await.expect("mock starts");
    // Steps of the mock's script: started, 3 node starts and ends, the chunks, a ping and the
    // finish; the delay spreads them over the run's length.
    let chunks = 20;
    mock.set_run_script(RunScript::chunks(chunks));
    let steps = chunks as u64 + 9;
    mock.set_event_delay(Duration::from_millis(args.run_seconds * 1000 / steps));
    let mut rows = Vec::new();
    for way in [Way::Poll, Way::LongPoll, Way::Stream] {
        eprintln!("measuring {} ...", way.as_str());
        rows.push(measure(&args, &mock, way).await);
    }
    println!(
        "{} runs of about {} s, {} clients ({} per run), one gateway (2-core VM):\n",
        args.runs,
        args.run_seconds,
        args.clients,
        args.clients / args.runs.max(1)
    );
    println!("| Way | Client requests | Per client | Upstream run-detail requests | Bytes to clients | Gateway CPU | Wall | Clients that saw the end |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {} | {:.1} MB | {:.2} s | {:.1} s | {}/{}{} |",
            r.way.as_str(),
            r.requests,
            r.requests as f64 / args.clients as f64,
            r.upstream,
            r.bytes as f64 / 1e6,
            r.cpu,
            r.wall.as_secs_f64(),
            r.done,
            args.clients,
            if r.failures > 0 {
                format!(" ({} failed requests)", r.failures)
            } else {
                String::new()
            }
        );
    }
}

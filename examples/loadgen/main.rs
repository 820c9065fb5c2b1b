//! Load generator for the scenarios wrk cannot run, and the report of `benches/e2e.sh`.
//!
//! Invariant: every mode is bounded — by a request count or a duration — and talks only to the
//! address it is given (the script gives it loopback addresses). Each client task owns one
//! HTTP/1.1 keep-alive connection, so `--conc N` means N connections. Results are printed as
//! `key=value` lines that the script appends to its results file.
//!
//! ```text
//! loadgen ports N
//! loadgen warm     --addr A --prefix P --count N [--conc C]
//! loadgen stampede --addr A --id ID --clients N --delay-ms D
//! loadgen poll     --addr A --prefix P --runs R --pollers N --interval-ms I --duration-s D
//!                  --running-s S --ttl-ms T
//! loadgen report   FILE
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

mod report;

/// The run id the scenarios use for index `i` of id set `prefix`: distinct prefixes give fresh
/// runs on the same mock (whose runs start their clock at the first request). `benches/wrk.lua`
/// builds the same ids.
fn run_id(prefix: u32, i: u64) -> String {
    format!("{prefix:08x}-0000-4000-8000-{i:012x}")
}

/// Named `--flag value` options.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let name = k
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --option, got {k}"))?;
            let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
            m.insert(name.to_owned(), v.clone());
        }
        Ok(Opts(m))
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T, String> {
        match self.0.get(name) {
            Some(v) => v.parse().map_err(|_| format!("--{name}: bad value {v}")),
            None => default.ok_or_else(|| format!("--{name} is required")),
        }
    }
}

/// One client connection.
struct Conn {
    tx: SendRequest<Empty<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            tx,
            host: addr.to_string(),
        })
    }

    /// GETs `path` and reads the whole body.
    async fn get(&mut self, path: &str) -> Result<Answer, String> {
        let req = Request::get(path)
            .header(http::header::HOST, &self.host)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        self.tx.ready().await.map_err(|e| e.to_string())?;
        let resp = self.tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let x_cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            x_cache,
            body,
        })
    }
}

/// What one request brought back.
struct Answer {
    status: StatusCode,
    x_cache: String,
    body: Bytes,
}

impl Answer {
    /// The run's JSON `status`, when the body is a run.
    fn run_status(&self) -> Option<String> {
        dify_gateway::policy::run_status(&self.body)
            .ok()
            .flatten()
            .map(|s| s.into_owned())
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Prints free loopback ports (bound on port 0, then released).
fn ports(n: usize) -> Result<(), String> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    for l in &ls {
        println!("{}", l.local_addr().map_err(|e| e.to_string())?.port());
    }
    Ok(())
}

/// Counts of what a batch of requests brought back.
#[derive(Default)]
struct Tally {
    ok: u64,
    other_status: u64,
    errors: u64,
    body_bytes: u64,
    by_x_cache: HashMap<String, u64>,
}

impl Tally {
    /// The answer counts as `key=value` lines.
    fn print(&self) {
        println!("ok={}", self.ok);
        println!("other_status={}", self.other_status);
        println!("errors={}", self.errors);
        for k in ["HIT", "MISS", "COALESCED"] {
            println!(
                "x_cache_{}={}",
                k.to_lowercase(),
                self.by_x_cache.get(k).copied().unwrap_or(0)
            );
        }
    }
}

/// GETs runs `0..count` of `prefix` once each over `conc` connections: fills a cache, or reads
/// it back to check every run is a hit.
async fn warm(o: &Opts) -> Result<(), String> {
    let addr: SocketAddr = o.get("addr", None)?;
    let prefix: u32 = o.get("prefix", None)?;
    let count: u64 = o.get("count", None)?;
    let conc: usize = o.get("conc", Some(32))?;
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (next, tally) = (Arc::clone(&next), Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, String>(());
                }
                let path = format!("/v1/workflows/run/{}", run_id(prefix, i));
                let r = conn.get(&path).await;
                let failed = {
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(a) => {
                            if a.status == StatusCode::OK {
                                t.ok += 1;
                                t.body_bytes += a.body.len() as u64;
                            } else {
                                t.other_status += 1;
                            }
                            *t.by_x_cache.entry(a.x_cache).or_default() += 1;
                            false
                        }
                        Err(_) => {
                            t.errors += 1;
                            true
                        }
                    }
                };
                if failed {
                    conn = Conn::open(addr).await?;
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    println!("requests={count}");
    t.print();
    println!("body_bytes={}", t.body_bytes);
    println!("secs={secs:.3}");
    println!("rps={:.0}", count as f64 / secs);
    Ok(())
}

/// `clients` connections, all open before any request, then one request each for the same run
/// at once. Reports when answers came back relative to the first send plus the upstream delay.
async fn stampede(o: &Opts) -> Result<(), String> {
    let addr: SocketAddr = o.get("addr", None)?;
    let id: String = o.get("id", None)?;
    let clients: usize = o.get("clients", None)?;
    let delay_ms: f64 = o.get("delay-ms", None)?;
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Conn::open(addr).await?);
    }
    let (go_tx, go_rx) = tokio::sync::watch::channel(None::<Instant>);
    let path = Arc::new(format!("/v1/workflows/run/{id}"));
    let mut tasks = Vec::with_capacity(clients);
    for mut c in conns {
        let mut go = go_rx.clone();
        let path = Arc::clone(&path);
        tasks.push(tokio::spawn(async move {
            let _ = go.wait_for(Option::is_some).await;
            let sent = Instant::now();
            let r = c.get(&path).await;
            // The connection goes back with the result: closing it now would make the server
            // handle this close while it is still answering the other waiters.
            (sent, Instant::now(), r, c)
        }));
    }
    let t0 = Instant::now();
    let _ = go_tx.send(Some(t0));
    let mut results = Vec::with_capacity(clients);
    for t in tasks {
        results.push(t.await.map_err(|e| e.to_string())?);
    }
    let mut sends = Vec::new();
    let mut done = Vec::new();
    let mut tally = Tally::default();
    for (sent, recv, r, _conn) in &results {
        let (sent, recv) = (*sent, *recv);
        sends.push(sent.duration_since(t0).as_secs_f64() * 1e3);
        done.push(recv.duration_since(t0).as_secs_f64() * 1e3);
        match r {
            Ok(a) if a.status == StatusCode::OK => {
                tally.ok += 1;
                *tally.by_x_cache.entry(a.x_cache.clone()).or_default() += 1;
            }
            Ok(_) => tally.other_status += 1,
            Err(_) => tally.errors += 1,
        }
    }
    let sends = sorted(sends);
    let done = sorted(done);
    let first_send = sends[0];
    // The upstream answers `delay` after the leader's request reaches it, which is at the
    // earliest the first send: lag is measured from that instant, so it is an upper bound.
    let lag: Vec<f64> = done.iter().map(|d| d - first_send - delay_ms).collect();
    println!("clients={clients}");
    tally.print();
    println!("send_spread_ms={:.2}", sends[sends.len() - 1] - first_send);
    println!("first_answer_ms={:.2}", done[0]);
    println!("last_answer_ms={:.2}", done[done.len() - 1]);
    println!("answer_spread_ms={:.2}", done[done.len() - 1] - done[0]);
    println!("lag_after_upstream_p50_ms={:.2}", pct(&lag, 50.0));
    println!("lag_after_upstream_p99_ms={:.2}", pct(&lag, 99.0));
    println!("lag_after_upstream_max_ms={:.2}", lag[lag.len() - 1]);
    Ok(())
}

/// What the pollers saw of one run.
#[derive(Default)]
struct RunSeen {
    first_sent: Option<Instant>,
    /// Arrival times of answers that started an upstream fetch (`X-Cache: MISS`) and were
    /// still `running`.
    running_fetches: Vec<Instant>,
    terminal_fetches: u64,
    first_terminal: Option<Instant>,
}

/// `pollers` clients poll `runs` fresh runs (poller `p` polls run `p % runs`) every
/// `interval` for `duration`. The mock keeps each run `running` for `running_s` after its first
/// request. Reports upstream fetches per run (each `MISS` answer is one) and how late the
/// pollers saw the terminal state.
async fn poll(o: &Opts) -> Result<(), String> {
    let addr: SocketAddr = o.get("addr", None)?;
    let prefix: u32 = o.get("prefix", None)?;
    let runs: u64 = o.get("runs", None)?;
    let pollers: u64 = o.get("pollers", None)?;
    let interval = Duration::from_millis(o.get("interval-ms", None)?);
    let duration = Duration::from_secs(o.get("duration-s", None)?);
    let running = Duration::from_secs(o.get("running-s", None)?);
    let ttl = Duration::from_millis(o.get("ttl-ms", None)?);
    let seen: Arc<Mutex<Vec<RunSeen>>> =
        Arc::new(Mutex::new((0..runs).map(|_| RunSeen::default()).collect()));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..pollers {
        conns.push(Conn::open(addr).await?);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + duration;
    let mut tasks = Vec::new();
    for (p, mut conn) in conns.into_iter().enumerate() {
        let p = p as u64;
        let run = p % runs;
        let path = format!("/v1/workflows/run/{}", run_id(prefix, run));
        // Spread pollers evenly over one interval, as independent clients would be.
        let phase = interval.mul_f64(p as f64 / pollers as f64);
        let (seen, latencies, errors) = (seen.clone(), latencies.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start + phase, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut lat = Vec::new();
            loop {
                if tick.tick().await >= end {
                    break;
                }
                let sent = Instant::now();
                let r = conn.get(&path).await;
                let recv = Instant::now();
                let Ok(a) = r else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    match Conn::open(addr).await {
                        Ok(c) => conn = c,
                        Err(_) => break,
                    }
                    continue;
                };
                lat.push(recv.duration_since(sent).as_secs_f64() * 1e6);
                let terminal = a.run_status().is_some_and(|s| s != "running");
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                let r = &mut s[run as usize];
                r.first_sent = Some(r.first_sent.map_or(sent, |f| f.min(sent)));
                if a.x_cache == "MISS" {
                    if terminal {
                        r.terminal_fetches += 1;
                    } else {
                        r.running_fetches.push(recv);
                    }
                }
                if terminal && r.first_terminal.is_none_or(|f| recv < f) {
                    r.first_terminal = Some(recv);
                }
            }
            latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(lat);
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let lat = sorted(std::mem::take(
        &mut *latencies.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    let mut running_fetches = 0usize;
    let mut terminal_fetches = 0u64;
    let mut gaps = Vec::new();
    let mut lags = Vec::new();
    let mut max_per_run = 0usize;
    for r in seen.iter() {
        running_fetches += r.running_fetches.len();
        terminal_fetches += r.terminal_fetches;
        max_per_run = max_per_run.max(r.running_fetches.len());
        gaps.extend(
            r.running_fetches
                .windows(2)
                .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3),
        );
        if let (Some(first), Some(term)) = (r.first_sent, r.first_terminal) {
            // The mock's clock starts when the gateway's first fetch reaches it, no earlier
            // than our first send: so this lag is an upper bound.
            lags.push(term.duration_since(first + running).as_secs_f64() * 1e3);
        }
    }
    let gaps = sorted(gaps);
    let lags = sorted(lags);
    let requests = lat.len();
    println!("pollers={pollers}");
    println!("runs={runs}");
    println!("interval_ms={}", interval.as_millis());
    println!("duration_s={}", duration.as_secs());
    println!("running_s={}", running.as_secs());
    println!("requests={requests}");
    println!("errors={}", errors.load(Ordering::Relaxed));
    println!("rps={:.0}", requests as f64 / duration.as_secs_f64());
    println!("latency_p50_us={:.0}", pct(&lat, 50.0));
    println!("latency_p99_us={:.0}", pct(&lat, 99.0));
    println!("upstream_fetches_while_running={running_fetches}");
    println!("upstream_fetches_terminal={terminal_fetches}");
    println!(
        "upstream_per_run_per_s_while_running={:.3}",
        running_fetches as f64 / (runs as f64 * running.as_secs_f64())
    );
    println!(
        "upstream_per_run_per_ttl_while_running={:.3}",
        running_fetches as f64 / (runs as f64 * running.as_secs_f64() / ttl.as_secs_f64())
    );
    println!("max_fetches_one_run_while_running={max_per_run}");
    println!("min_gap_between_fetches_ms={:.1}", pct(&gaps, 0.0));
    println!("median_gap_between_fetches_ms={:.1}", pct(&gaps, 50.0));
    println!("runs_seen_terminal={}", lags.len());
    println!("terminal_lag_p50_ms={:.0}", pct(&lags, 50.0));
    println!("terminal_lag_max_ms={:.0}", pct(&lags, 100.0));
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        eprintln!("usage: loadgen ports|warm|stampede|poll|report ...");
        std::process::exit(2);
    };
    let rest = &args[1..];
    let r = match mode.as_str() {
        "ports" => rest
            .first()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| "ports N".to_owned())
            .and_then(ports),
        "report" => rest
            .first()
            .ok_or_else(|| "report FILE".to_owned())
            .and_then(|f| report::print(std::path::Path::new(f))),
        _ => Opts::parse(rest).and_then(|o| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                match mode.as_str() {
                    "warm" => warm(&o).await,
                    "stampede" => stampede(&o).await,
                    "poll" => poll(&o).await,
                    m => Err(format!("unknown mode {m}")),
                }
            })
        }),
    };
    if let Err(e) = r {
        eprintln!("loadgen {mode}: {e}");
        std::process::exit(1);
    }
}

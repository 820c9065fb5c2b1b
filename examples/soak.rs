//! Soak test: the release gateway binary, as a child process, in front of the mock Dify (in this
//! process), under a bounded mixed load with injected upstream faults; then a graceful shutdown
//! under load. Prints a Markdown report and writes it to `bench-results/soak-<date>.md`.
//!
//! Invariant: the run touches only loopback and stops by itself (load for `--seconds`, then a
//! few seconds of shutdown), and it exits non-zero exactly when an invariant failed (1) or the
//! soak could not run (2).
//!
//! ```text
//! scripts/soak.sh                 # builds release, runs 120 s
//! scripts/soak.sh --seconds 30    # arguments are passed through
//! ```

#[path = "soak/director.rs"]
mod director;
#[path = "soak/gateway_process.rs"]
mod gateway_process;
#[path = "soak/report.rs"]
mod report;
#[path = "soak/runs.rs"]
mod runs;
#[path = "soak/scrape.rs"]
mod scrape;
#[path = "soak/shutdown.rs"]
mod shutdown;
#[path = "soak/slowloris.rs"]
mod slowloris;
#[path = "soak/tally.rs"]
mod tally;
#[path = "soak/workload.rs"]
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use dify_gateway::mock::MockDify;

use director::Director;
use gateway_process::{cpu_seconds, get_text, healthz, memory, GatewayProcess};
use report::Figures;
use runs::Pools;
use scrape::{LogScan, MetricMap};
use tally::Tally;
use workload::Shape;

/// The app key the mock expects and the gateway is given.
const KEY: &str = "app-SOAK-0123456789abcdef";

/// The gateway's config for the soak; listen, admin listen and upstream come as flags.
const CONFIG: &str = r#"# Written by examples/soak.rs. Listen addresses and the upstream are given as flags.
[server]
# Short, so slow clients are seen being cut within the run.
header_read_timeout = "5s"
drain_timeout = "10s"

[upstream]
# Lowered so hanging upstream answers end in 504 quickly.
total_timeout = "2s"
retry_base_delay = "20ms"
# Lowered (default 16 MiB) so the oversize fault costs 1.5 MiB per request, not 17 MiB.
max_body_bytes = 1048576

[cache]
max_bytes = 67108864
running_ttl = "500ms"
stale_if_error = "5s"

[log]
# Off: one line per request would dominate the log file; warnings and errors still go there.
access_log = false
"#;

/// Soak test of dify-gateway against the mock Dify with injected faults.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of mixed load (warm-up included).
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Concurrent clients during the load.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Mean pause of a client between requests, in ms (each pause is this ± 50 %).
    #[arg(long, default_value_t = 100)]
    think_ms: u64,
    /// Requests on fault runs, per mille (at most 388), spread evenly over the ten fault kinds.
    #[arg(long, default_value_t = 60)]
    fault_permille: u32,
    /// Concurrent clients during the graceful-shutdown phase.
    #[arg(long, default_value_t = 50)]
    shutdown_clients: usize,
    /// The gateway binary [default: target/release/dify-gateway beside this example].
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Directory for the report and the gateway's log.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Do not fail on upstream 200s with malformed JSON being passed through as 200 (the
    /// README documents the pass-through); they are still counted and reported.
    #[arg(long)]
    allow_passthrough: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the soak; `Ok(false)` when an invariant failed.
async fn run(args: Args) -> Result<bool, String> {
    let bin = args
        .gateway
        .clone()
        .unwrap_or_else(gateway_process::default_binary);
    if !bin.is_file() {
        return Err(format!(
            "no gateway binary at {} (build it with `cargo build --release --bin dify-gateway`)",
            bin.display()
        ));
    }
    if args.fault_permille > runs::MAX_FAULT_PERMILLE {
        return Err(format!(
            "--fault-permille is at most {}",
            runs::MAX_FAULT_PERMILLE
        ));
    }
    let load = Duration::from_secs(args.seconds.max(10));
    let warmup = Duration::from_secs(5).min(load / 4);
    let stamp = utc_stamp();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let log_path = args.out.join(format!("soak-{stamp}-gateway.log"));
    let report_path = args.out.join(format!("soak-{stamp}.md"));

    let mock = MockDify::start(KEY)
        .await
        .map_err(|e| format!("mock: {e}"))?;
    let mut gw = GatewayProcess::spawn(&bin, &mock.base_url(), KEY, CONFIG, &log_path)
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let http = workload::http_client(args.clients);
    if !gw.wait_healthy(&http, Duration::from_secs(15)).await {
        return Err(format!(
            "the gateway did not answer /healthz within 15 s; see {}",
            log_path.display()
        ));
    }
    eprintln!(
        "soak: gateway pid {} on {} (admin {}), mock on {}; load {} s with {} clients",
        gw.pid,
        gw.public,
        gw.admin,
        mock.addr(),
        load.as_secs(),
        args.clients
    );
    let base: Arc<str> = format!("http://{}", gw.public).into();
    let pools = Arc::new(Pools::new(&mock));
    workload::warm(&http, &base, &pools).await?;

    // The load: clients, the director, slow clients and a 1 s sampler, all until `stop`.
    let director = Director::new(Arc::clone(&pools));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let upstream_at_start = mock.total();
    let cpu_at_start = cpu_seconds(gw.pid);
    let outages = director::outage_plan(load);
    let director = tokio::spawn(director.run(t0, outages, Arc::clone(&stop)));
    let slow = tokio::spawn(slowloris::run(gw.public, load, Arc::clone(&stop)));
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            tokio::spawn(workload::client_loop(
                Arc::clone(&pools),
                http.clone(),
                Arc::clone(&base),
                Shape {
                    think_ms: args.think_ms,
                    fault_permille: args.fault_permille,
                },
                Arc::clone(&stop),
            ))
        })
        .collect();
    let sampler = Sampler::default();
    let sampling = tokio::spawn(sampler.clone().run(
        gw.pid,
        gw.admin,
        http.clone(),
        Arc::clone(&stop),
    ));
    tokio::time::sleep(warmup).await;
    let rss_start = memory(gw.pid);
    eprintln!(
        "soak: warm-up done, RSS {} KiB; loading…",
        rss_start.map_or(0, |m| m.rss_kib)
    );
    tokio::time::sleep_until((t0 + load).into()).await;
    stop.store(true, Ordering::Relaxed);

    let mut tally = Tally::default();
    for c in clients {
        if let Ok(t) = c.await {
            tally.merge(&t);
        }
    }
    let elapsed = t0.elapsed();
    let upstream_requests = mock.total() - upstream_at_start;
    let rss_end = memory(gw.pid);
    let cpu_end = cpu_seconds(gw.pid);
    let outages = director.await.unwrap_or_default();
    let slow = slow.await.unwrap_or_default();
    let _ = sampling.await;
    let alive_end = gw.is_alive();
    let healthz_end = healthz(&http, gw.public).await;
    let metrics = MetricMap::parse(
        &get_text(&http, gw.admin, "/metrics")
            .await
            .unwrap_or_default(),
    );
    let cache_stats = get_text(&http, gw.admin, "/admin/cache/stats").await;
    eprintln!(
        "soak: load done ({} requests); graceful shutdown under load…",
        tally.all.sent
    );

    let shutdown = shutdown::run(gw, &mock, Arc::clone(&pools), args.shutdown_clients).await;
    let log = std::fs::read_to_string(&log_path)
        .map(|t| LogScan::of(&t))
        .unwrap_or_default();

    let samples = sampler.take();
    let rss: Vec<u64> = samples.rss_kib;
    let figures = Figures {
        stamp,
        commit: git_commit(),
        config: CONFIG.to_owned(),
        planned: load,
        elapsed,
        warmup,
        clients: args.clients,
        think_ms: args.think_ms,
        mix: runs::mix(args.fault_permille)
            .iter()
            .map(|(p, s)| format!("{p:?} {s}‰"))
            .collect::<Vec<_>>()
            .join(", "),
        tally,
        upstream_requests,
        rss_start,
        rss_end,
        rss_min_max_kib: rss
            .iter()
            .min()
            .zip(rss.iter().max())
            .map(|(a, b)| (*a, *b)),
        cpu_load_secs: cpu_end.zip(cpu_at_start).map(|(e, s)| e - s),
        cpu_total_secs: cpu_end,
        metrics,
        cache_stats,
        circuit_samples: (samples.circuit_open, samples.taken),
        outages,
        slow,
        alive_end,
        healthz_end,
        shutdown,
        log,
        log_path: log_path.display().to_string(),
        allow_passthrough: args.allow_passthrough,
    };
    let checks = figures.checks();
    let md = figures.markdown(&checks);
    println!("{md}");
    std::fs::write(&report_path, &md).map_err(|e| format!("{}: {e}", report_path.display()))?;
    let failed: Vec<&str> = checks.iter().filter(|c| !c.held).map(|c| c.name).collect();
    eprintln!("soak: report written to {}", report_path.display());
    if failed.is_empty() {
        eprintln!("soak: all invariants held");
    } else {
        eprintln!(
            "soak: {} invariant(s) FAILED: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(failed.is_empty())
}

/// Once a second: the gateway's RSS and whether its circuit is open.
#[derive(Clone, Default)]
struct Sampler(Arc<Mutex<Samples>>);

#[derive(Default)]
struct Samples {
    rss_kib: Vec<u64>,
    circuit_open: u64,
    taken: u64,
}

impl Sampler {
    async fn run(
        self,
        pid: u32,
        admin: std::net::SocketAddr,
        http: gateway_process::HttpClient,
        stop: Arc<AtomicBool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let rss = memory(pid).map(|m| m.rss_kib);
            let open = get_text(&http, admin, "/metrics").await.map(|t| {
                MetricMap::parse(&t).get("dify_gateway_upstream_circuit_open") == Some(1.0)
            });
            let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            s.rss_kib.extend(rss);
            if let Some(open) = open {
                s.taken += 1;
                s.circuit_open += u64::from(open);
            }
        }
    }

    fn take(&self) -> Samples {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The commit the gateway was built from, if git can tell.
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_owned())
}

/// `YYYY-MM-DD-HHMMSS` in UTC (days-to-civil after Howard Hinnant's `civil_from_days`).
fn utc_stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

//! Graceful shutdown under load: SIGTERM while clients are still requesting, some of them runs
//! whose upstream answer takes 1 s.
//!
//! Invariant: requests are classed by when they started and ended relative to the signal, so
//! "in flight" means started before it and finished after it; the phase ends by itself (clients
//! stop [`CLIENTS_AFTER_SIGNAL`] after the signal; the exit is awaited at most [`EXIT_WAIT`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dify_gateway::mock::{run_body, MockDify, Reply};
use tokio::net::TcpStream;

use crate::gateway_process::{GatewayProcess, HttpClient};
use crate::runs::{Pools, Rng};
use crate::workload::{fetch, http_client};

/// The slow run's upstream delay.
const SLOW: Duration = Duration::from_secs(1);
/// Load before the signal.
const LOAD_BEFORE: Duration = Duration::from_millis(2500);
/// Clients keep requesting this long after the signal.
const CLIENTS_AFTER_SIGNAL: Duration = Duration::from_millis(2500);
/// Longest wait for the process to exit (the soak config's drain timeout is 10 s).
const EXIT_WAIT: Duration = Duration::from_secs(40);
/// When new connections are tried, after the signal.
const PROBES_MS: [u64; 4] = [50, 150, 300, 600];
/// Longest wait for the upstream path to answer a fresh run (the circuit's cool-down is 10 s).
const READY_WAIT: Duration = Duration::from_secs(20);

/// One request of the phase.
struct Rec {
    start: Instant,
    end: Instant,
    slow: bool,
    /// `200`, `200 wrong body`, another status, or `error: <kind>`.
    outcome: String,
}

/// What the phase found.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    pub clients: usize,
    pub slow_clients: usize,
    /// Time until a fresh run was answered 200 before the phase (`None`: never, within
    /// [`READY_WAIT`]); the load may have left the circuit open.
    pub upstream_ready_after: Option<Duration>,
    pub finished_before: u64,
    pub in_flight: BTreeMap<String, u64>,
    pub in_flight_slow: u64,
    pub started_after: BTreeMap<String, u64>,
    /// (ms after the signal, outcome, before the process exited).
    pub probes: Vec<(u64, &'static str, bool)>,
    pub exit_code: Option<i32>,
    /// Signal to exit; `None` when it did not exit within [`EXIT_WAIT`].
    pub exit_after: Option<Duration>,
}

impl ShutdownReport {
    pub fn in_flight_total(&self) -> u64 {
        self.in_flight.values().sum()
    }

    pub fn in_flight_all_ok(&self) -> bool {
        self.in_flight_total() > 0 && self.in_flight.keys().all(|k| k == "200")
    }

    /// Probes made while the process still ran (draining) were all refused.
    pub fn new_connections_refused(&self) -> bool {
        let during: Vec<_> = self.probes.iter().filter(|p| p.2).collect();
        !during.is_empty() && during.iter().all(|p| p.1 == "refused")
    }
}

/// Runs the phase against `gw`, which it consumes: a process that did not exit in time is killed
/// when the handle drops.
pub async fn run(
    mut gw: GatewayProcess,
    mock: &MockDify,
    pools: Arc<Pools>,
    clients: usize,
) -> ShutdownReport {
    let slow_clients = (clients * 2 / 5).max(1);
    let mut report = ShutdownReport {
        clients,
        slow_clients,
        ..ShutdownReport::default()
    };
    let public = gw.public;
    let base: Arc<str> = format!("http://{public}").into();
    let http = http_client(clients);
    report.upstream_ready_after = upstream_ready(&http, &base, mock).await;
    mock.set_delay(SLOW);
    let stop = Arc::new(AtomicBool::new(false));
    let recs = Arc::new(Mutex::new(Vec::<Rec>::new()));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (pools, http, base) = (Arc::clone(&pools), http.clone(), Arc::clone(&base));
        let (stop, recs, mock) = (Arc::clone(&stop), Arc::clone(&recs), mock.clone());
        let slow = i < slow_clients;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::seeded();
            while !stop.load(Ordering::Relaxed) {
                let (id, good) = if slow {
                    fresh_run(&mock)
                } else {
                    let t = &pools.hot[rng.range(0, pools.hot.len() as u64) as usize];
                    (t.id.clone(), t.good[0].clone())
                };
                let start = Instant::now();
                let r = fetch(&http, &format!("{base}/v1/workflows/run/{id}")).await;
                let outcome = match r {
                    Ok((200, _, body)) if body == good => "200".to_owned(),
                    Ok((200, _, _)) => "200 wrong body".to_owned(),
                    Ok((s, _, _)) => s.to_string(),
                    Err(e) => format!("error: {}", e.as_str()),
                };
                let rec = Rec {
                    start,
                    end: Instant::now(),
                    slow,
                    outcome,
                };
                recs.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(rec);
                tokio::time::sleep(Duration::from_millis(rng.range(10, 30))).await;
            }
        }));
    }
    tokio::time::sleep(LOAD_BEFORE).await;

    let signal_at = Instant::now();
    let signalled = gw.terminate();
    let waiter = tokio::task::spawn_blocking(move || {
        let status = gw.wait_exit(EXIT_WAIT);
        (status, Instant::now(), gw)
    });
    let mut probes = Vec::new();
    for ms in PROBES_MS {
        tokio::time::sleep_until((signal_at + Duration::from_millis(ms)).into()).await;
        probes.push((ms, probe(public).await));
    }
    tokio::time::sleep_until((signal_at + CLIENTS_AFTER_SIGNAL).into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (status, exited_at) = match waiter.await {
        Ok((status, at, _gw)) => (status, at),
        // The waiter panicked; its unwinding dropped (and so killed) the process.
        Err(_) => (None, Instant::now()),
    };
    mock.set_delay(Duration::ZERO);

    if let Err(e) = signalled {
        eprintln!("soak: could not signal the gateway: {e}");
    }
    report.exit_code = status.and_then(|s| s.code());
    report.exit_after = status.map(|_| exited_at - signal_at);
    let exit_offset = status.map(|_| exited_at - signal_at);
    report.probes = probes
        .into_iter()
        .map(|(ms, o)| {
            let before_exit = exit_offset.is_none_or(|e| Duration::from_millis(ms) < e);
            (ms, o, before_exit)
        })
        .collect();
    let recs = std::mem::take(&mut *recs.lock().unwrap_or_else(PoisonError::into_inner));
    for r in recs {
        if r.end < signal_at {
            report.finished_before += 1;
        } else if r.start < signal_at {
            *report.in_flight.entry(r.outcome).or_default() += 1;
            report.in_flight_slow += u64::from(r.slow);
        } else {
            *report.started_after.entry(r.outcome).or_default() += 1;
        }
    }
    report
}

/// A new terminal run in the mock: its id and body.
fn fresh_run(mock: &MockDify) -> (String, bytes::Bytes) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = run_body(&id, "\"succeeded\"", 512);
    mock.set(&id, Reply::ok_json(body.clone()));
    (id, body)
}

/// Asks for fresh runs until one is answered 200 (the circuit is closed again), for at most
/// [`READY_WAIT`]; how long that took.
async fn upstream_ready(http: &HttpClient, base: &str, mock: &MockDify) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < READY_WAIT {
        let (id, _) = fresh_run(mock);
        if let Ok((200, _, _)) = fetch(http, &format!("{base}/v1/workflows/run/{id}")).await {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Tries a new TCP connection: `refused`, `accepted`, or `error`.
async fn probe(addr: SocketAddr) -> &'static str {
    match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
        Ok(Ok(_)) => "accepted",
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    }
}

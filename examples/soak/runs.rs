//! The runs the mock knows: hot terminal runs, polled runs, the outage set, fault runs and fresh
//! ids, and the mix clients draw them from.
//!
//! Invariant: every id a client requests has its mock reply set before the first request, and
//! its `good` list holds every body a correct gateway may answer with a 200 for it (none for a
//! fault that never recovers), so the tally can judge each 200 by its bytes.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dify_gateway::mock::{run_body, MockDify, Reply};
use http::StatusCode;

use crate::tally::{Category, Fault, Seen};

/// Hot terminal runs fetched during warm-up.
const HOT_RUNS: usize = 50;
/// Running runs polled at once; each turns terminal 2–6 s after it appears, then is replaced.
pub const POLL_SLOTS: usize = 40;
/// Running runs that outage windows switch to 503.
const OUTAGE_RUNS: usize = 20;
/// Ids per fault kind.
pub const IDS_PER_FAULT: usize = 3;
/// Larger than the gateway's `upstream.max_body_bytes` (1 MiB in the soak config).
const OVERSIZE_OUTPUT: usize = 1536 * 1024;

/// Share of requests per category, in per mille, besides faults (spread evenly over the fault
/// kinds); hot runs take what `--fault-permille` leaves.
const MIX: [(Pick, u32); 6] = [
    (Pick::Poll, 200),
    (Pick::Outage, 60),
    (Pick::Fresh404, 75),
    (Pick::FreshTerminal, 75),
    (Pick::BadId, 2),
    (Pick::Fault, 0),
];

/// The per-mille shares in [`MIX`] that are neither faults nor hot runs.
const fn others_permille() -> u32 {
    let (mut i, mut sum) = (0, 0);
    while i < MIX.len() {
        sum += MIX[i].1;
        i += 1;
    }
    sum
}

/// The most `--fault-permille` may be: hot runs keep at least 20 %.
pub const MAX_FAULT_PERMILLE: u32 = 1000 - others_permille() - 200;

/// The request mix with `fault` per mille on faults; the rest of the 1000 goes to hot runs.
pub fn mix(fault: u32) -> Vec<(Pick, u32)> {
    let fault = fault.min(MAX_FAULT_PERMILLE);
    let mut m: Vec<(Pick, u32)> = MIX
        .iter()
        .map(|&(p, s)| (p, if matches!(p, Pick::Fault) { fault } else { s }))
        .collect();
    let rest = 1000 - m.iter().map(|(_, s)| s).sum::<u32>();
    m.push((Pick::Hot, rest));
    m
}

/// What a client asks for next.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    Hot,
    Poll,
    Outage,
    Fresh404,
    FreshTerminal,
    Fault,
    BadId,
}

/// A small, fast generator (splitmix64); the soak needs spread, not cryptographic quality.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        Rng(uuid::Uuid::new_v4().as_u64_pair().0)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// One run id a client may request, and what a 200 for it may carry.
#[derive(Debug)]
pub struct Target {
    pub id: String,
    pub category: Category,
    /// Bodies a correct gateway may answer with a 200.
    pub good: Vec<Bytes>,
    /// The malformed body the upstream itself sends with a 200, for the malformed-JSON faults.
    pub injected: Option<Bytes>,
}

impl Target {
    pub fn seen(&self) -> Seen<'_> {
        Seen {
            category: self.category,
            id: &self.id,
            good: &self.good,
            injected: self.injected.as_ref(),
        }
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

const TERMINAL: [&str; 4] = [
    "\"succeeded\"",
    "\"failed\"",
    "\"partial-succeeded\"",
    "\"stopped\"",
];

fn html(status: StatusCode, text: &'static str) -> Reply {
    Reply::Bytes {
        status,
        content_type: "text/html",
        headers: vec![],
        body: Bytes::from_static(text.as_bytes()),
    }
}

pub fn outage_reply() -> Reply {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        "<html><body>503 Service Temporarily Unavailable</body></html>",
    )
}

/// Sets the mock up for one fault kind on a new id.
pub fn fault_target(mock: &MockDify, fault: Fault) -> Arc<Target> {
    let id = new_id();
    let run = run_body(&id, "\"succeeded\"", 512);
    let half = run.slice(..run.len() / 2);
    let (good, injected) = match fault {
        Fault::Http500 => {
            mock.set(
                &id,
                Reply::json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "{\"message\": \"Internal Server Error\", \"code\": \"unknown\", \"status\": 500}\n",
                ),
            );
            (vec![], None)
        }
        Fault::Flap502503 => {
            mock.set_sequence(
                &id,
                vec![
                    html(
                        StatusCode::BAD_GATEWAY,
                        "<html><body>502 Bad Gateway</body></html>",
                    ),
                    outage_reply(),
                    Reply::ok_json(run.clone()),
                ],
            );
            (vec![run], None)
        }
        Fault::Cf429Short => {
            mock.set_sequence(
                &id,
                vec![Reply::cloudflare_429(1), Reply::ok_json(run.clone())],
            );
            (vec![run], None)
        }
        Fault::Cf429Long => {
            mock.set(&id, Reply::cloudflare_429(60));
            (vec![], None)
        }
        Fault::TruncatedJson => {
            mock.set(&id, Reply::ok_json(half.clone()));
            (vec![], Some(half))
        }
        Fault::InvalidJson => {
            let bad = Bytes::from(format!(
                "{{\"id\": \"{id}\", \"status\": succeeded, \"outputs\": {{}},}}\n"
            ));
            mock.set(&id, Reply::ok_json(bad.clone()));
            (vec![], Some(bad))
        }
        Fault::Oversize => {
            mock.set(
                &id,
                Reply::ok_json(run_body(&id, "\"succeeded\"", OVERSIZE_OUTPUT)),
            );
            (vec![], None)
        }
        Fault::ResetMidBody => {
            mock.set(
                &id,
                Reply::ResetMidBody {
                    partial: half,
                    claimed: run.len(),
                },
            );
            (vec![], None)
        }
        Fault::Hang => {
            mock.set(&id, Reply::Hang);
            (vec![], None)
        }
        Fault::StreamForever => {
            mock.set(&id, Reply::StreamForever);
            (vec![], None)
        }
    };
    Arc::new(Target {
        id,
        category: Category::Fault(fault),
        good,
        injected,
    })
}

/// A polled run: `running` until `switch_at`, then terminal; replaced at `retire_at`.
pub struct PollSlot {
    pub target: Arc<Target>,
    pub terminal: Bytes,
    pub switch_at: Instant,
    pub retire_at: Instant,
    pub switched: bool,
}

impl PollSlot {
    pub fn new(mock: &MockDify, rng: &mut Rng) -> PollSlot {
        let id = new_id();
        let running = run_body(&id, "\"running\"", 256);
        let status = TERMINAL[rng.range(0, 4) as usize];
        let terminal = run_body(&id, status, 256);
        mock.set(&id, Reply::ok_json(running.clone()));
        let switch_at = Instant::now() + Duration::from_millis(rng.range(2000, 6000));
        PollSlot {
            target: Arc::new(Target {
                id,
                category: Category::Poll,
                good: vec![running, terminal.clone()],
                injected: None,
            }),
            terminal,
            switch_at,
            retire_at: switch_at + Duration::from_secs(3),
            switched: false,
        }
    }
}

/// The ids clients choose from; polls and recovering faults are swapped by the director.
pub struct Pools {
    pub mock: MockDify,
    pub hot: Vec<Arc<Target>>,
    pub outage: Vec<Arc<Target>>,
    pub polls: RwLock<Arc<Vec<Arc<Target>>>>,
    /// Indexed like [`Fault::ALL`].
    pub faults: RwLock<Arc<Vec<Vec<Arc<Target>>>>>,
}

impl Pools {
    pub fn new(mock: &MockDify) -> Pools {
        let hot = (0..HOT_RUNS)
            .map(|i| {
                let id = new_id();
                let body = run_body(&id, TERMINAL[i % 4], 1024 << (i % 6));
                mock.set(&id, Reply::ok_json(body.clone()));
                Arc::new(Target {
                    id,
                    category: Category::Hot,
                    good: vec![body],
                    injected: None,
                })
            })
            .collect();
        let outage = (0..OUTAGE_RUNS)
            .map(|_| {
                let id = new_id();
                let body = run_body(&id, "\"running\"", 256);
                mock.set(&id, Reply::ok_json(body.clone()));
                Arc::new(Target {
                    id,
                    category: Category::Outage,
                    good: vec![body],
                    injected: None,
                })
            })
            .collect();
        let faults = Fault::ALL
            .iter()
            .map(|f| (0..IDS_PER_FAULT).map(|_| fault_target(mock, *f)).collect())
            .collect();
        Pools {
            mock: mock.clone(),
            hot,
            outage,
            // Filled by `Director::new` before any client runs.
            polls: RwLock::new(Arc::new(Vec::new())),
            faults: RwLock::new(Arc::new(faults)),
        }
    }

    /// The next target for a client, drawn from `mix`; fresh ids are set up in the mock here.
    pub fn pick(&self, mix: &[(Pick, u32)], rng: &mut Rng) -> Arc<Target> {
        let mut roll = rng.range(0, 1000) as u32;
        let mut pick = Pick::Hot;
        for &(p, share) in mix {
            if roll < share {
                pick = p;
                break;
            }
            roll -= share;
        }
        let any = |v: &[Arc<Target>], rng: &mut Rng| {
            Arc::clone(&v[rng.range(0, v.len() as u64) as usize])
        };
        match pick {
            Pick::Hot => any(&self.hot, rng),
            Pick::Outage => any(&self.outage, rng),
            Pick::Poll => {
                let polls = Arc::clone(&self.polls.read().unwrap_or_else(|e| e.into_inner()));
                any(&polls, rng)
            }
            Pick::Fault => {
                let faults = Arc::clone(&self.faults.read().unwrap_or_else(|e| e.into_inner()));
                let kind = &faults[rng.range(0, faults.len() as u64) as usize];
                any(kind, rng)
            }
            Pick::Fresh404 => Arc::new(Target {
                id: new_id(),
                category: Category::Fresh404,
                good: vec![],
                injected: None,
            }),
            Pick::FreshTerminal => {
                let id = new_id();
                let status = TERMINAL[rng.range(0, 4) as usize];
                let body = run_body(&id, status, rng.range(256, 8192) as usize);
                self.mock.set(&id, Reply::ok_json(body.clone()));
                Arc::new(Target {
                    id,
                    category: Category::FreshTerminal,
                    good: vec![body],
                    injected: None,
                })
            }
            Pick::BadId => {
                let u = uuid::Uuid::new_v4();
                let id = match rng.range(0, 3) {
                    0 => format!("not-a-uuid-{}", rng.next() % 10_000),
                    1 => u.simple().to_string(),
                    _ => format!("{u}0"),
                };
                Arc::new(Target {
                    id,
                    category: Category::BadId,
                    good: vec![],
                    injected: None,
                })
            }
        }
    }
}

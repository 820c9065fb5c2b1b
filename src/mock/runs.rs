//! Runs started through `POST /workflows/run`: their state, the script they play and the knobs
//! that drive them (the producer that plays a script is `play.rs`).
//!
//! Invariant: the registry keeps at most a bounded number of runs, oldest first out; a run whose
//! stream reader goes away stays `running`, as Dify strands such runs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::{lock, MockDify};

/// Started runs kept for detail, stop, resume and logs; the oldest go first.
const RUNS_MAX: usize = 10_000;

/// What every run started through the API does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunScript {
    /// The text the LLM node streams, one `text_chunk` event each; the run's output `text` is
    /// their concatenation.
    pub chunks: Vec<String>,
    /// A bare `event: ping` frame while the LLM node runs (Dify sends one about every 10 s).
    pub ping: bool,
    /// How the run ends.
    pub end: RunEnd,
}

impl Default for RunScript {
    fn default() -> RunScript {
        RunScript {
            chunks: vec!["Hello".into(), ", ".into(), "world".into()],
            ping: true,
            end: RunEnd::Succeeded,
        }
    }
}

impl RunScript {
    /// A script of `n` text chunks (`"chunk 0 "`, `"chunk 1 "`, …), for long streams.
    pub fn chunks(n: usize) -> RunScript {
        RunScript {
            chunks: (0..n).map(|i| format!("chunk {i} ")).collect(),
            ..RunScript::default()
        }
    }
}

/// How a run ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// `workflow_finished` with status `succeeded`.
    Succeeded,
    /// `workflow_finished` with status `failed` and this error.
    Failed(String),
    /// The stream ends after the last node with no `workflow_finished` and the run stays
    /// `running` (Dify sometimes leaves a stream so).
    Unfinished,
    /// The run fails before it starts: a streaming start gets one `error` event (status 400,
    /// with this code and message) and no `workflow_started`, as when Dify cannot set the run
    /// up (a model's credentials or quota); the run is `failed`.
    Refused { code: String, message: String },
}

/// A started run, as tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    pub id: String,
    pub task_id: String,
    pub workflow_id: String,
    /// The `user` that started it.
    pub user: String,
    /// `running`, `succeeded`, `failed` or `stopped`.
    pub status: String,
    /// Events produced so far.
    pub events: usize,
}

/// Where a run has got to.
#[derive(Debug, Clone)]
pub(super) struct Progress {
    pub(super) status: &'static str,
    /// Output text so far.
    pub(super) text: String,
    pub(super) error: Option<String>,
    /// Nodes finished.
    pub(super) steps: u64,
    /// Text chunks streamed (the mock's token count).
    pub(super) tokens: u64,
    pub(super) finished_at: Option<u64>,
    pub(super) elapsed: f64,
}

/// One run.
pub(super) struct Run {
    pub(super) id: String,
    pub(super) task_id: String,
    pub(super) workflow_id: String,
    pub(super) user: String,
    /// The inputs as JSON text (Dify's serialisation).
    pub(super) inputs: String,
    pub(super) created_at: u64,
    /// When it started, on tokio's clock (so a paused clock drives the row delay).
    pub(super) started: Instant,
    pub(super) progress: Mutex<Progress>,
    /// Every frame produced, in order.
    pub(super) frames: Mutex<Vec<Bytes>>,
    /// Frames produced, and whether it will produce no more.
    pub(super) produced: watch::Sender<(usize, bool)>,
    /// Set by a stop.
    pub(super) stop: watch::Sender<bool>,
}

impl Run {
    pub(super) fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    fn info(&self) -> RunInfo {
        RunInfo {
            id: self.id.clone(),
            task_id: self.task_id.clone(),
            workflow_id: self.workflow_id.clone(),
            user: self.user.clone(),
            status: self.progress().status.to_owned(),
            events: self.produced.borrow().0,
        }
    }
}

/// Started runs and the knobs that drive them.
pub(super) struct Runs {
    /// Runs by id, task ids to run ids, and the order they started in.
    registry: Mutex<Registry>,
    script: Mutex<RunScript>,
    /// Delay before each event, in milliseconds.
    pub(super) event_delay_ms: AtomicU64,
    /// While events are held: one permit per released event.
    pub(super) gate: Mutex<Option<Arc<Semaphore>>>,
    /// Events produced by every run.
    pub(super) produced: watch::Sender<u64>,
    /// How long a new run's detail answers 404, in milliseconds.
    row_delay_ms: AtomicU64,
}

#[derive(Default)]
struct Registry {
    by_id: HashMap<String, Arc<Run>>,
    by_task: HashMap<String, String>,
    order: VecDeque<String>,
}

impl Default for Runs {
    fn default() -> Runs {
        Runs {
            registry: Mutex::default(),
            script: Mutex::default(),
            event_delay_ms: AtomicU64::new(0),
            gate: Mutex::default(),
            produced: watch::channel(0).0,
            row_delay_ms: AtomicU64::new(0),
        }
    }
}

impl Runs {
    /// Creates a run for `user` and returns it with the script it plays.
    pub(super) fn create(
        &self,
        workflow_id: &str,
        user: &str,
        inputs: String,
    ) -> (Arc<Run>, RunScript) {
        let run = Arc::new(Run {
            id: uuid::Uuid::new_v4().to_string(),
            task_id: uuid::Uuid::new_v4().to_string(),
            workflow_id: workflow_id.to_owned(),
            user: user.to_owned(),
            inputs,
            created_at: super::now_epoch(),
            started: Instant::now(),
            progress: Mutex::new(Progress {
                status: "running",
                text: String::new(),
                error: None,
                steps: 0,
                tokens: 0,
                finished_at: None,
                elapsed: 0.0,
            }),
            frames: Mutex::default(),
            produced: watch::channel((0, false)).0,
            stop: watch::channel(false).0,
        });
        let mut reg = lock(&self.registry);
        if reg.order.len() == RUNS_MAX {
            if let Some(old) = reg.order.pop_front() {
                if let Some(r) = reg.by_id.remove(&old) {
                    reg.by_task.remove(&r.task_id);
                }
            }
        }
        reg.by_id.insert(run.id.clone(), Arc::clone(&run));
        reg.by_task.insert(run.task_id.clone(), run.id.clone());
        reg.order.push_back(run.id.clone());
        (run, lock(&self.script).clone())
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Run>> {
        lock(&self.registry).by_id.get(id).cloned()
    }

    pub(super) fn by_task(&self, task_id: &str) -> Option<Arc<Run>> {
        let reg = lock(&self.registry);
        reg.by_task
            .get(task_id)
            .and_then(|id| reg.by_id.get(id))
            .cloned()
    }

    /// Every run, newest first.
    pub(super) fn newest_first(&self) -> Vec<Arc<Run>> {
        let reg = lock(&self.registry);
        reg.order
            .iter()
            .rev()
            .filter_map(|id| reg.by_id.get(id).cloned())
            .collect()
    }

    pub(super) fn row_delay(&self) -> Duration {
        Duration::from_millis(self.row_delay_ms.load(Ordering::SeqCst))
    }
}

impl MockDify {
    /// What runs started from now on do (default: three nodes, three text chunks, a ping,
    /// `succeeded`).
    pub fn set_run_script(&self, script: RunScript) {
        *lock(&self.state.runs.script) = script;
    }

    /// Waits `d` before producing each event.
    pub fn set_event_delay(&self, d: Duration) {
        self.state
            .runs
            .event_delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, each event of every run waits until a test releases it
    /// ([`MockDify::release_events`]); a stop still ends a held run at once.
    pub fn hold_events(&self) {
        *lock(&self.state.runs.gate) = Some(Arc::new(Semaphore::new(0)));
    }

    /// Lets `n` more held events be produced (by whichever runs wait first).
    pub fn release_events(&self, n: usize) {
        if let Some(gate) = &*lock(&self.state.runs.gate) {
            gate.add_permits(n);
        }
    }

    /// Stops holding events: every waiting run goes on.
    pub fn free_events(&self) {
        if let Some(gate) = lock(&self.state.runs.gate).take() {
            gate.close();
        }
    }

    /// Events produced by all runs so far (frames, pings included).
    pub fn events_produced(&self) -> u64 {
        *self.state.runs.produced.borrow()
    }

    /// Waits until all runs together have produced at least `n` events.
    pub async fn wait_events_produced(&self, n: u64) {
        let mut rx = self.state.runs.produced.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// A new run's detail answers 404 for `d` after it starts, as when Dify writes the run's row
    /// late.
    pub fn set_run_row_delay(&self, d: Duration) {
        self.state
            .runs
            .row_delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The runs started through the API, oldest first.
    pub fn runs(&self) -> Vec<RunInfo> {
        let mut all: Vec<RunInfo> = self
            .state
            .runs
            .newest_first()
            .iter()
            .map(|r| r.info())
            .collect();
        all.reverse();
        all
    }

    /// One started run.
    pub fn run(&self, id: &str) -> Option<RunInfo> {
        self.state.runs.get(id).map(|r| r.info())
    }
}

/// A step of the script, before the end.
#[derive(Debug, Clone, Copy)]
pub(super) enum Step {
    Started,
    NodeStarted(usize),
    NodeFinished(usize),
    Ping,
    Chunk(usize),
}

/// The steps `script` plays before it ends.
pub(super) fn steps(script: &RunScript) -> Vec<Step> {
    let mut s = vec![
        Step::Started,
        Step::NodeStarted(0),
        Step::NodeFinished(0),
        Step::NodeStarted(1),
    ];
    if script.ping {
        s.push(Step::Ping);
    }
    s.extend((0..script.chunks.len()).map(Step::Chunk));
    s.extend([
        Step::NodeFinished(1),
        Step::NodeStarted(2),
        Step::NodeFinished(2),
    ]);
    s
}

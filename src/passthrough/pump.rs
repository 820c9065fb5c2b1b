//! Following a run's answer from the upstream to the client: an event stream event by event, a
//! blocking answer chunk by chunk.
//!
//! Invariant: every upstream chunk is handed to the client as it arrives (nothing waits for
//! data not yet received; chunks that arrived together are handed over together, so they leave
//! in one write); the upstream answer is read to its end whether or not the client is still there,
//! bounded by `upstream.run_timeout` and, between chunks, `stream.idle_timeout`, because Dify
//! interrupts or strands a run whose reader goes away. A client that stops reading for
//! `stream.idle_timeout` is let go the same way. While the upstream is silent for
//! `stream.heartbeat`, the client gets a `: ping` comment, never inside an event. When the run
//! is seen to finish, its kept `running` answer is dropped at once (and, for a run whose client
//! left at once — an async start — its terminal answer is fetched into the cache). A run start
//! holding an `Idempotency-Key` claim settles it here: with the run's ids when the run is seen
//! to start (an event stream), with the whole answer when a blocking answer completes within
//! `upstream.max_body_bytes`; a start that made no run frees the key (the claim is dropped).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use std::sync::Arc;

use uuid::Uuid;

use crate::cache::fetch::Fetch;
use crate::idempotency::{Answer, Claimed};
use crate::ownership::Ownership;
use crate::run_id::RunId;
use crate::sse::{self, Data, DifyEvent, Observer};
use crate::upstream::App;
use crate::usage::{FinishedRun, Usage};
use crate::webhooks::Webhooks;

/// Chunks queued towards the client before the pump waits for it.
pub const QUEUE: usize = 16;

/// Largest event the observer buffers to read it (a larger one passes through unread).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// The bounds of one followed answer.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// When the whole exchange must be over (`upstream.run_timeout` from its start).
    pub deadline: Instant,
    /// Longest upstream silence (`stream.idle_timeout`), also the longest wait on a client.
    pub idle: Duration,
    /// Silence towards the client after which a heartbeat goes (`stream.heartbeat`).
    pub heartbeat: Duration,
    /// Most bytes of a blocking answer kept to read its run's status.
    pub max_answer_bytes: usize,
}

/// What the pump saw, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream answer ended.
    Complete,
    /// The upstream was silent for `stream.idle_timeout`.
    Idle,
    /// `upstream.run_timeout` passed.
    RunTimeout,
    /// The upstream broke the answer off.
    Broken,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::Idle => "idle_timeout",
            End::RunTimeout => "run_timeout",
            End::Broken => "broken",
        }
    }
}

/// How a chunk is read for the run's end.
enum Watch {
    Events(Observer),
    /// A blocking answer, kept up to the cap; `None` once past it.
    Blocking(Option<BytesMut>),
}

impl Watch {
    /// Reads one chunk for the run's start and end; `hooks` hear of them before it is sent.
    async fn observe(&mut self, data: &Bytes, hooks: &mut Hooks, cap: usize) {
        match self {
            Watch::Events(o) => {
                for e in o.feed(data) {
                    match &e.data {
                        Data::Dify(DifyEvent::WorkflowStarted {
                            task_id,
                            workflow_run_id,
                        }) => hooks.stream_started(workflow_run_id, task_id).await,
                        Data::Dify(DifyEvent::Error { raw }) => hooks.stream_failed(raw),
                        Data::Dify(DifyEvent::WorkflowFinished(f)) => {
                            hooks.finished(&f.workflow_run_id);
                            if let Some(figures) = f.run_data().and_then(|d| FinishedRun::parse(&d))
                            {
                                hooks.count(&f.workflow_run_id, figures);
                            }
                        }
                        _ => {}
                    }
                }
            }
            Watch::Blocking(kept) => {
                if let Some(k) = kept {
                    if k.len() + data.len() > cap {
                        *kept = None;
                    } else {
                        k.extend_from_slice(data);
                    }
                }
            }
        }
    }
}

/// What a followed answer does when it sees its run start and end.
pub struct Hooks {
    pub fetch: Arc<Fetch>,
    pub app: Arc<App>,
    pub ownership: Arc<Ownership>,
    /// The client the answer goes to, recorded as the owner of a run it starts; `None` for a
    /// resumed stream (not a new run) or in open mode.
    pub owner: Option<Arc<str>>,
    /// Where a finished run's figures are counted.
    pub usage: Arc<Usage>,
    /// The client its figures are counted to (the starter, or the reader of a resumed stream;
    /// [`crate::usage::OPEN_CLIENT`] in open mode).
    pub counted_to: Arc<str>,
    /// Told how the run's start went (an async start waits on it); `None` when nobody waits.
    pub on_start: Option<oneshot::Sender<Start>>,
    /// The `Idempotency-Key` claim this run start holds, settled by what the answer shows.
    pub claim: Option<Claimed>,
    /// On the run's finish, fetch its terminal answer into the cache (nobody else will ask
    /// soon enough: an async start's client waits for a webhook or polls).
    pub warm: bool,
    /// The answer's status and content type, for a kept blocking answer.
    pub head: (http::StatusCode, Option<http::HeaderValue>),
    /// Told of a run the owner started (its end is announced to the owner's webhook) and of
    /// the end of this reading of it.
    pub webhooks: Option<Arc<Webhooks>>,
    /// The run this answer is about, once seen.
    pub run: Option<RunId>,
}

/// How an event stream's run started, for the one who waits on it.
#[derive(Debug)]
pub enum Start {
    /// `workflow_started`, with the run's ids (the run is recorded as its owner's already).
    Started { run: Box<str>, task: Box<str> },
    /// An `error` event came first: the run did not start. Its data as received.
    Failed(Bytes),
}

impl Hooks {
    /// Records the started run (and its task) as the owner's; awaited before the chunk that
    /// names them is passed on.
    async fn started(&mut self, run: &str, task: Option<&str>) {
        let Ok(run) = Uuid::try_parse(run) else {
            return;
        };
        self.fetch.saw_start(&self.app, RunId::from(run));
        self.run = Some(RunId::from(run));
        let Some(owner) = &self.owner else { return };
        if let Some(w) = &self.webhooks {
            w.started(&self.app, RunId::from(run), owner);
        }
        let task = task.and_then(|t| Uuid::try_parse(t).ok());
        self.ownership
            .record_run(self.app.id, run, task, Some(owner))
            .await;
    }

    /// Counts a finished run's figures (once per run, fleet-wide), off the answer's path.
    fn count(&self, run: &str, figures: FinishedRun) {
        let (usage, app, client) = (
            Arc::clone(&self.usage),
            Arc::clone(&self.app),
            Arc::clone(&self.counted_to),
        );
        let run = run.to_owned();
        tokio::spawn(async move {
            usage.finished_run(&app.name, &client, &run, &figures).await;
        });
    }

    /// An event stream's run started: recorded as its owner's, its claim kept with its ids,
    /// and whoever waits on the start told — in that order, before the chunk naming it goes on.
    async fn stream_started(&mut self, run: &str, task: &str) {
        self.started(run, Some(task)).await;
        if let Some(claim) = self.claim.take() {
            let answer = Answer::Started {
                run: run.to_owned(),
                task: task.to_owned(),
            };
            claim.made(answer).await;
        }
        if let Some(tx) = self.on_start.take() {
            let _ = tx.send(Start::Started {
                run: run.into(),
                task: task.into(),
            });
        }
    }

    /// An `error` event: before the start, the run did not start (its claim is freed).
    fn stream_failed(&mut self, raw: &Bytes) {
        self.claim = None;
        if let Some(tx) = self.on_start.take() {
            let _ = tx.send(Start::Failed(raw.clone()));
        }
    }

    /// Drops the run's kept `running` answer, now, so pollers see the end at once; with
    /// `warm`, fetches its terminal answer into the cache.
    fn finished(&self, run: &str) {
        if let Ok(run) = RunId::parse(run) {
            let (fetch, app, warm) = (Arc::clone(&self.fetch), Arc::clone(&self.app), self.warm);
            tokio::spawn(async move {
                fetch.drop_running(&app, run).await;
                if warm {
                    fetch.warm(&app, run).await;
                }
            });
        }
    }
}

/// Follows `upstream` to its end, sending every chunk to `tx` while the client takes them;
/// `hooks` hear of the run's start (before the chunk naming it is sent) and end. Returns how it
/// ended and whether the client stayed to the end.
pub async fn follow(
    mut upstream: crate::upstream::UpstreamBody,
    tx: Option<mpsc::Sender<Bytes>>,
    events: bool,
    bounds: Bounds,
    mut hooks: Hooks,
) -> (End, bool) {
    let mut client = tx;
    let mut watch = if events {
        Watch::Events(Observer::new(MAX_EVENT_BYTES))
    } else {
        Watch::Blocking(Some(BytesMut::new()))
    };
    let mut last_upstream = Instant::now();
    let mut last_sent = last_upstream;
    // When the next timeout or heartbeat is due; it only ever moves later.
    let due = |last_upstream: Instant, last_sent: Instant, client: &Option<_>| {
        let wake = (last_upstream + bounds.idle).min(bounds.deadline);
        if events && client.is_some() {
            wake.min(last_sent + bounds.heartbeat)
        } else {
            wake
        }
    };
    // One timer for the whole answer, armed lazily: chunks move what is due later without
    // touching it, and when it fires early it is set again to what is due by then. No timer
    // work per chunk.
    let timer = sleep_until(due(last_upstream, last_sent, &client));
    tokio::pin!(timer);
    let end = loop {
        let frame = tokio::select! {
            f = upstream.frame() => f,
            () = &mut timer => {
                let now = Instant::now();
                let wake = due(last_upstream, last_sent, &client);
                if now < wake {
                    timer.as_mut().reset(wake);
                    continue;
                }
                if now >= bounds.deadline {
                    break End::RunTimeout;
                }
                if now >= last_upstream + bounds.idle {
                    break End::Idle;
                }
                let between = match &watch {
                    Watch::Events(o) => o.is_between_events(),
                    Watch::Blocking(_) => false,
                };
                if between {
                    send(&mut client, sse::heartbeat(), bounds.idle).await;
                }
                last_sent = Instant::now();
                timer.as_mut().reset(due(last_upstream, last_sent, &client));
                continue;
            }
        };
        let data = match frame {
            None => break End::Complete,
            Some(Err(_)) => break End::Broken,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        // No allocation unless a second chunk is there.
        let mut more = Vec::new();
        // Chunks that came in the same read leave in one write: the upstream connection hands
        // over one chunk at a time, so let it run (and decode what it holds) before the client's
        // connection is woken, and take what it has. Nothing waits for data not yet received.
        let mut ended = None;
        while client.is_some() && more.len() < QUEUE {
            behind_ready_tasks().await;
            let Some(frame) = upstream.frame().now_or_never() else {
                break;
            };
            match frame {
                None => ended = Some(End::Complete),
                Some(Err(_)) => ended = Some(End::Broken),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        more.push(data);
                    }
                    continue;
                }
            }
            break;
        }
        // Each chunk is read for the run's start and end just before it goes, so a hook that
        // waits (recording the run) holds back only the chunk that names it.
        let mut sent = false;
        for data in std::iter::once(data).chain(more) {
            watch
                .observe(&data, &mut hooks, bounds.max_answer_bytes)
                .await;
            sent |= send(&mut client, data, bounds.idle).await;
        }
        // Upstream silence is counted from here: time spent on a slow client is not the
        // upstream's.
        last_upstream = Instant::now();
        if sent {
            last_sent = last_upstream;
        }
        if let Some(end) = ended {
            break end;
        }
    };
    if let (End::Complete, Watch::Blocking(Some(kept))) = (end, &watch) {
        if let Some(answer) = Blocking::parse(kept) {
            if let Some(run) = &answer.run {
                hooks.started(run, answer.task.as_deref()).await;
                if let Some(claim) = hooks.claim.take() {
                    let (status, content_type) = hooks.head.clone();
                    let whole = Answer::Full {
                        status,
                        content_type,
                        location: None,
                        body: kept.clone().freeze(),
                    };
                    claim.made(whole).await;
                }
            }
            if let Some((run, figures)) = answer.finished() {
                hooks.finished(&run);
                hooks.count(&run, figures);
            }
        }
    }
    if let (Some(claim), Watch::Blocking(None)) = (hooks.claim.take(), &watch) {
        // A blocking answer past the cap: a run was made, whose answer cannot be replayed and
        // whose ids were not kept. The key stays in use until its lease ends rather than let a
        // retry start a second run.
        claim.hold();
    }
    if let (Some(w), Some(run)) = (&hooks.webhooks, hooks.run) {
        w.stream_ended(&hooks.app, run);
    }
    (end, client.is_some())
}

/// Lets every task already woken on this worker (the upstream connection's) run first, then
/// resumes. Unlike `tokio::task::yield_now`, which waits for the worker's next look at the
/// network (a system call each time), the task goes to the back of the run queue.
async fn behind_ready_tasks() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Sends `b` to the client while it is there; a client gone, or not taking a chunk for
/// `patience`, is let go (the upstream is still read). True when sent.
async fn send(client: &mut Option<mpsc::Sender<Bytes>>, b: Bytes, patience: Duration) -> bool {
    let Some(tx) = client else {
        return false;
    };
    // A client keeping up has room: no timer is needed for it.
    let b = match tx.try_send(b) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            *client = None;
            return false;
        }
        Err(mpsc::error::TrySendError::Full(b)) => b,
    };
    match tokio::time::timeout(patience, tx.send(b)).await {
        Ok(Ok(())) => true,
        _ => {
            *client = None;
            false
        }
    }
}

/// A blocking run's answer, read once: its ids and, when the run is over, its figures.
struct Blocking {
    run: Option<String>,
    task: Option<String>,
    /// The run's `data`, when its status is final (see [`FinishedRun::parse`]).
    figures: Option<FinishedRun>,
}

impl Blocking {
    fn parse(body: &[u8]) -> Option<Blocking> {
        #[derive(serde::Deserialize)]
        struct Answer<'a> {
            workflow_run_id: Option<String>,
            task_id: Option<String>,
            #[serde(borrow)]
            data: Option<&'a serde_json::value::RawValue>,
        }
        let a: Answer<'_> = serde_json::from_slice(body).ok()?;
        Some(Blocking {
            run: a.workflow_run_id,
            task: a.task_id,
            figures: a.data.and_then(|d| FinishedRun::parse(d.get().as_bytes())),
        })
    }

    /// The finished run's id (the answer's, else its `data.id`) and figures.
    fn finished(self) -> Option<(String, FinishedRun)> {
        let figures = self.figures?;
        let run = self.run.or_else(|| figures.id.clone())?;
        Some((run, figures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_blocking_answer_names_its_run() {
        let body =
            br#"{"task_id":"t","workflow_run_id":"r1","data":{"id":"r1","status":"succeeded"}}"#;
        let finished = |b: &[u8]| {
            Blocking::parse(b)
                .and_then(Blocking::finished)
                .map(|(r, _)| r)
        };
        assert_eq!(finished(body).as_deref(), Some("r1"));
        let running = br#"{"workflow_run_id":"r1","data":{"id":"r1","status":"running"}}"#;
        assert_eq!(finished(running), None);
        assert_eq!(finished(b"not json"), None);
        // An unknown status is not terminal: the run's kept answer stays.
        let unknown = br#"{"workflow_run_id":"r1","data":{"id":"r1","status":"queued"}}"#;
        assert_eq!(finished(unknown), None);
        let started = Blocking::parse(running).unwrap();
        assert_eq!(started.run.as_deref(), Some("r1"));
    }
}

//! The producer of a started run: plays its script one event at a time, into its stream
//! (streaming mode) or to its end (blocking mode).
//!
//! Invariant: an event is produced only when its turn comes — after the per-event delay and, while
//! events are held, after a test released it. A stop ends the run at its next turn with a
//! `workflow_finished` of status `stopped`; a run whose stream reader goes away stops producing.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::channel::Sender;

use super::events;
use super::runs::{steps, Run, RunEnd, RunScript, Step};
use super::{lock, State};

/// Marks a run as producing nothing more however its producer ends (finished, stopped,
/// abandoned, or dropped with a blocking request).
struct Done<'a>(&'a Run);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.produced.send_modify(|p| p.1 = true);
    }
}

/// Plays `script` for `run`, into `sink` when streaming.
pub(super) async fn produce(
    st: &State,
    run: &Run,
    script: &RunScript,
    mut sink: Option<Sender<Bytes, std::io::Error>>,
) {
    let _done = Done(run);
    if let RunEnd::Refused { code, message } = &script.end {
        {
            let mut p = lock(&run.progress);
            p.status = "failed";
            p.error = Some(message.clone());
            p.finished_at = Some(super::now_epoch());
        }
        emit(st, run, &mut sink, events::error(run, 400, code, message)).await;
        return;
    }
    for step in steps(script) {
        if !turn(st, run).await {
            return finish(st, run, &mut sink, "stopped", None).await;
        }
        {
            let mut p = lock(&run.progress);
            match step {
                Step::Chunk(i) => {
                    p.text.push_str(&script.chunks[i]);
                    p.tokens += 1;
                }
                Step::NodeFinished(_) => p.steps += 1,
                _ => {}
            }
            p.elapsed = run.started.elapsed().as_secs_f64();
        }
        let frame = events::frame(run, step, script);
        if !emit(st, run, &mut sink, frame).await {
            return;
        }
    }
    match &script.end {
        RunEnd::Unfinished => {}
        end => {
            let stopped = !turn(st, run).await;
            let (status, error) = match end {
                _ if stopped => ("stopped", None),
                RunEnd::Failed(e) => ("failed", Some(e.clone())),
                _ => ("succeeded", None),
            };
            finish(st, run, &mut sink, status, error).await;
        }
    }
}

/// Waits for the next event's turn; false when the run was stopped meanwhile.
async fn turn(st: &State, run: &Run) -> bool {
    let mut stop = run.stop.subscribe();
    if *stop.borrow_and_update() {
        return false;
    }
    let gate = lock(&st.runs.gate).clone();
    if let Some(gate) = gate {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return false,
            permit = gate.acquire() => {
                if let Ok(p) = permit {
                    p.forget();
                }
            }
        }
    }
    let delay = st.runs.event_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return false,
            () = tokio::time::sleep(Duration::from_millis(delay)) => {}
        }
    }
    true
}

/// Ends the run with `status` and its `workflow_finished` event.
async fn finish(
    st: &State,
    run: &Run,
    sink: &mut Option<Sender<Bytes, std::io::Error>>,
    status: &'static str,
    error: Option<String>,
) {
    {
        let mut p = lock(&run.progress);
        p.status = status;
        p.error = error;
        p.finished_at = Some(super::now_epoch());
        p.elapsed = run.started.elapsed().as_secs_f64();
    }
    let frame = events::finished(run);
    emit(st, run, sink, frame).await;
}

/// Produces one frame; false when the stream's reader has gone.
async fn emit(
    st: &State,
    run: &Run,
    sink: &mut Option<Sender<Bytes, std::io::Error>>,
    frame: Bytes,
) -> bool {
    lock(&run.frames).push(frame.clone());
    run.produced.send_modify(|p| p.0 += 1);
    st.runs.produced.send_modify(|c| *c += 1);
    match sink {
        Some(tx) => tx.send_data(frame).await.is_ok(),
        None => true,
    }
}

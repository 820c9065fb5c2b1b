//! Running workflows: `POST /workflows/run` (and a workflow's `run`), `POST
//! /workflows/tasks/{task_id}/stop`, `GET /workflow/{id}/events` and `GET /workflows/logs`.
//!
//! Invariant: a run starts only from a JSON object with a `user` and an `inputs` object (else
//! Dify's 400); blocking mode answers once the run has ended, streaming mode answers at once
//! and sends each event as the run produces it. Resuming a stream takes the creator's `user`.

use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::channel::Sender;
use http_body_util::Channel;
use serde_json::Value;
use uuid::Uuid;

use super::json::{self, Obj};
use super::play;
use super::reply::{self, DEFAULT_WORKFLOW_ID};
use super::runs::Run;
use super::stream::{self, StreamKind};
use super::{events, lock, required_user, Answer, Call, State};

/// `POST /workflows/run`, or `/workflows/{workflow_id}/run` with `workflow`.
pub(super) async fn start(st: &Arc<State>, workflow: Option<&str>, call: Call) -> Answer {
    let body = call.object()?;
    let user = required_user(&body)?;
    let workflow_id = match workflow {
        None => DEFAULT_WORKFLOW_ID.to_owned(),
        Some(w) => Uuid::try_parse(w)
            .map_err(|_| reply::invalid_param("Invalid workflow ID format."))?
            .hyphenated()
            .to_string(),
    };
    let inputs = match body.get("inputs") {
        Some(v @ Value::Object(_)) => json::value(v),
        _ => return Err(reply::invalid_param("inputs is required in input form")),
    };
    let streaming = match body.get("response_mode") {
        None | Some(Value::Null) => false,
        Some(Value::String(m)) if m == "blocking" => false,
        Some(Value::String(m)) if m == "streaming" => true,
        _ => {
            return Err(reply::invalid_param(
                "response_mode must be blocking or streaming",
            ))
        }
    };
    st.users.meet(&user);
    let (run, script) = st.runs.create(&workflow_id, &user, inputs);
    if !streaming {
        play::produce(st, &run, &script, None).await;
        return Ok(reply::ok(events::blocking(&run)));
    }
    let (tx, body) = Channel::new(1);
    let resp = stream::sse(&st.streams, StreamKind::Run, &run.id, body);
    let st = Arc::clone(st);
    tokio::spawn(async move { play::produce(&st, &run, &script, Some(tx)).await });
    Ok(resp)
}

/// `POST /workflows/tasks/{task_id}/stop`: success whatever the task (Dify neither checks the
/// `user` nor says when there is nothing to stop); a running task ends as `stopped`.
pub(super) fn stop(st: &State, task_id: &str, call: &Call) -> Answer {
    let body = call.object()?;
    let user = required_user(&body)?;
    st.users.meet(&user);
    if let Some(run) = st.runs.by_task(task_id) {
        run.stop.send_replace(true);
    }
    Ok(reply::ok("{\"result\": \"success\"}"))
}

/// `GET /workflow/{workflow_run_id}/events?user=…`: a finished run's stream is its
/// `workflow_finished` alone; a running one's carries the events produced from now on (all of
/// them with `include_state_snapshot=true`) until the run ends.
pub(super) fn events(st: &State, run_id: &str, call: &Call) -> Answer {
    let run = Uuid::try_parse(run_id)
        .ok()
        .and_then(|u| st.runs.get(&u.hyphenated().to_string()))
        .filter(|r| call.param("user").as_deref() == Some(r.user.as_str()))
        .ok_or_else(|| reply::not_found("Workflow run"))?;
    let snapshot = call.param("include_state_snapshot").as_deref() == Some("true");
    // Where the stream starts is fixed now, before the answer leaves: a test that sees the
    // answer's head knows every later event will follow.
    let from = match run.progress().finished_at {
        Some(_) => None,
        None if snapshot => Some(0),
        None => Some(run.produced.borrow().0),
    };
    let (tx, body) = Channel::new(1);
    let resp = stream::sse(&st.streams, StreamKind::Resume, &run.id, body);
    tokio::spawn(follow(run, tx, from));
    Ok(resp)
}

/// Sends `run`'s frames from index `from` on as they are produced, until it produces no more;
/// a finished run's (`None`) is its `workflow_finished` alone.
async fn follow(run: Arc<Run>, mut tx: Sender<Bytes, std::io::Error>, from: Option<usize>) {
    let Some(mut next) = from else {
        let _ = tx.send_data(events::finished(&run)).await;
        return;
    };
    let mut rx = run.produced.subscribe();
    loop {
        let (count, done) = *rx.borrow_and_update();
        let frames: Vec<Bytes> = lock(&run.frames)[next..count].to_vec();
        for f in frames {
            if tx.send_data(f).await.is_err() {
                return;
            }
        }
        next = count;
        if done || rx.changed().await.is_err() {
            return;
        }
    }
}

/// Statuses `/workflows/logs` filters on.
const LOG_STATUSES: [&str; 4] = ["succeeded", "failed", "stopped", "partial-succeeded"];

/// `GET /workflows/logs`: the runs started here, newest first, filtered and paginated as Dify
/// does (`keyword` matches inputs and output text; the `created_at__*` bounds are accepted and
/// not applied).
pub(super) fn logs(st: &State, call: &Call) -> Answer {
    let page = int_param(call, "page", 1, 1..=99_999)?;
    let limit = int_param(call, "limit", 20, 1..=100)?;
    let status = call.param("status");
    if let Some(s) = &status {
        if !LOG_STATUSES.contains(&s.as_str()) {
            return Err(reply::invalid_param(
                "status must be one of succeeded, failed, stopped, partial-succeeded",
            ));
        }
    }
    let session = call.param("created_by_end_user_session_id");
    let keyword = call.param("keyword").filter(|k| !k.is_empty());
    let matching: Vec<Arc<Run>> = st
        .runs
        .newest_first()
        .into_iter()
        .filter(|r| {
            let p = r.progress();
            status.as_deref().is_none_or(|s| s == p.status)
                && session.as_deref().is_none_or(|s| s == r.user)
                && keyword
                    .as_deref()
                    .is_none_or(|k| r.inputs.contains(k) || p.text.contains(k))
        })
        .collect();
    let total = matching.len() as u64;
    let skip = (page - 1).saturating_mul(limit);
    let data: Vec<String> = matching
        .iter()
        .skip(skip as usize)
        .take(limit as usize)
        .map(|r| events::log_entry(r, &st.users.meet(&r.user)))
        .collect();
    let body = Obj::new()
        .int("page", page)
        .int("limit", limit)
        .int("total", total)
        .bool("has_more", skip + (data.len() as u64) < total)
        .raw("data", &format!("[{}]", data.join(", ")))
        .done();
    Ok(reply::ok(body))
}

/// An integer query parameter within `range`, `default` when absent.
fn int_param(
    call: &Call,
    name: &str,
    default: u64,
    range: RangeInclusive<u64>,
) -> Result<u64, reply::Refusal> {
    match call.param(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                reply::invalid_param(format!(
                    "{name} must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ))
            }),
    }
}

//! `GET /workflows/run/{id}`: Dify's run detail, with the body layout, errors and statuses of the
//! real thing.
//!
//! Invariant: an id answers, in order of precedence, what a test set for it, the state of a run
//! started through the API (404 while its row is "not yet written"), an auto-mode run, or Dify's
//! 404; an id that is not a UUID is Dify's 500 (a database error on PostgreSQL).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use uuid::Uuid;

use super::reply::{self, Reply};
use super::{events, lock, Body, MockDify, State};

/// Auto mode: every valid run id becomes a run that is `running` for `running_for` after its
/// first request, then terminal — except ids starting with [`UNKNOWN_RUN_PREFIX`], which are
/// unknown runs (404).
#[derive(Debug, Clone, Copy)]
pub struct AutoRuns {
    pub running_for: Duration,
    pub output_bytes: usize,
}

/// In auto mode, run ids starting with this are unknown: Dify's 404 `not_found`.
pub const UNKNOWN_RUN_PREFIX: &str = "00000000-";

/// Replies set per run id, and auto mode.
pub(super) struct Details {
    /// Replies per canonical run id, given in turn; the last repeats.
    replies: Mutex<HashMap<String, VecDeque<Reply>>>,
    auto: Option<AutoRuns>,
    /// When each auto-mode run was first asked for.
    first_seen: Mutex<HashMap<String, Instant>>,
}

impl Details {
    pub(super) fn new(auto: Option<AutoRuns>) -> Details {
        Details {
            replies: Mutex::default(),
            auto,
            first_seen: Mutex::default(),
        }
    }
}

impl MockDify {
    /// Sets the reply for a run id (case-insensitive, as PostgreSQL compares UUIDs).
    pub fn set(&self, run_id: &str, reply: Reply) {
        self.set_sequence(run_id, vec![reply]);
    }

    /// Sets replies given in turn, one per request; the last one then repeats.
    pub fn set_sequence(&self, run_id: &str, replies: Vec<Reply>) {
        lock(&self.state.detail.replies).insert(run_id.to_ascii_lowercase(), replies.into());
    }
}

pub(super) async fn answer(st: &State, id: &str) -> Response<Body> {
    // Dify on PostgreSQL: a non-UUID id is a database error, answered 500.
    let Ok(uuid) = Uuid::try_parse(id) else {
        return reply::reply_response(Reply::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"message\": \"Internal Server Error\", \"code\": \"unknown\", \"status\": 500}\n",
        ));
    };
    let canon = uuid.hyphenated().to_string();
    let set = lock(&st.detail.replies).get_mut(&canon).and_then(|q| {
        if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().cloned()
        }
    });
    if let Some(r) = set {
        return reply::respond(r).await;
    }
    if let Some(run) = st.runs.get(&canon) {
        if run.started.elapsed() < st.runs.row_delay() {
            return reply::not_found("Workflow run").answer();
        }
        return reply::ok(events::detail(&run));
    }
    let reply = match st.detail.auto {
        Some(_) if canon.starts_with(UNKNOWN_RUN_PREFIX) => {
            return reply::not_found("Workflow run").answer();
        }
        Some(auto) => {
            let first = *lock(&st.detail.first_seen)
                .entry(canon.clone())
                .or_insert_with(Instant::now);
            let status = if first.elapsed() < auto.running_for {
                "\"running\""
            } else {
                reply::auto_final_status(&uuid)
            };
            Reply::run_sized(&canon, status, auto.output_bytes)
        }
        None => return reply::not_found("Workflow run").answer(),
    };
    reply::respond(reply).await
}

//! Dify's bodies for a started run: the event-stream frames, the blocking answer and the run
//! detail, field for field as Dify writes them.
//!
//! Invariant: a frame is `data: {json}\n\n` with `"event"` first inside, or the bare
//! `event: ping\n\n`; `workflow_finished`'s `data`, the blocking answer's `data` and the run
//! detail describe the same run state with the same values.

use bytes::Bytes;
use uuid::Uuid;

use super::json::Obj;
use super::runs::{Progress, Run, RunScript, Step};

/// The script's nodes: id, type, title.
const NODES: [(&str, &str, &str); 3] = [
    ("1732787400001", "start", "Start"),
    ("llm", "llm", "LLM"),
    ("end", "end", "End"),
];

/// The ping frame.
pub(super) const PING: &[u8] = b"event: ping\n\n";

/// The frame for one step.
pub(super) fn frame(run: &Run, step: Step, script: &RunScript) -> Bytes {
    let p = run.progress();
    let data = match step {
        Step::Ping => return Bytes::from_static(PING),
        Step::Started => {
            let data = Obj::new()
                .str("id", &run.id)
                .str("workflow_id", &run.workflow_id)
                .raw("inputs", &run.inputs)
                .int("created_at", run.created_at)
                .done();
            return event(run, "workflow_started", &data);
        }
        Step::Chunk(i) => {
            let data = Obj::new()
                .str("text", &script.chunks[i])
                .raw("from_variable_selector", "[\"llm\", \"text\"]")
                .done();
            return event(run, "text_chunk", &data);
        }
        Step::NodeStarted(i) => node(run, i).int("created_at", run.created_at).done(),
        Step::NodeFinished(i) => node(run, i)
            .raw("process_data", "null")
            .raw("outputs", &node_outputs(run, i, &p))
            .str("status", "succeeded")
            .raw("error", "null")
            .float("elapsed_time", p.elapsed)
            .raw("execution_metadata", "null")
            .int("created_at", run.created_at)
            .int("finished_at", super::now_epoch())
            .done(),
    };
    let name = match step {
        Step::NodeStarted(_) => "node_started",
        _ => "node_finished",
    };
    event(run, name, &data)
}

/// The `workflow_finished` frame, for the run as it is now.
pub(super) fn finished(run: &Run) -> Bytes {
    event(run, "workflow_finished", &data(run, &run.progress()))
}

/// The blocking answer.
pub(super) fn blocking(run: &Run) -> String {
    Obj::new()
        .str("task_id", &run.task_id)
        .str("workflow_run_id", &run.id)
        .raw("data", &data(run, &run.progress()))
        .done()
}

/// The run-detail body (`inputs` as a JSON string, as Dify keeps it).
pub(super) fn detail(run: &Run) -> String {
    let p = run.progress();
    let mut body = Obj::new()
        .str("id", &run.id)
        .str("workflow_id", &run.workflow_id)
        .str("status", p.status)
        .str("inputs", &run.inputs)
        .raw("outputs", &outputs(&p))
        .opt_str("error", p.error.as_deref())
        .int("total_steps", p.steps)
        .int("total_tokens", p.tokens)
        .int("created_at", run.created_at)
        .opt_int("finished_at", p.finished_at)
        .float("elapsed_time", p.elapsed)
        .done();
    body.push('\n');
    body
}

/// One `workflow_run` entry of the logs.
pub(super) fn log_entry(run: &Run, end_user_id: &str) -> String {
    let p = run.progress();
    let workflow_run = Obj::new()
        .str("id", &run.id)
        .str("version", "2024-11-28 09:50:00.000000")
        .str("status", p.status)
        .opt_str("error", p.error.as_deref())
        .float("elapsed_time", p.elapsed)
        .int("total_tokens", p.tokens)
        .int("total_steps", p.steps)
        .int("created_at", run.created_at)
        .opt_int("finished_at", p.finished_at)
        .done();
    let end_user = Obj::new()
        .str("id", end_user_id)
        .str("type", "service_api")
        .bool("is_anonymous", false)
        .str("session_id", &run.user)
        .done();
    Obj::new()
        .str("id", &sibling_id(&run.id, 0x80))
        .raw("workflow_run", &workflow_run)
        .str("created_from", "service-api")
        .str("created_by_role", "end_user")
        .raw("created_by_account", "null")
        .raw("created_by_end_user", &end_user)
        .int("created_at", run.created_at)
        .done()
}

/// `data` of `workflow_finished` and of the blocking answer.
fn data(run: &Run, p: &Progress) -> String {
    Obj::new()
        .str("id", &run.id)
        .str("workflow_id", &run.workflow_id)
        .str("status", p.status)
        .raw("outputs", &outputs(p))
        .opt_str("error", p.error.as_deref())
        .float("elapsed_time", p.elapsed)
        .int("total_tokens", p.tokens)
        .int("total_steps", p.steps)
        .int("created_at", run.created_at)
        .opt_int("finished_at", p.finished_at)
        .done()
}

/// The run's outputs: its text once it has succeeded, nothing before or otherwise.
fn outputs(p: &Progress) -> String {
    if p.status == "succeeded" {
        Obj::new().str("text", &p.text).done()
    } else {
        "{}".to_owned()
    }
}

fn node_outputs(run: &Run, i: usize, p: &Progress) -> String {
    match i {
        0 => run.inputs.clone(),
        _ => Obj::new().str("text", &p.text).done(),
    }
}

/// The fields a node's two events share.
fn node(run: &Run, i: usize) -> Obj {
    let (node_id, node_type, title) = NODES[i];
    let predecessor = i.checked_sub(1).map(|p| NODES[p].0);
    Obj::new()
        .str("id", &sibling_id(&run.id, i as u8 + 1))
        .str("node_id", node_id)
        .str("node_type", node_type)
        .str("title", title)
        .int("index", i as u64 + 1)
        .opt_str("predecessor_node_id", predecessor)
        .raw("inputs", if i == 0 { &run.inputs } else { "{}" })
}

/// A frame: `data: {"event": …, "task_id": …, "workflow_run_id": …, "data": …}`.
/// Dify's in-stream failure: `{"event": "error", "task_id", "status", "code", "message"}`.
pub(super) fn error(run: &Run, status: u16, code: &str, message: &str) -> Bytes {
    let json = Obj::new()
        .str("event", "error")
        .str("task_id", &run.task_id)
        .int("status", status.into())
        .str("code", code)
        .str("message", message)
        .done();
    Bytes::from(format!(
        "data: {json}

"
    ))
}

fn event(run: &Run, name: &str, data: &str) -> Bytes {
    let json = Obj::new()
        .str("event", name)
        .str("task_id", &run.task_id)
        .str("workflow_run_id", &run.id)
        .raw("data", data)
        .done();
    Bytes::from(format!("data: {json}\n\n"))
}

/// A UUID derived from the run's (node executions, log entries), stable for the run.
fn sibling_id(run_id: &str, n: u8) -> String {
    let mut bytes = Uuid::try_parse(run_id)
        .map(|u| *u.as_bytes())
        .unwrap_or_default();
    bytes[15] ^= n;
    Uuid::from_bytes(bytes).hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_ids_differ_from_the_run_and_each_other() {
        let run = "6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        let a = sibling_id(run, 1);
        let b = sibling_id(run, 2);
        assert_ne!(a, run);
        assert_ne!(a, b);
        assert_eq!(a, sibling_id(run, 1));
        assert!(Uuid::try_parse(&a).is_ok());
    }
}

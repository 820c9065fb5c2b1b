//! Runs: blocking and streaming starts, held and delayed events, stop, resume, abandoned
//! streams, run detail of started runs, logs.

use std::time::Duration;

use dify_gateway::mock::{RunEnd, RunScript, StreamEnd, StreamKind};
use http::StatusCode;

use super::{event, event_name, mock, within};

const START: &str =
    r#"{"inputs": {"query": "Café"}, "response_mode": "streaming", "user": "alice"}"#;

/// Every event of the default script, in order.
const SCRIPT_EVENTS: [&str; 12] = [
    "workflow_started",
    "node_started",
    "node_finished",
    "node_started",
    "ping",
    "text_chunk",
    "text_chunk",
    "text_chunk",
    "node_finished",
    "node_started",
    "node_finished",
    "workflow_finished",
];

#[tokio::test]
async fn a_streaming_run_sends_difys_frames_and_is_read_to_its_end() {
    let (up, http) = mock().await;
    let (head, mut frames) = http.stream("/v1/workflows/run", Some(START)).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert!(!head.headers.contains_key("x-accel-buffering"));
    let all = frames.rest().await;
    let names: Vec<String> = all.iter().map(|f| event_name(f)).collect();
    assert_eq!(names, SCRIPT_EVENTS);
    assert!(
        all[0].starts_with(r#"data: {"event": "workflow_started", "task_id": ""#),
        "{}",
        all[0]
    );
    // Python's json.dumps: non-ASCII escaped.
    assert!(
        all[0].contains(r#""inputs": {"query": "Caf\u00e9"}"#),
        "{}",
        all[0]
    );
    let started = event(&all[0]);
    let run_id = started["workflow_run_id"].as_str().unwrap().to_owned();
    let task_id = started["task_id"].as_str().unwrap();
    assert_ne!(run_id, task_id);
    assert_eq!(started["data"]["id"], run_id.as_str());
    assert!(started["data"]["workflow_id"].is_string());
    assert!(started["data"]["created_at"].is_u64());
    let chunk = event(&all[5]);
    assert_eq!(chunk["data"]["text"], "Hello");
    let finished = event(&all[11]);
    assert_eq!(finished["workflow_run_id"], run_id.as_str());
    let data = &finished["data"];
    assert_eq!(data["status"], "succeeded");
    assert_eq!(data["outputs"]["text"], "Hello, world");
    assert_eq!(data["total_steps"], 3);
    assert!(data["error"].is_null());
    assert!(data["finished_at"].is_u64());

    assert_eq!(
        within(up.stream_end(&run_id)).await,
        Some(StreamEnd::Delivered)
    );
    let detail = http.get(&format!("/v1/workflows/run/{run_id}")).await;
    assert_eq!(detail.status, StatusCode::OK);
    let d = detail.json();
    assert_eq!(d["status"], "succeeded");
    assert_eq!(d["outputs"]["text"], "Hello, world");
    assert_eq!(
        d["inputs"], r#"{"query": "Caf\u00e9"}"#,
        "inputs as a JSON string"
    );
    assert_eq!(up.run(&run_id).unwrap().user, "alice");
    assert_eq!(up.events_produced(), 12);
}

#[tokio::test]
async fn held_events_are_produced_only_as_released() {
    let (up, http) = mock().await;
    up.hold_events();
    let (_, mut frames) = http.stream("/v1/workflows/run", Some(START)).await;
    up.release_events(1);
    let first = frames.next().await.unwrap();
    assert_eq!(event_name(&first), "workflow_started");
    assert_eq!(
        up.events_produced(),
        1,
        "the next event waits for its release"
    );
    let run_id = event(&first)["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Running while held.
    let detail = http.get(&format!("/v1/workflows/run/{run_id}")).await;
    assert_eq!(detail.json()["status"], "running");
    assert!(detail.json()["finished_at"].is_null());
    for (i, want) in SCRIPT_EVENTS.iter().enumerate().skip(1).take(3) {
        up.release_events(1);
        let f = frames.next().await.unwrap();
        assert_eq!(event_name(&f), *want);
        assert_eq!(up.events_produced(), i as u64 + 1);
    }
    up.free_events();
    assert_eq!(frames.rest().await.len(), SCRIPT_EVENTS.len() - 4);
    within(up.wait_events_produced(12)).await;
}

#[tokio::test(start_paused = true)]
async fn each_event_waits_the_event_delay() {
    let (up, http) = mock().await;
    // Shorter than the steps' bound, which the paused clock also runs.
    let delay = Duration::from_secs(5);
    up.set_event_delay(delay);
    let t0 = tokio::time::Instant::now();
    let (_, mut frames) = http.stream("/v1/workflows/run", Some(START)).await;
    frames.next().await.unwrap();
    assert!(t0.elapsed() >= delay);
    let all = frames.rest().await;
    assert_eq!(all.len(), SCRIPT_EVENTS.len() - 1);
    assert!(t0.elapsed() >= delay * SCRIPT_EVENTS.len() as u32);
}

#[tokio::test]
async fn stop_ends_a_streaming_run_as_stopped() {
    let (up, http) = mock().await;
    up.hold_events();
    let (_, mut frames) = http.stream("/v1/workflows/run", Some(START)).await;
    up.release_events(1);
    let started = event(&frames.next().await.unwrap());
    let task = started["task_id"].as_str().unwrap();
    let run_id = started["workflow_run_id"].as_str().unwrap();
    let path = format!("/v1/workflows/tasks/{task}/stop");
    let no_user = http.post_json(&path, "{}").await;
    assert_eq!(no_user.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_user.json()["code"], "invalid_param");
    let stop = http.post_json(&path, r#"{"user": "alice"}"#).await;
    assert_eq!(stop.status, StatusCode::OK);
    assert_eq!(stop.text(), r#"{"result": "success"}"#);
    // Held, yet the stop ends it at once.
    let rest = frames.rest().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    let finished = event(&rest[0]);
    assert_eq!(finished["event"], "workflow_finished");
    assert_eq!(finished["data"]["status"], "stopped");
    let detail = http.get(&format!("/v1/workflows/run/{run_id}")).await;
    assert_eq!(detail.json()["status"], "stopped");
    // Dify says success for a task it does not know.
    let unknown = http
        .post_json("/v1/workflows/tasks/nope/stop", r#"{"user": "bob"}"#)
        .await;
    assert_eq!(unknown.status, StatusCode::OK);
}

#[tokio::test]
async fn a_stream_left_by_its_reader_is_abandoned_and_the_run_stranded() {
    let (up, http) = mock().await;
    up.hold_events();
    let (_, mut frames) = http.stream("/v1/workflows/run", Some(START)).await;
    up.release_events(1);
    let run_id = event(&frames.next().await.unwrap())["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(frames);
    drop(http);
    // Held: the server learns the reader left from the connection alone, not from a failed write.
    assert_eq!(
        within(up.stream_end(&run_id)).await,
        Some(StreamEnd::Abandoned)
    );
    assert_eq!(up.run(&run_id).unwrap().status, "running");
    let streams = up.streams();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].kind, StreamKind::Run);
}

#[tokio::test]
async fn a_blocking_run_answers_when_it_has_ended() {
    let (up, http) = mock().await;
    up.set_run_script(RunScript {
        end: RunEnd::Failed("LLM quota exceeded".into()),
        ..RunScript::chunks(2)
    });
    let sent = r#"{"inputs":{},  "user": "bob", "response_mode": "blocking"}"#;
    let got = http.post_json("/v1/workflows/run", sent).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert!(got.text().starts_with(r#"{"task_id": ""#), "{}", got.text());
    let v = got.json();
    let data = &v["data"];
    assert_eq!(data["id"], v["workflow_run_id"]);
    assert_eq!(data["status"], "failed");
    assert_eq!(data["error"], "LLM quota exceeded");
    for key in [
        "workflow_id",
        "outputs",
        "elapsed_time",
        "total_tokens",
        "total_steps",
        "created_at",
        "finished_at",
    ] {
        assert!(data.get(key).is_some(), "{key}");
    }
    // The body reached the mock byte for byte.
    let rec = up.requests_to("/v1/workflows/run");
    assert_eq!(rec[0].body_text(), Some(sent));
    assert!(up.streams().is_empty());
    // The default response mode is blocking.
    let default = http
        .post_json("/v1/workflows/run", r#"{"inputs": {}, "user": "bob"}"#)
        .await;
    assert_eq!(default.json()["data"]["status"], "failed");
}

#[tokio::test]
async fn run_starts_are_checked_as_dify_checks_them() {
    let (up, http) = mock().await;
    for body in [
        r#"{"inputs": {}}"#,
        r#"{"inputs": {}, "user": ""}"#,
        r#"{"user": "a"}"#,
        r#"{"inputs": [], "user": "a"}"#,
        r#"{"inputs": {}, "user": "a", "response_mode": "later"}"#,
    ] {
        let got = http.post_json("/v1/workflows/run", body).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(got.json()["code"], "invalid_param", "{body}");
        assert_eq!(got.json()["status"], 400);
    }
    let not_json = http.post_json("/v1/workflows/run", "{nope").await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
    let bad_workflow = http
        .post_json("/v1/workflows/draft/run", r#"{"inputs": {}, "user": "a"}"#)
        .await;
    assert_eq!(bad_workflow.status, StatusCode::BAD_REQUEST);
    assert!(up.runs().is_empty());
    let wf = "0b7a1f9c-2d3e-4f50-8a6b-7c8d9e0f1a2b";
    let got = http
        .post_json(
            &format!("/v1/workflows/{wf}/run"),
            r#"{"inputs": {}, "user": "a"}"#,
        )
        .await;
    assert_eq!(got.json()["data"]["workflow_id"], wf);
    let get = http.get("/v1/workflows/run").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_stream_resumes_for_its_creator_only() {
    let (up, http) = mock().await;
    up.hold_events();
    let (_, mut frames) = http.stream("/v1/workflows/run", Some(START)).await;
    up.release_events(1);
    let run_id = event(&frames.next().await.unwrap())["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/workflow/{run_id}/events");
    for q in ["", "?user=bob"] {
        let other = http.get(&format!("{path}{q}")).await;
        assert_eq!(other.status, StatusCode::NOT_FOUND, "{q}");
        assert_eq!(other.json()["code"], "not_found");
    }
    let (head, mut resumed) = http.stream(&format!("{path}?user=alice"), None).await;
    assert_eq!(head.status, StatusCode::OK);
    up.release_events(1);
    assert_eq!(event_name(&frames.next().await.unwrap()), "node_started");
    assert_eq!(event_name(&resumed.next().await.unwrap()), "node_started");
    // With the state snapshot, the events so far come first.
    let (_, mut snapshot) = http
        .stream(
            &format!("{path}?user=alice&include_state_snapshot=true"),
            None,
        )
        .await;
    assert_eq!(
        event_name(&snapshot.next().await.unwrap()),
        "workflow_started"
    );
    assert_eq!(event_name(&snapshot.next().await.unwrap()), "node_started");
    up.free_events();
    let original = frames.rest().await;
    let followed = resumed.rest().await;
    assert_eq!(followed, original, "the resumed stream follows the run");
    assert_eq!(snapshot.rest().await, original);
    // A finished run resumes as its workflow_finished alone.
    let (_, mut again) = http.stream(&format!("{path}?user=alice"), None).await;
    let last = again.rest().await;
    assert_eq!(last.len(), 1);
    assert_eq!(event_name(&last[0]), "workflow_finished");
    let kinds: Vec<StreamKind> = up.streams().iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            StreamKind::Run,
            StreamKind::Resume,
            StreamKind::Resume,
            StreamKind::Resume
        ]
    );
}

#[tokio::test]
async fn a_run_row_written_late_is_not_found_at_first() {
    let (up, http) = mock().await;
    up.set_run_row_delay(Duration::from_secs(3600));
    let got = http
        .post_json("/v1/workflows/run", r#"{"inputs": {}, "user": "a"}"#)
        .await;
    let path = format!(
        "/v1/workflows/run/{}",
        got.json()["workflow_run_id"].as_str().unwrap()
    );
    let early = http.get(&path).await;
    assert_eq!(early.status, StatusCode::NOT_FOUND);
    assert_eq!(early.json()["code"], "not_found");
    up.set_run_row_delay(Duration::ZERO);
    let later = http.get(&path).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(later.json()["status"], "succeeded");
}

#[tokio::test]
async fn logs_page_filter_and_record_their_query() {
    let (up, http) = mock().await;
    for user in ["a", "b", "a"] {
        http.post_json(
            "/v1/workflows/run",
            &format!(r#"{{"inputs": {{}}, "user": "{user}"}}"#),
        )
        .await;
    }
    let queries = [
        "page=1&limit=1&created_by_end_user_session_id=a",
        "status=succeeded&keyword=&limit=100",
        "limit=0",
        "status=sleeping",
    ];
    let first = http
        .get(&format!("/v1/workflows/logs?{}", queries[0]))
        .await;
    let v = first.json();
    assert!(first
        .text()
        .starts_with(r#"{"page": 1, "limit": 1, "total": 2, "has_more": true, "data": ["#));
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    let entry = &v["data"][0];
    assert_eq!(entry["created_by_end_user"]["session_id"], "a");
    assert_eq!(entry["workflow_run"]["status"], "succeeded");
    assert_eq!(entry["created_from"], "service-api");
    let all = http
        .get(&format!("/v1/workflows/logs?{}", queries[1]))
        .await;
    assert_eq!(all.json()["total"], 3);
    assert_eq!(all.json()["has_more"], false);
    for q in &queries[2..] {
        let bad = http.get(&format!("/v1/workflows/logs?{q}")).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{q}");
    }
    assert_eq!(up.queries("/v1/workflows/logs"), queries);
}

#[tokio::test]
async fn an_unfinished_stream_ends_without_workflow_finished() {
    let (up, http) = mock().await;
    up.set_run_script(RunScript {
        end: RunEnd::Unfinished,
        ping: false,
        ..RunScript::chunks(1)
    });
    let (_, mut frames) = http.stream("/v1/workflows/run", Some(START)).await;
    let all = frames.rest().await;
    let names: Vec<String> = all.iter().map(|f| event_name(f)).collect();
    assert_eq!(
        names,
        [
            "workflow_started",
            "node_started",
            "node_finished",
            "node_started",
            "text_chunk",
            "node_finished",
            "node_started",
            "node_finished"
        ]
    );
    let run_id = event(&all[0])["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        within(up.stream_end(&run_id)).await,
        Some(StreamEnd::Delivered)
    );
    let detail = http.get(&format!("/v1/workflows/run/{run_id}")).await;
    assert_eq!(detail.json()["status"], "running");
}

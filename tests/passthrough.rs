//! The Workflow App API passed through to each client's app: run streams event by event and
//! followed to their end, streamed uploads under a cap, checked JSON bodies, end users prefixed
//! per client, forwarded headers, unlisted paths, app isolation, and a run's finish dropping its
//! kept `running` answer.

mod common;
#[path = "common/http1.rs"]
mod http1;

use std::time::Duration;

use bytes::Bytes;
use common::pass::*;
use common::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::mock::{MockDify, StreamEnd};
use http::{Method, StatusCode};
use hyper::body::Frame;

const JSON: (&str, &str) = ("content-type", "application/json");

fn streaming_run(user: &str) -> String {
    format!(r#"{{"inputs": {{"q": "hi"}}, "response_mode": "streaming", "user": "{user}"}}"#)
}

/// A client entry and its bearer header value.
fn client_entry(name: &str, app: &str, extra: &str) -> (String, String) {
    let token = generate_token().unwrap();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"{app}\"\n{extra}\n",
        token_sha256_hex(&token)
    );
    (entry, format!("Bearer {token}"))
}

async fn start_stream(c: &BodyClient, gw: &TestGateway, auth: &str) -> EventReader {
    let resp = open(
        c,
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, ("authorization", auth)],
        streaming_run("u1"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(
        h["content-type"].to_str().unwrap().split(';').next(),
        Some("text/event-stream")
    );
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    EventReader::new(resp.into_body())
}

#[tokio::test]
async fn each_event_reaches_the_client_before_the_next_is_produced() {
    let up = spawn_upstream().await;
    up.hold_events();
    let gw = spawn_gateway(config(&up, "")).await;
    let c = body_client();
    let mut events = start_stream(&c, &gw, "").await;
    let mut seen = 0u64;
    loop {
        up.release_events(1);
        let Some(e) = events.next_event().await else {
            break;
        };
        seen += 1;
        // The mock produced exactly the events the client has read: nothing was held back
        // waiting for the next one.
        assert_eq!(up.events_produced(), seen, "{e}");
        if e.contains("workflow_finished") {
            break;
        }
    }
    assert!(seen >= 5, "a whole run's events: {seen}");
    up.free_events();
    assert!(events.next_event().await.is_none());
}

#[tokio::test]
async fn a_client_that_leaves_does_not_stop_the_run() {
    let up = spawn_upstream().await;
    up.hold_events();
    let gw = spawn_gateway(config(&up, "")).await;
    let c = body_client();
    let mut events = start_stream(&c, &gw, "").await;
    up.release_events(1);
    let first = events.next_event().await.unwrap();
    assert!(first.contains("workflow_started"), "{first}");
    let run = EventReader::run_id(&first);
    drop(events);
    up.free_events();
    let end = tokio::time::timeout(WAIT, up.stream_end(&run))
        .await
        .unwrap();
    assert_eq!(end, Some(StreamEnd::Delivered));
    assert_eq!(up.run(&run).unwrap().status, "succeeded");
}

#[tokio::test]
async fn a_silent_upstream_gets_the_client_heartbeats() {
    let up = spawn_upstream().await;
    up.hold_events();
    let gw = spawn_gateway(config(
        &up,
        "[stream]\nheartbeat = \"50ms\"\nidle_timeout = \"20s\"\n",
    ))
    .await;
    let c = body_client();
    let mut events = start_stream(&c, &gw, "").await;
    up.release_events(1);
    assert!(events.next().await.unwrap().contains("workflow_started"));
    // Nothing more is produced upstream: the next block is the gateway's comment.
    assert_eq!(events.next().await.as_deref(), Some(": ping\n\n"));
    assert_eq!(up.events_produced(), 1);
    up.free_events();
}

#[tokio::test]
async fn a_silent_upstream_is_cut_after_the_idle_timeout() {
    let up = spawn_upstream().await;
    up.hold_events();
    let gw = spawn_gateway(config(
        &up,
        "[stream]\nheartbeat = \"20ms\"\nidle_timeout = \"200ms\"\n",
    ))
    .await;
    let c = body_client();
    let mut events = start_stream(&c, &gw, "").await;
    up.release_events(1);
    assert!(events
        .next_event()
        .await
        .unwrap()
        .contains("workflow_started"));
    // No more events: the stream ends (comments aside) without the run finishing.
    assert!(events.next_event().await.is_none());
    up.free_events();
}

#[tokio::test]
async fn a_blocking_run_answers_its_json() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = body_client();
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON],
        r#"{"inputs": {}, "response_mode": "blocking", "user": "u"}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["data"]["status"], "succeeded");
}

#[tokio::test]
async fn a_finished_run_drops_its_kept_running_answer() {
    let up = spawn_upstream().await;
    up.hold_events();
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"1h\"\n")).await;
    let c = body_client();
    let mut events = start_stream(&c, &gw, "").await;
    up.release_events(1);
    let run = EventReader::run_id(&events.next_event().await.unwrap());
    let plain = client();
    let first = get(&plain, &gw.run_url(&run)).await;
    assert_eq!(first.json()["status"], "running");
    assert_eq!(get(&plain, &gw.run_url(&run)).await.x_cache(), "HIT");
    up.free_events();
    while events.next_event().await.is_some() {}
    // Without the drop the running answer would be served for an hour.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = get(&plain, &gw.run_url(&run)).await;
        if got.json()["status"] == "succeeded" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn bad_json_bodies_never_reach_the_upstream() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[passthrough]\nmax_json_bytes = 100\n")).await;
    let c = body_client();
    let url = gw.url("/v1/workflows/run");
    let bad = send(&c, Method::POST, &url, &[JSON], "{\"inputs\": ").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["code"], "invalid_param");
    let big = format!(
        r#"{{"inputs": {{"q": "{}"}}, "user": "u"}}"#,
        "x".repeat(200)
    );
    let too_big = send(&c, Method::POST, &url, &[JSON], big).await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_big.json()["code"], "request_too_large");
    let stop = send(
        &c,
        Method::POST,
        &gw.url("/v1/workflows/tasks/not-a-uuid/stop"),
        &[JSON],
        "{\"user\": \"u\"}",
    )
    .await;
    assert_eq!(stop.status, StatusCode::BAD_REQUEST);
    assert_eq!(up.total(), 0);
}

fn multipart(boundary: &str, user: &str, file: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\n{user}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(file);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b
}

#[tokio::test]
async fn a_100_mib_upload_streams_through_whole() {
    const SIZE: usize = 100 << 20;
    let up = spawn_upstream().await;
    up.set_upload_limit(200 << 20);
    // The default cap is 100 MiB for the whole body; the form around the file needs a little more.
    let gw = spawn_gateway(config(&up, "[passthrough]\nmax_upload_bytes = 105906176\n")).await;
    let c = body_client();
    let ct = "multipart/form-data; boundary=XyZ";
    let whole = multipart("XyZ", "u", &vec![b'z'; SIZE]);
    let len = whole.len().to_string();
    let (tx, answer) = streaming(
        &c,
        Method::POST,
        &gw.url("/v1/files/upload"),
        &[("content-type", ct), ("content-length", &len)],
    );
    let head_len = whole.len() - SIZE - 12;
    let mut rest = Bytes::from(whole);
    let first = rest.split_to(head_len + 1024);
    tx.send(Ok(Frame::data(first))).await.unwrap();
    // The upstream request has begun while most of the body is still with the client: the
    // gateway forwards as it reads rather than gathering the upload first.
    eventually("upload reaches the upstream", || {
        up.path_hits("/v1/files/upload") == 1
    })
    .await;
    while !rest.is_empty() {
        let n = rest.len().min(1 << 20);
        tx.send(Ok(Frame::data(rest.split_to(n)))).await.unwrap();
    }
    drop(tx);
    let got = tokio::time::timeout(WAIT, answer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.status, StatusCode::CREATED, "{:?}", got.body);
    let uploads = up.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].size, SIZE as u64);
}

#[tokio::test]
async fn an_upload_past_the_cap_is_413_even_mid_stream() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[passthrough]\nmax_upload_bytes = 4096\n")).await;
    let c = body_client();
    let ct = "multipart/form-data; boundary=XyZ";
    let body = multipart("XyZ", "u", &[b'z'; 10_000]);
    // Announced too large: refused unread.
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/files/upload"),
        &[("content-type", ct)],
        body.clone(),
    )
    .await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(got.json()["code"], "request_too_large");
    assert_eq!(up.total(), 0);
    // Streamed without a length (HTTP/2): cut at the cap, after the upstream request began.
    let c = h2_body_client();
    let (tx, answer) = streaming(
        &c,
        Method::POST,
        &gw.url("/v1/files/upload"),
        &[("content-type", ct)],
    );
    for chunk in body.chunks(1000) {
        if tx
            .send(Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let got = tokio::time::timeout(WAIT, answer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(got.json()["code"], "request_too_large");
    assert!(up.uploads().is_empty());
}

#[tokio::test]
async fn end_users_are_prefixed_in_json_multipart_and_queries() {
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry(
        "team-a",
        "default",
        "user_prefix = \"team-a:\"\nread_app_logs = true",
    );
    let gw = spawn_gateway(config(&up, &entry)).await;
    let c = body_client();
    let auth = ("authorization", auth.as_str());
    // JSON: only the user's bytes change; spacing, order and the rest stay as sent.
    let sent =
        r#"{ "inputs" : {"user": "not-top-level"},"response_mode":"blocking",  "user":"u1" }"#;
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, auth],
        sent,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let req = up.requests_to("/v1/workflows/run").pop().unwrap();
    assert_eq!(
        req.body_text().unwrap(),
        r#"{ "inputs" : {"user": "not-top-level"},"response_mode":"blocking",  "user":"team-a:u1" }"#
    );
    assert_eq!(up.runs()[0].user, "team-a:u1");
    // Multipart: the user field prefixed, the file untouched.
    let body = multipart("b0undary", "u2", b"file bytes");
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/files/upload"),
        &[
            ("content-type", "multipart/form-data; boundary=b0undary"),
            auth,
        ],
        body,
    )
    .await;
    assert_eq!(got.status, StatusCode::CREATED, "{:?}", got.body);
    let u = up.uploads().pop().unwrap();
    assert_eq!(u.user.as_deref(), Some("team-a:u2"));
    assert_eq!(u.size, 10);
    // Query: user and the logs' end-user filter.
    let got = send(
        &c,
        Method::GET,
        &gw.url("/v1/workflows/logs?page=1&user=u3&created_by_end_user_session_id=u3&limit=5"),
        &[auth],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
    assert_eq!(
        up.queries("/v1/workflows/logs"),
        ["page=1&user=team-a%3Au3&created_by_end_user_session_id=team-a%3Au3&limit=5"]
    );
}

#[tokio::test]
async fn only_the_listed_headers_are_forwarded() {
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", "default", "");
    let gw = spawn_gateway(config(&up, &entry)).await;
    let c = body_client();
    let got = send(
        &c,
        Method::GET,
        &gw.url("/v1/parameters"),
        &[
            ("authorization", auth.as_str()),
            ("cookie", "session=secret"),
            ("x-trace-id", "trace-1"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("x-forwarded-for", "10.1.2.3"),
            ("x-request-id", "req-123"),
            ("accept", "application/json"),
        ],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let h = up.last_request().unwrap().headers;
    assert_eq!(h["authorization"], format!("Bearer {KEY}"));
    assert_eq!(h["x-trace-id"], "trace-1");
    assert!(h.contains_key("traceparent"));
    assert_eq!(h["x-request-id"], "req-123");
    assert!(!h.contains_key("cookie"));
    assert!(!h.contains_key("x-forwarded-for"));
    assert!(got.header("set-cookie").is_none());
}

#[tokio::test]
async fn unlisted_paths_are_refused_unless_allowed() {
    let up = spawn_upstream().await;
    let c = body_client();
    let gw = spawn_gateway(config(&up, "")).await;
    let got = send(&c, Method::GET, &gw.url("/v1/chat-messages"), &[], "").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.json()["code"], "not_found");
    assert_eq!(up.total(), 0);
    let gw = spawn_gateway(config(&up, "[passthrough]\nallow_unlisted = true\n")).await;
    send(&c, Method::GET, &gw.url("/v1/chat-messages?x=1"), &[], "").await;
    assert_eq!(up.path_hits("/v1/chat-messages"), 1);
    assert_eq!(
        up.last_request().unwrap().headers["authorization"],
        format!("Bearer {KEY}")
    );
    // Never a path that could resolve outside `/v1`.
    let got = send(&c, Method::GET, &gw.url("/v1/a/%2e%2e/admin"), &[], "").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(up.total(), 1);
}

#[tokio::test]
async fn a_client_of_app_a_cannot_start_runs_on_app_b() {
    let a = MockDify::start("app-alpha-key-111").await.unwrap();
    let b = MockDify::start("app-beta-key-222").await.unwrap();
    let (ea, auth_a) = client_entry("team-a", "alpha", "");
    let (eb, auth_b) = client_entry("team-b", "beta", "");
    let toml = format!(
        "[[apps]]\nname = \"alpha\"\napi_key_env = \"KEY_ALPHA\"\nbase_url = \"{}\"\n\n[[apps]]\nname = \"beta\"\napi_key_env = \"KEY_BETA\"\nbase_url = \"{}\"\n\n{ea}{eb}",
        a.base_url(),
        b.base_url()
    );
    let cfg = config_with_env(
        &toml,
        &[
            ("KEY_ALPHA", "app-alpha-key-111"),
            ("KEY_BETA", "app-beta-key-222"),
        ],
    );
    let gw = spawn_gateway(cfg).await;
    let c = body_client();
    let run = r#"{"inputs": {}, "response_mode": "blocking", "user": "u"}"#;
    for _ in 0..2 {
        let got = send(
            &c,
            Method::POST,
            &gw.url("/v1/workflows/run"),
            &[JSON, ("authorization", &auth_a)],
            run,
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let got = send(
        &c,
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, ("authorization", &auth_b)],
        run,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(a.runs().len(), 2);
    assert_eq!(b.runs().len(), 1);
    let none = send(&c, Method::POST, &gw.url("/v1/workflows/run"), &[JSON], run).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.runs().len() + b.runs().len(), 3);
}

#[tokio::test]
async fn stop_events_and_previews_pass_through() {
    let up = spawn_upstream().await;
    up.hold_events();
    let gw = spawn_gateway(config(&up, "")).await;
    let c = body_client();
    let mut events = start_stream(&c, &gw, "").await;
    up.release_events(1);
    let started = events.next_event().await.unwrap();
    let run = EventReader::run_id(&started);
    let task = up.run(&run).unwrap().task_id;
    let got = send(
        &c,
        Method::POST,
        &gw.url(&format!("/v1/workflows/tasks/{task}/stop")),
        &[JSON],
        "{\"user\": \"u1\"}",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
    assert_eq!(got.json()["result"], "success");
    up.free_events();
    while events.next_event().await.is_some() {}
    assert_eq!(up.run(&run).unwrap().status, "stopped");
    let resumed = send(
        &c,
        Method::GET,
        &gw.url(&format!("/v1/workflow/{run}/events?user=u1")),
        &[],
        "",
    )
    .await;
    assert_eq!(resumed.status, StatusCode::OK, "{:?}", resumed.body);
    assert!(std::str::from_utf8(&resumed.body)
        .unwrap()
        .contains("workflow_finished"));
    let info = send(&c, Method::GET, &gw.url("/v1/info"), &[], "").await;
    assert_eq!(info.status, StatusCode::OK);
    let wrong = send(&c, Method::GET, &gw.url("/v1/workflows/run"), &[], "").await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.header("allow"), Some("POST"));
}

/// A run started through the gateway is its client's: another client of the same app gets
/// Dify's 404 for its detail, its stop, its event stream and the file it uploaded, while the
/// owner reaches them all; the logs need `read_app_logs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_client_cannot_read_stop_or_follow_a_run_or_see_a_file() {
    let up = spawn_upstream().await;
    up.hold_events();
    let (a_entry, a) = client_entry("team-a", "default", "");
    let (b_entry, b) = client_entry("team-b", "default", "");
    let gw = spawn_gateway(config(&up, &format!("{a_entry}{b_entry}"))).await;
    let c = body_client();
    let (a, b) = (("authorization", a.as_str()), ("authorization", b.as_str()));
    let mut events = start_stream(&c, &gw, a.1).await;
    up.release_events(1);
    let started = events.next_event().await.unwrap();
    let run = EventReader::run_id(&started);
    let task = up.run(&run).unwrap().task_id;
    let before = up.total();
    for (method, path, body, code) in [
        (
            Method::GET,
            format!("/v1/workflows/run/{run}"),
            "",
            "not_found",
        ),
        (
            Method::GET,
            format!("/v1/workflow/{run}/events?user=u1"),
            "",
            "not_found",
        ),
        (
            Method::POST,
            format!("/v1/workflows/tasks/{task}/stop"),
            "{\"user\": \"u1\"}",
            "not_found",
        ),
    ] {
        let got = send(&c, method.clone(), &gw.url(&path), &[JSON, b], body).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(got.json()["code"], code, "{method} {path}");
    }
    assert_eq!(up.total(), before, "a foreign request reached the upstream");
    let logs = send(&c, Method::GET, &gw.url("/v1/workflows/logs"), &[b], "").await;
    assert_eq!(logs.status, StatusCode::FORBIDDEN);
    assert_eq!(logs.json()["code"], "forbidden");
    // The owner stops its own run.
    let stop = send(
        &c,
        Method::POST,
        &gw.url(&format!("/v1/workflows/tasks/{task}/stop")),
        &[JSON, a],
        "{\"user\": \"u1\"}",
    )
    .await;
    assert_eq!(stop.status, StatusCode::OK, "{:?}", stop.body);
    up.free_events();
    while events.next_event().await.is_some() {}
    let detail = send(&c, Method::GET, &gw.run_url(&run), &[a], "").await;
    assert_eq!(detail.status, StatusCode::OK);
    // A file is its uploader's.
    let upload = send(
        &c,
        Method::POST,
        &gw.url("/v1/files/upload"),
        &[
            ("content-type", "multipart/form-data; boundary=b0undary"),
            a,
        ],
        multipart("b0undary", "u1", b"file bytes"),
    )
    .await;
    assert_eq!(upload.status, StatusCode::CREATED, "{:?}", upload.body);
    let file = upload.json()["id"].as_str().unwrap().to_owned();
    let foreign = send(
        &c,
        Method::GET,
        &gw.url(&format!("/v1/files/{file}/preview")),
        &[b],
        "",
    )
    .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    assert_eq!(foreign.json()["code"], "file_not_found");
    let own = send(
        &c,
        Method::GET,
        &gw.url(&format!("/v1/files/{file}/preview")),
        &[a],
        "",
    )
    .await;
    assert_eq!(own.status, StatusCode::OK, "{:?}", own.body);
}

/// Run starts have their own limits: `runs_per_minute` refuses the next start with 429 and
/// `Retry-After`, `max_open_streams` refuses a second stream while the first is followed and
/// lets one in once the client has left it; reads are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_starts_have_their_own_limits() {
    let up = spawn_upstream().await;
    up.hold_events();
    let (entry, auth) = client_entry(
        "team-a",
        "default",
        "runs_per_minute = 3\nmax_open_streams = 1",
    );
    let gw = spawn_gateway(config(&up, &entry)).await;
    let c = body_client();
    let first = start_stream(&c, &gw, &auth).await;
    let second = send(
        &c,
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, ("authorization", &auth)],
        streaming_run("u1"),
    )
    .await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.json()["code"], "too_many_requests");
    assert!(second.header("retry-after").is_some());
    // The client leaves its stream: its place is free, though the gateway reads on.
    drop(first);
    let mut freed = false;
    for _ in 0..100 {
        let again = open(
            &c,
            Method::POST,
            &gw.url("/v1/workflows/run"),
            &[JSON, ("authorization", &auth)],
            streaming_run("u1"),
        )
        .await;
        if again.status() == StatusCode::OK {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the left stream's place was never freed");
    up.free_events();
    // Two streams were started (a start refused for its stream place is not spent); a third
    // start is within the minute's budget of 3, a fourth is over it.
    let url = gw.url("/v1/workflows/run");
    let headers = [JSON, ("authorization", auth.as_str())];
    let run = "{\"inputs\": {}, \"response_mode\": \"blocking\", \"user\": \"u1\"}";
    let third = send(&c, Method::POST, &url, &headers, run).await;
    assert_eq!(third.status, StatusCode::OK);
    let over = send(&c, Method::POST, &url, &headers, run).await;
    assert_eq!(
        over.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        over.body
    );
    assert_eq!(over.json()["code"], "too_many_requests");
    assert!(over.header("retry-after").is_some());
    // Reads are not run starts.
    let params = send(
        &c,
        Method::GET,
        &gw.url("/v1/parameters"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(params.status, StatusCode::OK);
}

/// `/parameters` (and `/info`, `/meta`, `/site`) is asked upstream once per app and
/// `cache.app_meta_ttl`, however many clients ask at once; after the TTL, once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_descriptions_are_fetched_once_per_ttl() {
    let up = spawn_upstream().await;
    let (a_entry, a) = client_entry("team-a", "default", "");
    let (b_entry, b) = client_entry("team-b", "default", "");
    let gw = spawn_gateway(config(
        &up,
        &format!("[cache]\napp_meta_ttl = \"300ms\"\n{a_entry}{b_entry}"),
    ))
    .await;
    let c = body_client();
    let asks = (0..20).map(|i| {
        let (c, url) = (c.clone(), gw.url("/v1/parameters"));
        let auth = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            send(
                &c,
                Method::GET,
                &url,
                &[("authorization", auth.as_str())],
                "",
            )
            .await
        })
    });
    let mut bodies = Vec::new();
    for t in asks.collect::<Vec<_>>() {
        let got = t.await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        bodies.push(got.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(up.path_hits("/v1/parameters"), 1);
    let hit = send(
        &c,
        Method::GET,
        &gw.url("/v1/parameters"),
        &[("authorization", a.as_str())],
        "",
    )
    .await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    // After the TTL the next read asks again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let again = send(
        &c,
        Method::GET,
        &gw.url("/v1/parameters"),
        &[("authorization", a.as_str())],
        "",
    )
    .await;
    assert_eq!(again.header("x-cache"), Some("MISS"));
    assert_eq!(up.path_hits("/v1/parameters"), 2);
}

/// An HTTP/1.1 upload with `Transfer-Encoding: chunked` (a client that does not know its
/// length) streams through; a chunked read is still refused as ambiguous framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_is_read_by_its_chunks() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let body = multipart("b0undary", "u1", b"chunked file");
    let mut raw = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    let got = http1::exchange(gw.addr, &raw).await;
    assert_eq!(got.status, 201, "{:?}", got.body);
    assert_eq!(up.uploads().pop().unwrap().size, 12);
    let read = http1::exchange(
        gw.addr,
        b"GET /v1/parameters HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(read.status, 400);
}

/// Blocking and streaming runs are counted with the same figures to the client that started
/// them, and a client over its day's quota starts nothing more while its reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_are_metered_and_bounded_by_the_quota() {
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", "default", "quota_runs_per_day = 2");
    let gw = spawn_gateway(config(&up, &entry)).await;
    let c = body_client();
    let headers = [JSON, ("authorization", auth.as_str())];
    let url = gw.url("/v1/workflows/run");
    let blocking = send(
        &c,
        Method::POST,
        &url,
        &headers,
        "{\"inputs\": {}, \"response_mode\": \"blocking\", \"user\": \"u1\"}",
    )
    .await;
    assert_eq!(blocking.status, StatusCode::OK);
    let mut events = start_stream(&c, &gw, &auth).await;
    while events.next_event().await.is_some() {}
    let mut today = Vec::new();
    for _ in 0..200 {
        today = gw.gateway.usage().today().await.unwrap();
        if today.iter().map(|r| r.figures.total_runs()).sum::<u64>() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(today.len(), 1, "{today:?}");
    let row = &today[0];
    let f = &row.figures;
    assert_eq!(
        (row.client.as_str(), f.total_runs()),
        ("team-a", 2),
        "{row:?}"
    );
    assert_eq!(f.runs.get("succeeded"), Some(&2));
    // The streaming run is counted with the same figures as the blocking one.
    let data = &blocking.json()["data"];
    let (tokens, steps) = (
        data["total_tokens"].as_u64().unwrap(),
        data["total_steps"].as_u64().unwrap(),
    );
    assert!(tokens > 0);
    assert_eq!((f.tokens, f.steps), (2 * tokens, 2 * steps), "{row:?}");
    let over = send(
        &c,
        Method::POST,
        &url,
        &headers,
        "{\"inputs\": {}, \"response_mode\": \"blocking\", \"user\": \"u1\"}",
    )
    .await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(over.json()["code"], "quota_exceeded");
    assert!(over.header("retry-after").is_some());
    let run = blocking.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let read = send(
        &c,
        Method::GET,
        &gw.run_url(&run),
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(read.status, StatusCode::OK);
}

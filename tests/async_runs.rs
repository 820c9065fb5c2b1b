//! Async run starts (`"response_mode": "async"`), `Idempotency-Key` on run starts (one
//! gateway and across replicas on a real Redis), and the grace for a run that Dify has not
//! written yet (`cache.not_found_grace`).

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::time::Duration;

use common::pass::*;
use common::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::mock::{MockDify, RunEnd, RunScript};
use http::{Method, StatusCode};
use redis_server::RedisServer;

const JSON: (&str, &str) = ("content-type", "application/json");

fn start_body(mode: &str, user: &str) -> String {
    format!(r#"{{"inputs": {{"q": "hi"}}, "response_mode": "{mode}", "user": "{user}"}}"#)
}

/// A client entry and its bearer header value.
fn client_entry(name: &str, extra: &str) -> (String, String) {
    let token = generate_token().unwrap();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n{extra}\n",
        token_sha256_hex(&token)
    );
    (entry, format!("Bearer {token}"))
}

async fn start(c: &BodyClient, gw: &TestGateway, headers: &[(&str, &str)], body: String) -> Got {
    let mut h = vec![JSON];
    h.extend_from_slice(headers);
    send(c, Method::POST, &gw.url("/v1/workflows/run"), &h, body).await
}

/// Starts a streaming run; its events (past `workflow_started`) and its run id.
async fn start_stream(gw: &TestGateway) -> (EventReader, String) {
    let resp = open(
        &body_client(),
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON],
        start_body("streaming", "u1"),
    )
    .await;
    let mut events = EventReader::new(resp.into_body());
    let run = EventReader::run_id(&events.next_event().await.unwrap());
    (events, run)
}

/// Waits until the mock's run `id` is no longer running.
async fn until_finished(up: &MockDify, id: &str) {
    eventually("the run finishes", || {
        up.run(id).is_some_and(|r| r.status != "running")
    })
    .await;
}

#[tokio::test]
async fn an_async_start_is_accepted_once_the_run_starts_and_the_run_goes_on_alone() {
    let up = spawn_upstream().await;
    up.hold_events();
    let gw = spawn_gateway(config(&up, "")).await;
    let c = body_client();
    let answer = {
        let (c, url) = (c.clone(), gw.url("/v1/workflows/run"));
        tokio::spawn(async move {
            send(&c, Method::POST, &url, &[JSON], start_body("async", "u1")).await
        })
    };
    // Nothing is answered before the run has started upstream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!answer.is_finished(), "answered before workflow_started");
    up.release_events(1);
    let got = answer.await.unwrap();
    assert_eq!(got.status, StatusCode::ACCEPTED, "{:?}", got.body);
    assert_eq!(got.header("content-type"), Some("application/json"));
    let v = got.json();
    let run = v["workflow_run_id"].as_str().unwrap().to_owned();
    let info = up.run(&run).expect("the run exists upstream");
    assert_eq!(v["task_id"], info.task_id.as_str());
    assert_eq!(v["status"], "running");
    assert_eq!(
        got.header("location"),
        Some(format!("/v1/workflows/run/{run}").as_str())
    );
    // Upstream, it is an ordinary streaming start.
    let sent = up.requests_to("/v1/workflows/run");
    let sent: serde_json::Value = serde_json::from_slice(sent[0].body.as_ref().unwrap()).unwrap();
    assert_eq!(sent["response_mode"], "streaming");
    assert_eq!(sent["user"], "u1");

    // The gateway reads the run to its end with nobody attached, then brings its terminal
    // answer into the cache: the first poll after the end is a hit.
    up.free_events();
    until_finished(&up, &run).await;
    eventually("the finished run is fetched once", || up.hits(&run) == 1).await;
    let c2 = client();
    let detail = get(&c2, &gw.run_url(&run)).await;
    assert_eq!(detail.status, StatusCode::OK);
    assert_eq!(detail.json()["status"], "succeeded");
    assert_eq!(detail.x_cache(), "HIT");
    assert_eq!(up.hits(&run), 1);
}

#[tokio::test]
async fn an_async_start_that_dify_refuses_gets_difys_error() {
    let up = spawn_upstream().await;
    up.set_run_script(RunScript {
        end: RunEnd::Refused {
            code: "provider_quota_exceeded".into(),
            message: "Your quota for Dify Hosted Model Provider has been exhausted.".into(),
        },
        ..RunScript::default()
    });
    let gw = spawn_gateway(config(&up, "")).await;
    let got = start(&body_client(), &gw, &[], start_body("async", "u1")).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    let v = got.json();
    assert_eq!(v["code"], "provider_quota_exceeded");
    assert_eq!(v["status"], 400);
    assert!(v["message"].as_str().unwrap().contains("exhausted"));
    assert!(got.header("location").is_none());
}

#[tokio::test]
async fn an_async_run_holds_its_clients_stream_place_until_it_ends() {
    let up = spawn_upstream().await;
    up.hold_events();
    let (entry, auth) = client_entry("team-a", "max_open_streams = 1");
    let gw = spawn_gateway(config(&up, &entry)).await;
    let c = body_client();
    let first = {
        let (c, url, auth) = (c.clone(), gw.url("/v1/workflows/run"), auth.clone());
        tokio::spawn(async move {
            let h = [JSON, ("authorization", auth.as_str())];
            send(&c, Method::POST, &url, &h, start_body("async", "u1")).await
        })
    };
    up.release_events(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let run = first.json()["workflow_run_id"].as_str().unwrap().to_owned();
    // The run is still followed upstream: a second stream (async or not) waits its turn.
    let auth_h = ("authorization", auth.as_str());
    for mode in ["async", "streaming"] {
        let refused = start(&c, &gw, &[auth_h], start_body(mode, "u1")).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{mode}");
        assert_eq!(refused.json()["code"], "too_many_requests");
    }
    up.free_events();
    until_finished(&up, &run).await;
    eventually("the place is free", || {
        gw.gateway.starts().open_streams("team-a") == Some(0)
    })
    .await;
    let again = start(&c, &gw, &[auth_h], start_body("async", "u1")).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn one_idempotency_key_starts_one_run_and_replays_its_answer() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = body_client();
    for (mode, key) in [("async", "k-async"), ("blocking", "k-blocking")] {
        let before = up.runs().len();
        let first = start(&c, &gw, &[("idempotency-key", key)], start_body(mode, "u1")).await;
        assert!(first.status.is_success(), "{mode}: {:?}", first.body);
        let again = start(&c, &gw, &[("idempotency-key", key)], start_body(mode, "u1")).await;
        assert_eq!(again.status, first.status, "{mode}");
        assert_eq!(
            again.body, first.body,
            "{mode}: the same answer, byte for byte"
        );
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.header("location"), first.header("location"));
        assert_eq!(up.runs().len(), before + 1, "{mode}: one run upstream");
        // The same key with another body is refused, not replayed.
        let other = start(&c, &gw, &[("idempotency-key", key)], start_body(mode, "u2")).await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(other.json()["code"], "idempotency_key_mismatch");
        assert_eq!(up.runs().len(), before + 1);
    }
    // A stream cannot be replayed: the retry learns the run's ids instead of starting another.
    let resp = open(
        &c,
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, ("idempotency-key", "k-stream")],
        start_body("streaming", "u1"),
    )
    .await;
    let mut events = EventReader::new(resp.into_body());
    let started = events.next_event().await.unwrap();
    let run = EventReader::run_id(&started);
    let runs = up.runs().len();
    let again = start(
        &c,
        &gw,
        &[("idempotency-key", "k-stream")],
        start_body("streaming", "u1"),
    )
    .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let v = again.json();
    assert_eq!(v["code"], "run_already_started");
    assert!(v["message"].as_str().unwrap().contains(&run));
    assert_eq!(
        again.header("location"),
        Some(format!("/v1/workflows/run/{run}").as_str())
    );
    assert_eq!(up.runs().len(), runs);
    let metrics = gw.gateway.metrics_text();
    for (outcome, n) in [("fresh", 3), ("replay", 3), ("mismatch", 2)] {
        let line = format!("dify_gateway_idempotency_keys_total{{outcome=\"{outcome}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    // A malformed key is refused before anything is sent.
    let total = up.total();
    let bad = start(
        &c,
        &gw,
        &[("idempotency-key", "two words")],
        start_body("async", "u1"),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["code"], "invalid_param");
    assert_eq!(up.total(), total);
}

#[tokio::test]
async fn a_key_is_per_client_in_use_while_its_start_runs_and_freed_by_a_failed_start() {
    let up = spawn_upstream().await;
    let (a, auth_a) = client_entry("team-a", "");
    let (b, auth_b) = client_entry("team-b", "");
    let gw = spawn_gateway(config(&up, &format!("{a}{b}"))).await;
    let c = body_client();
    let key = ("idempotency-key", "order-42");
    up.hold_events();
    let first = {
        let (c, url, auth) = (c.clone(), gw.url("/v1/workflows/run"), auth_a.clone());
        tokio::spawn(async move {
            let h = [JSON, ("authorization", auth.as_str()), key];
            send(&c, Method::POST, &url, &h, start_body("blocking", "u1")).await
        })
    };
    eventually("the first start is upstream", || up.runs().len() == 1).await;
    let busy = start(
        &c,
        &gw,
        &[("authorization", &auth_a), key],
        start_body("blocking", "u1"),
    )
    .await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(busy.json()["code"], "idempotency_key_in_use");
    assert_eq!(busy.header("retry-after"), Some("1"));
    // Another client's same key is its own.
    up.free_events();
    let other = start(
        &c,
        &gw,
        &[("authorization", &auth_b), key],
        start_body("blocking", "u1"),
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(up.runs().len(), 2);
    assert_ne!(first.body, other.body);

    // A start that makes no run leaves its key free for the retry.
    up.set_run_script(RunScript {
        end: RunEnd::Refused {
            code: "provider_not_initialize".into(),
            message: "No valid model provider credentials found.".into(),
        },
        ..RunScript::default()
    });
    let key2 = ("idempotency-key", "order-43");
    let failed = start(
        &c,
        &gw,
        &[("authorization", &auth_a), key2],
        start_body("async", "u1"),
    )
    .await;
    assert_eq!(failed.status, StatusCode::BAD_REQUEST);
    up.set_run_script(RunScript::default());
    let retried = start(
        &c,
        &gw,
        &[("authorization", &auth_a), key2],
        start_body("async", "u1"),
    )
    .await;
    assert_eq!(retried.status, StatusCode::ACCEPTED);
    assert!(retried.header("idempotent-replayed").is_none());
}

#[tokio::test]
async fn an_idempotency_key_holds_across_replicas() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let toml = format!(
        "[shared]\nurls = [\"{}\"]\ntimeout = \"500ms\"\n",
        redis.url()
    );
    let a = spawn_gateway(config(&up, &toml)).await;
    let b = spawn_gateway(config(&up, &toml)).await;
    let c = body_client();
    let key = ("idempotency-key", "fleet-1");
    let first = start(&c, &a, &[key], start_body("async", "u1")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = start(&c, &b, &[key], start_body("async", "u1")).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.runs().len(), 1);
}

#[tokio::test]
async fn a_run_seen_starting_is_not_taken_for_missing_while_dify_writes_it() {
    let up = spawn_upstream().await;
    up.set_run_row_delay(Duration::from_millis(1200));
    let gw = spawn_gateway(config(&up, "")).await;
    let (mut events, run) = start_stream(&gw).await;
    // Dify answers 404 for this run for a while; the gateway asks again instead of passing
    // (and keeping) the 404.
    let detail = get(&client(), &gw.run_url(&run)).await;
    assert_eq!(detail.status, StatusCode::OK, "{:?}", detail.body);
    assert!(up.hits(&run) >= 2, "asked again: {}", up.hits(&run));
    while events.next_event().await.is_some() {}

    // A run the gateway never saw start gets its 404 at once, kept as before.
    let unknown = new_run();
    let c2 = client();
    assert_eq!(
        get(&c2, &gw.run_url(&unknown)).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(&c2, &gw.run_url(&unknown)).await.x_cache(), "HIT");
    assert_eq!(up.hits(&unknown), 1);
}

#[tokio::test]
async fn without_the_grace_a_late_row_is_a_404() {
    let up = spawn_upstream().await;
    up.set_run_row_delay(Duration::from_secs(5));
    let gw = spawn_gateway(config(&up, "[cache]\nnot_found_grace = \"0s\"\n")).await;
    let (_events, run) = start_stream(&gw).await;
    let detail = get(&client(), &gw.run_url(&run)).await;
    assert_eq!(detail.status, StatusCode::NOT_FOUND);
    assert_eq!(up.hits(&run), 1);
}

/// Starts an async run while the mock holds events (released one by one); its id.
async fn held_async_start(up: &MockDify, gw: &TestGateway) -> String {
    let answer = {
        let (c, url) = (body_client(), gw.url("/v1/workflows/run"));
        tokio::spawn(async move {
            send(&c, Method::POST, &url, &[JSON], start_body("async", "u1")).await
        })
    };
    up.release_events(1);
    let got = answer.await.unwrap();
    assert_eq!(got.status, StatusCode::ACCEPTED);
    got.json()["workflow_run_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_drain_waits_for_the_runs_it_follows_within_the_drain_timeout() {
    let up = spawn_upstream().await;
    up.hold_events();
    let mut gw = spawn_gateway(config(&up, "[server]\ndrain_timeout = \"20s\"\n")).await;
    let run = held_async_start(&up, &gw).await;
    assert_eq!(gw.gateway.followed_runs().len(), 1);
    gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !gw.task.is_finished(),
        "the drain waits for the followed run"
    );
    up.free_events();
    let drain = tokio::time::timeout(Duration::from_secs(15), &mut gw.task)
        .await
        .expect("the drain ends once the run has")
        .unwrap();
    assert_eq!(drain, dify_gateway::server::Drain::Complete);
    assert_eq!(up.run(&run).unwrap().status, "succeeded");
}

#[tokio::test]
async fn a_drain_cuts_a_followed_run_at_the_drain_timeout() {
    let up = spawn_upstream().await;
    up.hold_events();
    let mut gw = spawn_gateway(config(&up, "[server]\ndrain_timeout = \"500ms\"\n")).await;
    let run = held_async_start(&up, &gw).await;
    gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), &mut gw.task)
        .await
        .expect("the drain ends at its timeout")
        .unwrap();
    assert_eq!(up.run(&run).unwrap().status, "running");
    up.free_events();
}

#[tokio::test]
async fn another_replica_gives_a_run_seen_starting_the_same_grace() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    up.set_run_row_delay(Duration::from_millis(1200));
    let toml = format!(
        "[shared]\nurls = [\"{}\"]\ntimeout = \"500ms\"\n",
        redis.url()
    );
    let a = spawn_gateway(config(&up, &toml)).await;
    let b = spawn_gateway(config(&up, &toml)).await;
    let (_events, run) = start_stream(&a).await;
    // The start passed through A; B is asked first, while Dify still answers 404.
    eventually("A marked the start for the fleet", || {
        let mut c = redis.raw();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*started*").query(&mut c).unwrap();
        !keys.is_empty()
    })
    .await;
    let detail = get(&client(), &b.run_url(&run)).await;
    assert_eq!(detail.status, StatusCode::OK, "{:?}", detail.body);
    assert!(up.hits(&run) >= 2, "asked again: {}", up.hits(&run));
    // No replica kept (or shared) a 404 for it.
    assert_eq!(
        get(&client(), &a.run_url(&run)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_retry_of_a_start_already_made_gets_its_answer_past_the_quota() {
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", "quota_runs_per_day = 1");
    let gw = spawn_gateway(config(&up, &entry)).await;
    let c = body_client();
    let auth = auth.as_str();
    let send_with = |key: &'static str| {
        let h = [("authorization", auth), ("idempotency-key", key)];
        let (c, gw) = (c.clone(), &gw);
        async move { start(&c, gw, &h, start_body("blocking", "u1")).await }
    };
    let first = send_with("q-1").await;
    assert_eq!(first.status, StatusCode::OK);
    // The run is counted once it has finished (off the answer's path).
    eventually("the run is counted", || {
        gw.gateway
            .metrics_text()
            .contains("dify_gateway_usage_runs_total")
    })
    .await;
    let again = send_with("q-1").await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body, first.body);
    let next = send_with("q-2").await;
    assert_eq!(next.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(next.json()["code"], "quota_exceeded");
    assert_eq!(up.runs().len(), 1);
}

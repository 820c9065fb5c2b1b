//! Clients that stop polling: conditional requests (ETag, 304, Cache-Control), long-poll with
//! `Prefer: wait=N`, and the status stream, against the mock Dify.

mod common;

use common::*;
use dify_gateway::mock::Reply;
use http::{Method, StatusCode};

#[tokio::test]
async fn etag_304_and_cache_control_for_running_and_terminal() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"50ms\"\n")).await;
    let c = client();

    let first = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(first.status, StatusCode::OK);
    let etag = first.header("etag").expect("etag").to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34,
        "{etag}"
    );
    assert_eq!(first.header("cache-control"), Some("private, no-cache"));

    // A match — plain, weak, in a list, or `*` — is a 304 with no body, from the cache.
    let weak = format!("W/{etag}");
    let list = format!("\"other\", {etag}");
    for inm in [etag.as_str(), weak.as_str(), list.as_str(), "*"] {
        let got = request(&c, Method::GET, &gw.run_url(RUN), &[("if-none-match", inm)]).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(got.body.is_empty());
        assert_eq!(got.header("etag"), Some(etag.as_str()));
        assert_eq!(got.header("cache-control"), Some("private, no-cache"));
    }
    let other = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("if-none-match", "\"x\"")],
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.body, first.body);

    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    let done = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "the body changed");
    let done_tag = done.header("etag").unwrap().to_owned();
    assert_ne!(done_tag, etag);
    assert_eq!(
        done.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    let hits = up.hits(RUN);
    let again = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("if-none-match", &done_tag)],
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(
        again.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    assert_eq!(up.hits(RUN), hits, "a 304 comes from the cache");
}

/// Waits until `gw` holds `n` requests (the gauge announces it; no event does).
async fn held(gw: &TestGateway, n: i64) {
    let m = std::sync::Arc::clone(gw.gateway.metrics());
    eventually(&format!("{n} held requests"), move || {
        m.longpoll_waiters.get() == n
    })
    .await;
}

/// A long-poll for `run` on `gw`, with `headers` beside `Prefer: wait=<wait>`.
fn long_poll(
    gw: &TestGateway,
    run: &str,
    wait: &str,
    headers: &[(&str, &str)],
) -> tokio::task::JoinHandle<Got> {
    let url = gw.run_url(run);
    let mut h: Vec<(String, String)> = vec![("prefer".into(), format!("wait={wait}"))];
    h.extend(
        headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    tokio::spawn(async move {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        request(&client(), Method::GET, &url, &h).await
    })
}

#[tokio::test]
async fn a_waiter_answers_at_terminal() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"50ms\"\n")).await;
    let w = long_poll(&gw, RUN, "20", &[]);
    held(&gw, 1).await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let got = w.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["status"], "succeeded");
    assert_eq!(got.header("preference-applied"), Some("wait=20"));
    assert_eq!(
        got.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    held(&gw, 0).await;
    let m = std::sync::Arc::clone(gw.gateway.metrics());
    eventually("the watcher ends", move || m.longpoll_watchers.get() == 0).await;

    // A terminal run is answered at once, without Preference-Applied.
    let again = long_poll(&gw, RUN, "20", &[]).await.unwrap();
    assert_eq!(again.json()["status"], "succeeded");
    assert_eq!(again.header("preference-applied"), None);
}

#[tokio::test]
async fn an_if_none_match_waiter_answers_at_a_change() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"50ms\"\n")).await;
    let first = get(&client(), &gw.run_url(RUN)).await;
    let etag = first.header("etag").unwrap().to_owned();

    // A different ETag answers at once.
    let other = long_poll(&gw, RUN, "20", &[("if-none-match", "\"other\"")])
        .await
        .unwrap();
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.header("preference-applied"), None);

    let w = long_poll(&gw, RUN, "20", &[("if-none-match", &etag)]);
    held(&gw, 1).await;
    // Still running, but the body changed.
    up.set(RUN, Reply::run_sized(RUN, "\"running\"", 64));
    let got = w.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["status"], "running");
    assert_ne!(got.header("etag"), Some(etag.as_str()));
    assert_eq!(got.header("preference-applied"), Some("wait=20"));
}

#[tokio::test]
async fn the_wait_is_capped_and_applied() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(
        &up,
        "[cache]\nrunning_ttl = \"50ms\"\n[longpoll]\nmax_wait = \"1s\"\n",
    ))
    .await;
    let first = get(&client(), &gw.run_url(RUN)).await;
    let etag = first.header("etag").unwrap().to_owned();
    let got = long_poll(&gw, RUN, "3600", &[("if-none-match", &etag)])
        .await
        .unwrap();
    assert_eq!(
        got.status,
        StatusCode::NOT_MODIFIED,
        "nothing changed in the wait"
    );
    assert!(got.body.is_empty());
    assert_eq!(got.header("preference-applied"), Some("wait=1"));
    // Without If-None-Match: the running state at the end of the wait.
    let got = long_poll(&gw, RUN, "1", &[("prefer", "respond-async")])
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["status"], "running");
    assert_eq!(got.header("preference-applied"), Some("wait=1"));
    held(&gw, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiters_cost_one_upstream_request_per_running_ttl() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"100ms\"\n")).await;
    let _ = get(&client(), &gw.run_url(RUN)).await;
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (c, url) = (c.clone(), gw.run_url(RUN));
        set.spawn(async move { request(&c, Method::GET, &url, &[("prefer", "wait=30")]).await });
    }
    held(&gw, 1000).await;
    assert_eq!(gw.gateway.metrics().longpoll_watchers.get(), 1);
    let before = up.hits(RUN);
    let t = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let mut answers = 0;
    while let Some(got) = set.join_next().await {
        let got = got.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            got.json()["status"],
            "succeeded",
            "each client gets the terminal answer"
        );
        answers += 1;
    }
    assert_eq!(answers, 1000);
    let spent = up.hits(RUN) - before;
    let bound = (t.elapsed().as_millis() / 100) as u64 + 3;
    assert!(spent <= bound, "{spent} upstream requests (bound {bound})");
    assert!(spent >= 2, "the watcher refreshed: {spent}");
}

#[tokio::test]
async fn max_waiters_global_503_and_per_client_429() {
    use dify_gateway::clients::{generate_token, token_sha256_hex};
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let (ta, tb) = (generate_token().unwrap(), generate_token().unwrap());
    let toml = format!(
        "[cache]\nrunning_ttl = \"50ms\"\n[longpoll]\nmax_waiters = 2\n\
         [[clients]]\nname = \"a\"\ntoken_sha256 = \"{}\"\napp = \"default\"\nmax_waiters = 1\n\
         [[clients]]\nname = \"b\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n",
        token_sha256_hex(&ta),
        token_sha256_hex(&tb)
    );
    let gw = spawn_gateway(config(&up, &toml)).await;
    let (a, b) = (format!("Bearer {ta}"), format!("Bearer {tb}"));
    let first = long_poll(&gw, RUN, "20", &[("authorization", &a)]);
    held(&gw, 1).await;
    let refused = long_poll(&gw, RUN, "20", &[("authorization", &a)])
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.header("retry-after").is_some());
    let second = long_poll(&gw, RUN, "20", &[("authorization", &b)]);
    held(&gw, 2).await;
    let full = long_poll(&gw, RUN, "20", &[("authorization", &b)])
        .await
        .unwrap();
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    // The stream counts against the same caps.
    let full = request(
        &client(),
        Method::GET,
        &gw.url(&format!("/v1/workflows/run/{RUN}/events")),
        &[("authorization", &b)],
    )
    .await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    up.set(RUN, Reply::run(RUN, "\"failed\""));
    assert_eq!(first.await.unwrap().json()["status"], "failed");
    assert_eq!(second.await.unwrap().json()["status"], "failed");
    held(&gw, 0).await;
}

#[tokio::test]
async fn shutdown_releases_waiters_with_the_current_state() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let mut gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"50ms\"\n")).await;
    let w = long_poll(&gw, RUN, "60", &[]);
    held(&gw, 1).await;
    gw.begin_shutdown();
    let got = w.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["status"], "running");
}

/// Reads an event stream's text until it ends (bounded).
async fn stream_text(gw: &TestGateway, run: &str, headers: &[(&str, &str)]) -> (Got, String) {
    let got = request(
        &client(),
        Method::GET,
        &gw.url(&format!("/v1/workflows/run/{run}/events")),
        headers,
    )
    .await;
    let text = String::from_utf8(got.body.to_vec()).unwrap();
    (got, text)
}

/// The `data` of each `status` event in `text`.
fn statuses(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| e.contains("event: status"))
        .map(|e| {
            let data: Vec<&str> = e.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            let v: serde_json::Value = serde_json::from_str(&data.join("\n")).unwrap();
            v["status"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn the_status_stream_sends_each_change_and_ends_after_the_terminal_one() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(
        &up,
        "[cache]\nrunning_ttl = \"50ms\"\n[stream]\nheartbeat = \"20ms\"\n",
    ))
    .await;
    let first = get(&client(), &gw.run_url(RUN)).await;
    let reader = {
        let url = gw.url(&format!("/v1/workflows/run/{RUN}/events"));
        tokio::spawn(async move { request(&client(), Method::GET, &url, &[]).await })
    };
    held(&gw, 1).await;
    up.set(RUN, Reply::run_sized(RUN, "\"running\"", 32));
    // The heartbeat runs meanwhile (20 ms); then the run ends.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let got = reader.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-type"), Some("text/event-stream"));
    assert_eq!(got.header("cache-control"), Some("no-cache"));
    assert_eq!(got.header("x-accel-buffering"), Some("no"));
    let text = String::from_utf8(got.body.to_vec()).unwrap();
    assert_eq!(
        statuses(&text),
        ["running", "running", "succeeded"],
        "{text}"
    );
    let first_event = text.split("\n\n").next().unwrap();
    let etag = first.header("etag").unwrap();
    assert!(
        first_event.starts_with(&format!("event: status\nid: {etag}\ndata: ")),
        "{text}"
    );
    let body = std::str::from_utf8(&first.body)
        .unwrap()
        .trim_end_matches('\n');
    assert!(
        first_event.ends_with(&format!("data: {body}")),
        "the body as received: {text}"
    );
    assert!(text.contains("\n\n: ping\n\n"), "heartbeats: {text}");
    held(&gw, 0).await;

    // Terminal: one event, then the end; Last-Event-ID equal to its ETag skips it.
    let (got, text) = stream_text(&gw, RUN, &[]).await;
    assert_eq!(statuses(&text), ["succeeded"]);
    let tag = text
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("id: ")
        .unwrap()
        .to_owned();
    assert_eq!(got.status, StatusCode::OK);
    let (_, text) = stream_text(&gw, RUN, &[("last-event-id", &tag)]).await;
    assert_eq!(text, "", "the event the client has is skipped");
}

#[tokio::test]
async fn a_stream_for_a_missing_run_is_the_run_detail_answer() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let (got, _) = stream_text(&gw, &new_run(), &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let (got, _) = stream_text(&gw, "not-a-run", &[]).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
}

//! End-to-end behaviour of the gateway against the mock Dify, over real HTTP on loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dify_gateway::mock::{run_body, Reply};
use http::{Method, StatusCode};

#[tokio::test]
async fn body_bytes_and_dify_headers_are_forwarded_as_received() {
    let up = spawn_upstream().await;
    let body = run_body(RUN, "\"succeeded\"", 2000);
    up.set(RUN, Reply::ok_json(body.clone()));
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let first = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, body, "bytes differ from upstream");
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("x-version"), Some("1.9.2"));
    assert_eq!(first.header("x-env"), Some("PRODUCTION"));
    assert_eq!(first.x_cache(), "MISS");
    assert!(first.header("age").is_none());
    let second = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(second.body, body);
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.header("age"), Some("0"));
    assert_eq!(second.header("x-version"), Some("1.9.2"));
}

#[tokio::test]
async fn key_is_injected_and_client_credentials_are_not_forwarded() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let got = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[
            ("authorization", "Bearer client-token-should-not-pass"),
            ("cookie", "session=abc"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("x-fields", "id"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-custom", "nope"),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = up.last_headers().expect("upstream saw a request");
    assert_eq!(seen["authorization"], format!("Bearer {KEY}").as_str());
    for h in [
        "cookie",
        "proxy-authorization",
        "x-forwarded-for",
        "forwarded",
        "x-fields",
        "te",
        "upgrade",
        "x-custom",
    ] {
        assert!(seen.get(h).is_none(), "{h} was forwarded");
    }
    assert!(!format!("{seen:?}").contains("client-token"));
}

#[tokio::test]
async fn each_terminal_status_is_fetched_once() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    for status in ["succeeded", "failed", "stopped", "partial-succeeded"] {
        let id = new_run();
        up.set(&id, Reply::run(&id, &format!("\"{status}\"")));
        for i in 0..25 {
            let got = get(&c, &gw.run_url(&id)).await;
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(
                got.x_cache(),
                if i == 0 { "MISS" } else { "HIT" },
                "{status} #{i}"
            );
        }
        assert_eq!(up.hits(&id), 1, "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_cold_requests_make_one_upstream_request() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    up.set_delay(Duration::from_millis(200));
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, url) = (c.clone(), gw.run_url(RUN));
        tasks.push(tokio::spawn(async move { get(&c, &url).await }));
    }
    let mut misses = 0;
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        misses += usize::from(got.x_cache() == "MISS");
        assert!(matches!(got.x_cache(), "MISS" | "COALESCED" | "HIT"));
    }
    assert_eq!(misses, 1);
    assert_eq!(up.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_run_polled_by_twenty_clients_is_bounded_and_terminal_seen_promptly() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let ttl = Duration::from_millis(500);
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"500ms\"\n")).await;
    let poll_for = Duration::from_secs(3);
    let start = Instant::now();
    let switch_at = start + poll_for;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = gw.run_url(RUN);
        tasks.push(tokio::spawn(async move {
            let c = client();
            // Poll every 20 ms until the client sees the terminal state; report when.
            loop {
                let got = get(&c, &url).await;
                assert_eq!(got.status, StatusCode::OK);
                if got.json()["status"] == "succeeded" {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep_until(switch_at.into()).await;
    let upstream_while_running = up.total();
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let switched = Instant::now();
    for t in tasks {
        let seen = t.await.unwrap();
        let lag = seen.saturating_duration_since(switched);
        assert!(
            lag <= ttl + Duration::from_millis(300),
            "terminal seen {lag:?} after the switch"
        );
    }
    // About one upstream request per TTL while running (plus the first), not one per poll.
    let bound = (poll_for.as_millis() / ttl.as_millis()) as u64 + 2;
    assert!(
        upstream_while_running <= bound,
        "{upstream_while_running} upstream requests in {poll_for:?} (bound {bound})"
    );
    // Terminal answers are then served without the upstream.
    let after = up.total();
    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.run_url(RUN)).await.x_cache(), "HIT");
    }
    assert_eq!(up.total(), after);
}

#[tokio::test]
async fn paused_and_null_status_are_never_kept_as_terminal() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"100ms\"\n")).await;
    let c = client();
    for status in [
        "\"paused\"",
        "null",
        "\"scheduled\"",
        "\"some-future-status\"",
    ] {
        let id = new_run();
        up.set(&id, Reply::run(&id, status));
        get(&c, &gw.run_url(&id)).await;
        assert_eq!(
            get(&c, &gw.run_url(&id)).await.x_cache(),
            "HIT",
            "{status} kept briefly"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            get(&c, &gw.run_url(&id)).await.x_cache(),
            "MISS",
            "{status} expired"
        );
        assert_eq!(up.hits(&id), 2, "{status}");
    }
    // Old Dify's answer for an unknown run: 200 with every field null.
    let id = new_run();
    up.set(&id, Reply::ok_json("{\"id\": null, \"workflow_id\": null, \"status\": null, \"inputs\": null, \"outputs\": null, \"error\": null, \"total_steps\": null, \"total_tokens\": null, \"created_at\": null, \"finished_at\": null, \"elapsed_time\": null}\n"));
    get(&c, &gw.run_url(&id)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(&c, &gw.run_url(&id)).await.x_cache(), "MISS");
}

#[tokio::test]
async fn running_ttl_zero_never_keeps_but_still_answers() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"0s\"\n")).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &gw.run_url(RUN)).await.x_cache(), "MISS");
    }
    assert_eq!(up.hits(RUN), 3);
}

#[tokio::test]
async fn malformed_ids_are_answered_locally_with_difys_error_shape() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    for bad in [
        "not-a-uuid",
        "3f2a1b0c9d8e4f7a8b6c5d4e3f2a1b0c",
        "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0",
        "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0cc",
        "%7B3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c%7D",
        "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0z",
        "..%2F..%2Fparameters",
        "%2e%2e",
        "",
    ] {
        let got = get(&c, &gw.run_url(bad)).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{bad}");
        let v = got.json();
        assert_eq!(v["code"], "invalid_param", "{bad}");
        assert_eq!(v["status"], 400);
        assert!(v["message"].as_str().unwrap().contains("UUID"));
    }
    assert_eq!(up.total(), 0);
}

#[tokio::test]
async fn upper_and_lower_case_ids_share_one_entry() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    assert_eq!(
        get(&c, &gw.run_url(&RUN.to_uppercase())).await.x_cache(),
        "MISS"
    );
    assert_eq!(get(&c, &gw.run_url(RUN)).await.x_cache(), "HIT");
    assert_eq!(up.total(), 1);
    // Upstream saw the canonical lower-case id.
    assert_eq!(up.hits(RUN), 1);
}

#[tokio::test]
async fn upstream_404_is_kept_briefly() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[cache]\nnot_found_ttl = \"300ms\"\n")).await;
    let c = client();
    let first = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    assert_eq!(first.json()["code"], "not_found");
    let second = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(
        (second.status, second.x_cache()),
        (StatusCode::NOT_FOUND, "HIT")
    );
    assert_eq!(up.hits(RUN), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&c, &gw.run_url(RUN)).await.x_cache(), "MISS");
    assert_eq!(up.hits(RUN), 2);
}

#[tokio::test]
async fn errors_and_bad_json_are_never_kept() {
    let up = spawn_upstream().await;
    // Caching policy only: retries and the breaker have their own tests (tests/faults.rs).
    let gw = spawn_gateway(config(
        &up,
        "[upstream]\nretry_attempts = 1\ncircuit_failure_threshold = 0\n",
    ))
    .await;
    let c = client();
    let cases = [
        (Reply::json(StatusCode::INTERNAL_SERVER_ERROR, "{\"message\": \"Internal Server Error\", \"code\": \"unknown\", \"status\": 500}\n"), StatusCode::INTERNAL_SERVER_ERROR),
        (Reply::cloudflare_429(7), StatusCode::TOO_MANY_REQUESTS),
        (Reply::dify_error(StatusCode::UNAUTHORIZED, "unauthorized", "Access token is invalid"), StatusCode::UNAUTHORIZED),
        (Reply::dify_error(StatusCode::FORBIDDEN, "forbidden", "App is disabled"), StatusCode::FORBIDDEN),
        (Reply::json(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>"), StatusCode::BAD_GATEWAY),
        (Reply::ok_json("{\"status\": \"succeeded\", \"outputs\": {"), StatusCode::OK),
        (Reply::ok_json("<html>not json</html>"), StatusCode::OK),
    ];
    for (reply, code) in cases {
        let id = new_run();
        let expected_body = match &reply {
            Reply::Bytes { body, .. } => body.clone(),
            _ => unreachable!(),
        };
        up.set(&id, reply);
        for _ in 0..3 {
            let got = get(&c, &gw.run_url(&id)).await;
            assert_eq!(got.status, code);
            assert_eq!(
                got.body, expected_body,
                "upstream error bodies pass as received"
            );
            assert_eq!(got.x_cache(), "MISS");
        }
        assert_eq!(up.hits(&id), 3, "{code} was cached");
    }
    // Retry-After of a 429 reaches the client.
    let id = new_run();
    up.set(&id, Reply::cloudflare_429(7));
    assert_eq!(
        get(&c, &gw.run_url(&id)).await.header("retry-after"),
        Some("7")
    );
}

#[tokio::test]
async fn upstream_down_still_serves_cached_terminal_runs() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let gw = spawn_gateway(config(&up, "[upstream]\nconnect_timeout = \"1s\"\n")).await;
    let c = client();
    assert_eq!(get(&c, &gw.run_url(RUN)).await.status, StatusCode::OK);
    up.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..5 {
        let got = get(&c, &gw.run_url(RUN)).await;
        assert_eq!((got.status, got.x_cache()), (StatusCode::OK, "HIT"));
    }
    let other = get(&c, &gw.run_url(&new_run())).await;
    assert_eq!(other.status, StatusCode::BAD_GATEWAY);
    let v = other.json();
    assert_eq!(v["status"], 502);
    assert_eq!(v["code"], "upstream_unavailable", "{v}");
}

#[tokio::test]
async fn a_body_of_several_mib_is_served_byte_identical() {
    let up = spawn_upstream().await;
    let body = run_body(RUN, "\"succeeded\"", 6 * 1024 * 1024);
    assert!(body.len() > 6 * 1024 * 1024);
    up.set(RUN, Reply::ok_json(body.clone()));
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let miss = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(miss.body.len(), body.len());
    assert!(miss.body == body);
    let hit = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!(hit.body == body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unique_ids_stays_under_the_byte_cap() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[cache]\nmax_bytes = 1048576\n")).await;
    let mut ids = Vec::new();
    for _ in 0..1500 {
        let id = new_run();
        up.set(&id, Reply::run_sized(&id, "\"succeeded\"", 2000));
        ids.push(id);
    }
    let mut tasks = Vec::new();
    for chunk in ids.chunks(150) {
        let chunk = chunk.to_vec();
        let urls: Vec<String> = chunk.iter().map(|id| gw.run_url(id)).collect();
        tasks.push(tokio::spawn(async move {
            let c = client();
            for u in urls {
                assert_eq!(get(&c, &u).await.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = gw.gateway.cache().stats();
    assert!(stats.weighted_bytes <= 1_048_576, "{stats:?}");
    assert!(stats.entries < 1500 && stats.entries > 100, "{stats:?}");
}

#[tokio::test]
async fn upstream_timeout_size_cap_and_reset_give_json_errors_and_cache_nothing() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(
        &up,
        "[upstream]\ntotal_timeout = \"300ms\"\nmax_body_bytes = 100000\nretry_attempts = 1\ncircuit_failure_threshold = 0\n",
    ))
    .await;
    let c = client();
    let cases = [
        (Reply::Hang, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        (
            Reply::run_sized(RUN, "\"succeeded\"", 200_000),
            StatusCode::BAD_GATEWAY,
            "upstream_body_too_large",
        ),
        (
            Reply::StreamForever,
            StatusCode::BAD_GATEWAY,
            "upstream_body_too_large",
        ),
        (
            Reply::ResetMidBody {
                partial: bytes::Bytes::from_static(b"{\"status\": \"succ"),
                claimed: 5000,
            },
            StatusCode::BAD_GATEWAY,
            "upstream_bad_response",
        ),
    ];
    for (reply, code, kind) in cases {
        let id = new_run();
        up.set(&id, reply);
        for _ in 0..2 {
            let got = get(&c, &gw.run_url(&id)).await;
            assert_eq!(got.status, code, "{kind}");
            assert_eq!(got.json()["code"], kind);
            assert_eq!(got.json()["status"], code.as_u16());
        }
        assert_eq!(up.hits(&id), 2, "{kind} was cached");
    }
    // Still healthy.
    assert_eq!(get(&c, &gw.url("/healthz")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn routes_methods_and_head() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let health = get(&c, &gw.url("/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
    for path in [
        "/",
        "/v1/workflows/run/a/b",
        "/v1/chat-messages",
        "/v2/parameters",
    ] {
        let got = get(&c, &gw.url(path)).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(got.json()["code"], "not_found");
    }
    // The rest of the Workflow App API is passed through (see tests/passthrough.rs): a run
    // start is POST only, the app's descriptions and logs are read.
    let start = get(&c, &gw.url("/v1/workflows/run")).await;
    assert_eq!(start.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(start.header("allow"), Some("POST"));
    for path in ["/v1/workflows/logs", "/v1/parameters"] {
        assert_eq!(
            get(&c, &gw.url(path)).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    // Repeated slashes are merged before routing: this is the run-detail route, with an id
    // that is not a UUID.
    let merged = get(&c, &gw.url("//v1/workflows/run/x")).await;
    assert_eq!(merged.status, StatusCode::BAD_REQUEST);
    assert_eq!(merged.json()["code"], "invalid_param");
    for m in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let got = request(&c, m.clone(), &gw.run_url(RUN), &[]).await;
        assert_eq!(got.status, StatusCode::METHOD_NOT_ALLOWED, "{m}");
        assert_eq!(got.header("allow"), Some("GET, HEAD"));
    }
    let head = request(&c, Method::HEAD, &gw.run_url(RUN), &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    let full = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(
        head.header("content-length").map(str::to_owned),
        Some(full.body.len().to_string())
    );
    assert_eq!(up.hits(RUN), 1, "HEAD and GET share one fetch");
    assert_eq!(up.total(), 3, "the two passed-through reads and one fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_a_request_in_flight_finish() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    up.set_delay(Duration::from_millis(500));
    let mut gw = spawn_gateway(config(&up, "")).await;
    let url = gw.run_url(RUN);
    let inflight = tokio::spawn(async move { get(&client(), &url).await });
    while up.total() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.begin_shutdown();
    let got = inflight.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        gw.task.await.unwrap(),
        dify_gateway::server::Drain::Complete
    );
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

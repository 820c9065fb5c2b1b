//! Upstream faults and abuse: retries, the circuit breaker, stale-if-error, slow and idle
//! clients, oversized heads, and a flood of unique ids beside hot cached runs.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use dify_gateway::mock::Reply;
use http::StatusCode;

fn unavailable() -> Reply {
    Reply::json(
        StatusCode::SERVICE_UNAVAILABLE,
        "<html><body>503 Service Temporarily Unavailable</body></html>",
    )
}

#[tokio::test]
async fn transient_failures_are_retried_and_the_client_sees_the_success() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[upstream]\nretry_base_delay = \"10ms\"\n")).await;
    let c = client();
    let id = new_run();
    up.set_sequence(
        &id,
        vec![
            unavailable(),
            Reply::json(StatusCode::BAD_GATEWAY, "bad gateway"),
            Reply::run(&id, "\"succeeded\""),
        ],
    );
    let got = get(&c, &gw.run_url(&id)).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(up.hits(&id), 3);
    assert_eq!(get(&c, &gw.run_url(&id)).await.x_cache(), "HIT");
    // Retry-After within the cap is honoured.
    let id = new_run();
    up.set_sequence(
        &id,
        vec![Reply::cloudflare_429(1), Reply::run(&id, "\"succeeded\"")],
    );
    let t = Instant::now();
    assert_eq!(get(&c, &gw.run_url(&id)).await.status, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "waited for Retry-After"
    );
    // A Retry-After beyond the cap is not waited for: the client gets the 429.
    let id = new_run();
    up.set_sequence(
        &id,
        vec![Reply::cloudflare_429(60), Reply::run(&id, "\"succeeded\"")],
    );
    let got = get(&c, &gw.run_url(&id)).await;
    assert_eq!(
        (got.status, got.header("retry-after")),
        (StatusCode::TOO_MANY_REQUESTS, Some("60"))
    );
    assert_eq!(up.hits(&id), 1);
    // Non-transient answers are not retried.
    let id = new_run();
    up.set(
        &id,
        Reply::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"message\": \"Internal Server Error\", \"code\": \"unknown\", \"status\": 500}",
        ),
    );
    get(&c, &gw.run_url(&id)).await;
    assert_eq!(up.hits(&id), 1);
    let m = String::from_utf8_lossy(&get(&c, &gw.admin_url("/metrics")).await.body).into_owned();
    assert!(m.contains("dify_gateway_upstream_retries_total 3"), "{m}");
}

#[tokio::test]
async fn retries_stop_at_the_attempt_limit_and_the_deadline() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[upstream]\nretry_base_delay = \"10ms\"\nretry_attempts = 4\ncircuit_failure_threshold = 0\ntotal_timeout = \"2s\"\n")).await;
    let c = client();
    let id = new_run();
    up.set(&id, unavailable());
    let got = get(&c, &gw.run_url(&id)).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.hits(&id), 4);
    // Slow upstream: no retry is started past the deadline.
    let id = new_run();
    up.set(&id, Reply::Hang);
    let t = Instant::now();
    let got = get(&c, &gw.run_url(&id)).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(up.hits(&id), 1);
}

#[tokio::test]
async fn the_circuit_opens_fails_fast_then_probes_and_closes() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[upstream]\nretry_attempts = 1\ncircuit_failure_threshold = 3\ncircuit_cooldown = \"500ms\"\n")).await;
    let c = client();
    let bad = new_run();
    up.set(&bad, unavailable());
    for _ in 0..3 {
        assert_eq!(
            get(&c, &gw.run_url(&bad)).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(up.total(), 3);
    // Open: other runs fail fast without reaching the upstream.
    let other = new_run();
    up.set(&other, Reply::run(&other, "\"succeeded\""));
    let got = get(&c, &gw.run_url(&other)).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.json()["code"], "upstream_circuit_open");
    assert!(got.header("retry-after").is_some());
    assert_eq!(up.total(), 3);
    let m = String::from_utf8_lossy(&get(&c, &gw.admin_url("/metrics")).await.body).into_owned();
    assert!(m.contains("dify_gateway_upstream_circuit_open 1"), "{m}");
    // After the cool-down one probe goes through; its success closes the circuit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&c, &gw.run_url(&other)).await.status, StatusCode::OK);
    assert_eq!(up.total(), 4);
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"running\""));
    assert_eq!(get(&c, &gw.run_url(&id)).await.status, StatusCode::OK);
    let m = String::from_utf8_lossy(&get(&c, &gw.admin_url("/metrics")).await.body).into_owned();
    assert!(m.contains("dify_gateway_upstream_circuit_open 0"), "{m}");
}

#[tokio::test]
async fn stale_if_error_serves_the_last_running_answer_then_gives_up() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(
        &up,
        "[cache]\nrunning_ttl = \"100ms\"\nstale_if_error = \"600ms\"\n[upstream]\nretry_attempts = 1\ncircuit_failure_threshold = 0\n",
    ))
    .await;
    let c = client();
    let id = new_run();
    let body = dify_gateway::mock::run_body(&id, "\"running\"", 200);
    up.set(&id, Reply::ok_json(body.clone()));
    assert_eq!(get(&c, &gw.run_url(&id)).await.x_cache(), "MISS");
    up.set(&id, unavailable());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stale = get(&c, &gw.run_url(&id)).await;
    assert_eq!((stale.status, stale.x_cache()), (StatusCode::OK, "STALE"));
    assert_eq!(stale.body, body);
    assert!(stale.header("warning").unwrap().starts_with("111"));
    assert!(stale.header("age").is_some());
    // Each stale answer still tried the upstream (it may have recovered).
    assert_eq!(up.hits(&id), 2);
    // Upstream down entirely: still stale within the grace.
    up.stop();
    assert_eq!(get(&c, &gw.run_url(&id)).await.x_cache(), "STALE");
    // Past the grace: the error.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let gone = get(&c, &gw.run_url(&id)).await;
    assert_eq!(gone.status, StatusCode::BAD_GATEWAY);
    assert_eq!(gone.json()["code"], "upstream_unavailable");
    let m = String::from_utf8_lossy(&get(&c, &gw.admin_url("/metrics")).await.body).into_owned();
    assert!(m.contains("dify_gateway_stale_served_total 2"), "{m}");
    assert!(m.contains("cache=\"stale\""));
}

#[tokio::test]
async fn a_deliberate_upstream_answer_replaces_a_stale_entry() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(
        &up,
        "[cache]\nrunning_ttl = \"100ms\"\nstale_if_error = \"10s\"\n",
    ))
    .await;
    let c = client();
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"running\""));
    get(&c, &gw.run_url(&id)).await;
    up.set(
        &id,
        Reply::dify_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Workflow run not found.",
        ),
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let got = get(&c, &gw.run_url(&id)).await;
    assert_eq!((got.status, got.x_cache()), (StatusCode::NOT_FOUND, "MISS"));
}

fn raw_conn(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_oversized_clients_are_cut_and_others_are_served() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let gw = spawn_gateway(config(
        &up,
        "[server]\nheader_read_timeout = \"500ms\"\nmax_connections = 8\n",
    ))
    .await;
    let addr = gw.addr;
    let results = tokio::task::spawn_blocking(move || {
        // Slowloris: a head trickled a byte at a time never completes in time.
        let mut slow = raw_conn(addr);
        let t = Instant::now();
        let mut cut = false;
        for b in
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                .iter()
        {
            if slow.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut buf = [0u8; 256];
        let n = slow.read(&mut buf).unwrap_or(0);
        let slow_answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        let slow_cut_after = t.elapsed();
        // Idle: connected, sends nothing.
        let mut idle = raw_conn(addr);
        let t = Instant::now();
        let n = idle.read(&mut buf).unwrap_or(0);
        let idle_cut_after = t.elapsed();
        // Oversized head.
        let mut big = raw_conn(addr);
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "b".repeat(64 * 1024)
        );
        let _ = big.write_all(head.as_bytes());
        let mut out = Vec::new();
        let _ = big.read_to_end(&mut out);
        (
            cut,
            slow_answer,
            slow_cut_after,
            n,
            idle_cut_after,
            String::from_utf8_lossy(&out).into_owned(),
        )
    })
    .await
    .unwrap();
    let (cut, slow_answer, slow_after, idle_n, idle_after, big_answer) = results;
    assert!(
        cut || slow_answer.is_empty() || slow_answer.contains("408"),
        "slow client answered: {slow_answer}"
    );
    assert!(slow_after < Duration::from_secs(4), "{slow_after:?}");
    assert!(idle_n == 0 || idle_after < Duration::from_secs(4));
    assert!(
        idle_after < Duration::from_secs(4),
        "idle connection kept {idle_after:?}"
    );
    assert!(
        big_answer.starts_with("HTTP/1.1 431"),
        "{}",
        &big_answer[..big_answer.len().min(60)]
    );
    // Connections are not exhausted: more than max_connections sequential requests work.
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &gw.run_url(RUN)).await.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unique_ids_leaves_hot_runs_served_from_the_cache() {
    let up = spawn_upstream().await;
    let hot = new_run();
    up.set(&hot, Reply::run(&hot, "\"succeeded\""));
    up.set_delay(Duration::from_millis(20));
    let gw = spawn_gateway(config(
        &up,
        "[cache]\nmax_bytes = 2097152\n[upstream]\nmax_concurrent = 4\nqueue_timeout = \"5s\"\n",
    ))
    .await;
    let c = client();
    assert_eq!(get(&c, &gw.run_url(&hot)).await.x_cache(), "MISS");
    let mut flood = Vec::new();
    for _ in 0..8 {
        let gw_url = gw.url("");
        flood.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..40 {
                // Unknown ids: the mock answers 404 (kept briefly) for each.
                let got = get(&c, &format!("{gw_url}/v1/workflows/run/{}", new_run())).await;
                assert!(matches!(
                    got.status,
                    StatusCode::NOT_FOUND | StatusCode::SERVICE_UNAVAILABLE
                ));
            }
        }));
    }
    // Meanwhile the hot run is answered from the cache every time.
    for _ in 0..200 {
        let got = get(&c, &gw.run_url(&hot)).await;
        assert_eq!((got.status, got.x_cache()), (StatusCode::OK, "HIT"));
    }
    for f in flood {
        f.await.unwrap();
    }
    assert_eq!(up.hits(&hot), 1);
    let stats = gw.gateway.cache().stats();
    assert!(stats.weighted_bytes <= 2_097_152, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_and_waiting_connections_are_served_later() {
    let up = spawn_upstream().await;
    up.set_delay(Duration::from_millis(400));
    let gw = spawn_gateway(config(&up, "[server]\nmax_connections = 2\n")).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let id = new_run();
        up.set(&id, Reply::run(&id, "\"succeeded\""));
        // One client each: three separate connections.
        let url = gw.run_url(&id);
        tasks.push(tokio::spawn(async move { get(&client(), &url).await }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.total() < 2 {
        assert!(
            Instant::now() < deadline,
            "the first two never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The third connection waits for a slot: its request has not reached the upstream.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        up.total(),
        2,
        "a third connection was served beyond max_connections"
    );
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(up.total(), 3);
}

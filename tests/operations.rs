//! The operational side: metrics move as requests happen, request ids, purge, stats, readiness
//! and the admin token.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use dify_gateway::mock::Reply;
use http::{Method, StatusCode};

/// Parses the Prometheus text format into `series -> value`, failing on any malformed line.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name:?}"
        );
        assert!(name.starts_with("dify_gateway_"), "{name}");
        out.insert(series.to_owned(), value);
    }
    assert!(text.ends_with("# EOF\n"));
    out
}

async fn scrape(c: &TestClient, gw: &TestGateway) -> HashMap<String, f64> {
    let got = get(c, &gw.admin_url("/metrics")).await;
    assert_eq!(got.status, StatusCode::OK);
    parse_metrics(std::str::from_utf8(&got.body).unwrap())
}

fn val(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_move_for_hit_miss_coalesced_reject_and_upstream_error() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let before = scrape(&c, &gw).await;

    let id = new_run();
    up.set(&id, Reply::run(&id, "\"succeeded\""));
    get(&c, &gw.run_url(&id)).await; // miss
    get(&c, &gw.run_url(&id)).await; // hit
    get(&c, &gw.run_url("nope")).await; // rejected
    let bad = new_run();
    up.set(
        &bad,
        Reply::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"message\": \"Internal Server Error\", \"code\": \"unknown\", \"status\": 500}",
        ),
    );
    get(&c, &gw.run_url(&bad)).await; // upstream error

    // Coalesced burst: 20 concurrent requests on a slow upstream.
    let burst = new_run();
    up.set(&burst, Reply::run(&burst, "\"succeeded\""));
    up.set_delay(Duration::from_millis(200));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, u) = (c.clone(), gw.run_url(&burst));
        tasks.push(tokio::spawn(async move {
            get(&c, &u).await.x_cache().to_owned()
        }));
    }
    let mut coalesced = 0.0;
    for t in tasks {
        if t.await.unwrap() == "COALESCED" {
            coalesced += 1.0;
        }
    }
    up.set_delay(Duration::ZERO);

    let after = scrape(&c, &gw).await;
    let d = |s: &str| val(&after, s) - val(&before, s);
    let req = |class: &str, cache: &str| {
        format!("dify_gateway_requests_total{{route=\"run_detail\",status_class=\"{class}\",cache=\"{cache}\",client=\"none\"}}")
    };
    assert_eq!(d(&req("2xx", "miss")), 2.0);
    assert_eq!(d(&req("2xx", "hit")), 1.0 + (19.0 - coalesced));
    assert!(coalesced >= 15.0, "{coalesced}");
    assert_eq!(d(&req("2xx", "coalesced")), coalesced);
    assert_eq!(d(&req("5xx", "miss")), 1.0);
    assert_eq!(d("dify_gateway_coalesced_waiters_total"), coalesced);
    assert_eq!(d("dify_gateway_upstream_requests_saved_total"), 20.0);
    assert_eq!(d("dify_gateway_rejected_total{reason=\"bad_id\"}"), 1.0);
    assert_eq!(
        d("dify_gateway_upstream_requests_total{outcome=\"ok\"}"),
        2.0
    );
    assert_eq!(
        d("dify_gateway_upstream_requests_total{outcome=\"server_error\"}"),
        1.0
    );
    assert_eq!(d("dify_gateway_upstream_duration_seconds_count"), 3.0);
    assert_eq!(
        d("dify_gateway_request_duration_seconds_count{cache=\"miss\"}"),
        3.0
    );
    assert_eq!(
        val(&after, "dify_gateway_cache_entries{class=\"terminal\"}"),
        2.0
    );
    assert!(val(&after, "dify_gateway_cache_bytes{class=\"terminal\"}") > 1000.0);
    // No run id ever appears in the exposition.
    let text = get(&c, &gw.admin_url("/metrics")).await;
    assert!(!String::from_utf8_lossy(&text.body).contains(&id));
}

#[tokio::test]
async fn request_ids_are_returned_generated_and_forwarded() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"running\""));
    let got = request(
        &c,
        Method::GET,
        &gw.run_url(&id),
        &[("x-request-id", "trace-abc.123")],
    )
    .await;
    assert_eq!(got.header("x-request-id"), Some("trace-abc.123"));
    assert_eq!(up.last_headers().unwrap()["x-request-id"], "trace-abc.123");
    let got = request(
        &c,
        Method::GET,
        &gw.url("/nope"),
        &[("x-request-id", "bad id with spaces")],
    )
    .await;
    let generated = got.header("x-request-id").unwrap();
    assert_eq!(generated.len(), 36);
    assert!(uuid::Uuid::parse_str(generated).is_ok());
    let a = get(&c, &gw.url("/healthz")).await;
    let b = get(&c, &gw.url("/healthz")).await;
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));
}

#[tokio::test]
async fn purge_makes_the_next_request_a_miss_and_stats_report_the_cache() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let (a, b) = (new_run(), new_run());
    for id in [&a, &b] {
        up.set(id, Reply::run(id, "\"succeeded\""));
        get(&c, &gw.run_url(id)).await;
        assert_eq!(get(&c, &gw.run_url(id)).await.x_cache(), "HIT");
    }
    let stats = get(&c, &gw.admin_url("/admin/cache/stats")).await.json();
    assert_eq!(stats["entries"], 2);
    assert_eq!(stats["terminal"]["entries"], 2);
    assert!(stats["weighted_bytes"].as_u64().unwrap() > 0);

    let purged = request(
        &c,
        Method::DELETE,
        &gw.admin_url(&format!("/admin/cache/runs/{}", a.to_uppercase())),
        &[],
    )
    .await;
    assert_eq!(purged.status, StatusCode::OK);
    assert_eq!(purged.json()["purged"], 1);
    assert_eq!(get(&c, &gw.run_url(&a)).await.x_cache(), "MISS");
    assert_eq!(get(&c, &gw.run_url(&b)).await.x_cache(), "HIT");

    let unknown_app = request(
        &c,
        Method::DELETE,
        &gw.admin_url(&format!("/admin/cache/runs/{a}?app=nope")),
        &[],
    )
    .await;
    assert_eq!(unknown_app.status, StatusCode::NOT_FOUND);
    let bad = request(
        &c,
        Method::DELETE,
        &gw.admin_url("/admin/cache/runs/xyz"),
        &[],
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let all = request(&c, Method::DELETE, &gw.admin_url("/admin/cache"), &[]).await;
    assert_eq!(all.json()["purged"], 2);
    assert_eq!(get(&c, &gw.run_url(&b)).await.x_cache(), "MISS");
    assert_eq!(up.hits(&b), 2);
    let wrong = request(&c, Method::POST, &gw.admin_url("/admin/cache"), &[]).await;
    assert_eq!(
        (wrong.status, wrong.header("allow")),
        (StatusCode::METHOD_NOT_ALLOWED, Some("DELETE"))
    );
    // Admin routes are not on the public listener.
    assert_eq!(
        get(&c, &gw.url("/metrics")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        request(&c, Method::DELETE, &gw.url("/admin/cache"), &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn admin_token_guards_everything_but_probes() {
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "admin-token-0123456789\n").unwrap();
    let gw = spawn_gateway(config(
        &up,
        &format!("[admin]\ntoken_file = \"{}\"\n", token_file.display()),
    ))
    .await;
    let c = client();
    for (m, p) in [
        (Method::GET, "/metrics"),
        (Method::GET, "/admin/cache/stats"),
        (Method::DELETE, "/admin/cache"),
    ] {
        let got = request(&c, m.clone(), &gw.admin_url(p), &[]).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{p}");
        assert!(got.header("www-authenticate").is_some());
        assert_eq!(got.json()["code"], "unauthorized");
        let wrong = request(
            &c,
            m.clone(),
            &gw.admin_url(p),
            &[("authorization", "Bearer admin-token-012345678X")],
        )
        .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{p}");
        let ok = request(
            &c,
            m,
            &gw.admin_url(p),
            &[("authorization", "Bearer admin-token-0123456789")],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "{p}");
    }
    assert_eq!(
        get(&c, &gw.admin_url("/healthz")).await.status,
        StatusCode::OK
    );
    assert_ne!(
        get(&c, &gw.admin_url("/readyz")).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn readiness_reflects_probes_and_key_health() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let c = client();
    let before = get(&c, &gw.admin_url("/readyz")).await;
    assert_eq!(before.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(before.json()["apps"][0]["key"], "unknown");

    gw.gateway.readiness().probe_all(gw.gateway.metrics()).await;
    let ready = get(&c, &gw.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    let v = ready.json();
    assert_eq!(v["ready"], true);
    assert_eq!(v["apps"][0]["app"], "default");
    assert_eq!(v["apps"][0]["key"], "ok");
    assert_eq!(
        up.last_headers().unwrap()["authorization"],
        format!("Bearer {KEY}").as_str()
    );

    // A gateway whose key the upstream rejects reports it.
    let other = dify_gateway::mock::MockDify::start("app-a-different-key")
        .await
        .unwrap();
    let gw2 = spawn_gateway(config(&other, "")).await;
    gw2.gateway
        .readiness()
        .probe_all(gw2.gateway.metrics())
        .await;
    let v = get(&c, &gw2.admin_url("/readyz")).await.json();
    assert_eq!(v["apps"][0]["key"], "rejected");
    assert_eq!(v["apps"][0]["upstream_status"], 401);
    let m = scrape(&c, &gw2).await;
    assert_eq!(
        val(&m, "dify_gateway_app_key_healthy{app=\"default\"}"),
        0.0
    );

    // Upstream down: not ready once the last good probe is forgotten.
    up.stop();
    gw.gateway.readiness().probe_all(gw.gateway.metrics()).await;
    let v = get(&c, &gw.admin_url("/readyz")).await.json();
    assert_eq!(v["apps"][0]["key"], "unreachable");
}

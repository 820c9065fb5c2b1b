//! Usage metering through the front door and the admin side: a finished run is counted once,
//! to its starter or else its first reader, on one replica or across replicas sharing Redis,
//! and survives a restart with Redis; `/admin/usage` (JSON, CSV), `/admin/status` and the
//! status page, and the admin token in front of them.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use common::*;
use dify_gateway::cache::AppId;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::mock::{MockDify, Reply};
use dify_gateway::ownership::Kind;
use dify_gateway::usage::{day_of, Counted};
use http::{Method, StatusCode};
use redis_server::RedisServer;

struct Team {
    token: String,
    entry: String,
}

fn team(name: &str, extra: &str) -> Team {
    let token = generate_token().unwrap();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n{extra}",
        token_sha256_hex(&token)
    );
    Team { token, entry }
}

async fn read(gw: &TestGateway, t: &Team, run: &str) -> Got {
    let auth = format!("Bearer {}", t.token);
    request(
        &client(),
        Method::GET,
        &gw.run_url(run),
        &[("authorization", &auth)],
    )
    .await
}

/// A run the mock knows, finished with `status` (1234 tokens, 4 steps, 1.234567 s).
fn finished_run(up: &MockDify, status: &str) -> String {
    let id = new_run();
    up.set(&id, Reply::run(&id, &format!("\"{status}\"")));
    id
}

fn today() -> String {
    day_of(std::time::SystemTime::now())
}

/// `/admin/usage` once something is counted (a run is counted just after its first answer).
async fn usage_json(gw: &TestGateway) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = get(&client(), &gw.admin_url("/admin/usage")).await;
        assert_eq!(got.status, StatusCode::OK);
        let v = got.json();
        if v.as_array().is_some_and(|a| !a.is_empty()) || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits (at most 10 s) until `team`'s quota is spent on `gw`.
async fn until_over_quota(gw: &TestGateway, team: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while gw
        .gateway
        .usage()
        .check_quota(team, "default")
        .await
        .is_ok()
    {
        assert!(tokio::time::Instant::now() < deadline, "quota never spent");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_run_read_by_many_clients_is_counted_once_to_its_first_reader() {
    let up = spawn_upstream().await;
    let (a, b, c) = (team("team-a", ""), team("team-b", ""), team("team-c", ""));
    let gw = spawn_gateway(config(&up, &format!("{}{}{}", a.entry, b.entry, c.entry))).await;
    let run = finished_run(&up, "succeeded");
    for t in [&a, &b, &c, &a, &b] {
        assert_eq!(read(&gw, t, &run).await.status, StatusCode::OK);
    }
    // A running run is not counted, until it has finished.
    let running = new_run();
    up.set(&running, Reply::run(&running, "\"running\""));
    read(&gw, &b, &running).await;
    assert_eq!(
        usage_json(&gw).await,
        serde_json::json!([{
            "day": today(), "client": "team-a", "app": "default",
            "runs": {"succeeded": 1}, "tokens": 1234, "steps": 4, "run_seconds": 1.234567
        }])
    );
    let text = gw.gateway.metrics_text();
    assert!(text.contains("dify_gateway_usage_runs_total{client=\"team-a\",app=\"default\",status=\"succeeded\"} 1"), "{text}");
    assert!(
        text.contains("dify_gateway_usage_tokens_total{client=\"team-a\",app=\"default\"} 1234")
    );
    assert!(!text.contains("usage_runs_total{client=\"team-b\""));
}

#[tokio::test]
async fn a_run_started_through_the_gateway_is_counted_to_its_starter() {
    let up = spawn_upstream().await;
    let (a, b) = (team("team-a", ""), team("team-b", ""));
    let toml = format!(
        "[[apps]]\nname = \"default\"\napi_key_env = \"KEY\"\nbase_url = \"{}\"\nisolate_clients = false\n\n{}{}",
        up.base_url(),
        a.entry,
        b.entry
    );
    let gw = spawn_gateway(config_with_env(&toml, &[("KEY", KEY)])).await;
    let run = finished_run(&up, "failed");
    gw.gateway
        .ownership()
        .record(AppId(0), Kind::Run, run.parse().unwrap(), Some("team-a"))
        .await;
    // Team b reads it first; team a started it.
    assert_eq!(read(&gw, &b, &run).await.status, StatusCode::OK);
    let rows = usage_json(&gw).await;
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["client"], "team-a");
    assert_eq!(rows[0]["runs"], serde_json::json!({"failed": 1}));
}

#[tokio::test]
async fn an_open_gateway_counts_runs_to_the_open_client() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let run = finished_run(&up, "stopped");
    for _ in 0..3 {
        assert_eq!(
            get(&client(), &gw.run_url(&run)).await.status,
            StatusCode::OK
        );
    }
    let rows = usage_json(&gw).await;
    assert_eq!(rows[0]["client"], "-");
    assert_eq!(rows[0]["runs"], serde_json::json!({"stopped": 1}));
}

#[tokio::test]
async fn admin_usage_answers_json_and_csv_and_refuses_bad_dates() {
    let up = spawn_upstream().await;
    let (a, b) = (team("team-a", ""), team("team-b", ""));
    let gw = spawn_gateway(config(&up, &format!("{}{}", a.entry, b.entry))).await;
    for (t, status) in [(&a, "succeeded"), (&a, "failed"), (&b, "partial-succeeded")] {
        let run = finished_run(&up, status);
        assert_eq!(read(&gw, t, &run).await.status, StatusCode::OK);
    }
    let day = today();
    let c = client();
    let got = get(
        &c,
        &gw.admin_url(&format!("/admin/usage?from={day}&to={day}&format=csv")),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-type"), Some("text/csv; charset=utf-8"));
    let csv = std::str::from_utf8(&got.body).unwrap();
    assert_eq!(
        csv,
        format!(
            "day,client,app,runs,runs_succeeded,runs_failed,runs_stopped,runs_partial_succeeded,runs_other,tokens,steps,run_seconds\n\
             {day},team-a,default,2,1,1,0,0,0,2468,8,2.469\n\
             {day},team-b,default,1,0,0,0,1,0,1234,4,1.235\n"
        )
    );
    let json = get(&c, &gw.admin_url(&format!("/admin/usage?from={day}"))).await;
    assert_eq!(json.header("content-type"), Some("application/json"));
    let rows = json.json();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[1]["runs"], serde_json::json!({"partial-succeeded": 1}));
    // Days without runs have no rows.
    let empty = get(
        &c,
        &gw.admin_url("/admin/usage?from=2020-01-01&to=2020-01-31"),
    )
    .await;
    assert_eq!(empty.json(), serde_json::json!([]));
    for bad in [
        "/admin/usage?from=2026-13-01",
        "/admin/usage?from=yesterday",
        "/admin/usage?from=2026-03-02&to=2026-03-01",
        "/admin/usage?from=2020-01-01&to=2026-01-01",
        "/admin/usage?format=xml",
    ] {
        let got = get(&c, &gw.admin_url(bad)).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(got.json()["code"], "invalid_param", "{bad}");
        assert_eq!(got.json()["status"], 400);
    }
}

#[tokio::test]
async fn status_reports_traffic_usage_against_quotas_and_health() {
    let up = spawn_upstream().await;
    let a = team(
        "team-a",
        "quota_runs_per_day = 10\nquota_tokens_per_day = 100000\nmax_open_streams = 2\n",
    );
    let b = team("team-b", "");
    let gw = spawn_gateway(config(&up, &format!("{}{}", a.entry, b.entry))).await;
    let run = finished_run(&up, "succeeded");
    for _ in 0..3 {
        read(&gw, &a, &run).await;
    }
    let c = client();
    let page = get(&c, &gw.admin_url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = std::str::from_utf8(&page.body).unwrap();
    assert!(html.contains("/admin/status") && html.contains("sessionStorage"));
    // Self-contained: nothing loaded from elsewhere.
    assert!(!html.contains("src=") && !html.contains("href=") && !html.contains("@import"));

    let s = get(&c, &gw.admin_url("/admin/status")).await.json();
    assert_eq!(s["requests_total"], 3);
    assert_eq!(s["cache_answers_total"], 3);
    assert_eq!(s["cache_hits_total"], 2);
    assert_eq!(s["upstream_requests_saved_total"], 2);
    assert_eq!(s["fetches_in_flight"], 0);
    assert_eq!(
        s["breakers"],
        serde_json::json!([{"app": "default", "state": "closed"}])
    );
    assert_eq!(
        s["shared_tier"],
        serde_json::json!({"configured": false, "subscribed": false, "errors": 0})
    );
    assert_eq!(
        s["clients"],
        serde_json::json!([
            {"client": "team-a", "app": "default", "runs_today": 1, "tokens_today": 1234,
             "quota_runs_per_day": 10, "quota_tokens_per_day": 100000, "open_streams": 0},
            {"client": "team-b", "app": "default", "runs_today": 0, "tokens_today": 0,
             "quota_runs_per_day": null, "quota_tokens_per_day": null},
        ])
    );
    assert!(s.get("usage_error").is_none());
}

#[tokio::test]
async fn the_admin_token_guards_status_and_usage_but_not_the_page() {
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
    for p in ["/admin/status", "/admin/usage", "/admin/usage?format=csv"] {
        let got = get(&c, &gw.admin_url(p)).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{p}");
        assert_eq!(got.json()["code"], "unauthorized");
        let ok = request(
            &c,
            Method::GET,
            &gw.admin_url(p),
            &[("authorization", "Bearer admin-token-0123456789")],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "{p}");
    }
    assert_eq!(get(&c, &gw.admin_url("/")).await.status, StatusCode::OK);
    let post = request(
        &c,
        Method::POST,
        &gw.admin_url("/admin/usage"),
        &[("authorization", "Bearer admin-token-0123456789")],
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

fn shared(redis: &RedisServer, teams: &[&Team]) -> String {
    let mut toml: String = teams.iter().map(|t| t.entry.as_str()).collect();
    toml.push_str(&format!(
        "[shared]\nurls = [\"{}\"]\ntimeout = \"2s\"\n",
        redis.url()
    ));
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_redis_count_each_run_once() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let (a, b, c) = (team("team-a", ""), team("team-b", ""), team("team-c", ""));
    let toml = shared(&redis, &[&a, &b, &c]);
    let replicas = [
        spawn_gateway(config(&up, &toml)).await,
        spawn_gateway(config(&up, &toml)).await,
        spawn_gateway(config(&up, &toml)).await,
    ];
    let runs: Vec<String> = (0..4).map(|_| finished_run(&up, "succeeded")).collect();
    for run in &runs {
        for (gw, t) in replicas.iter().zip([&a, &b, &c]) {
            assert_eq!(read(gw, t, run).await.status, StatusCode::OK);
        }
    }
    // Each replica reports the fleet's figures.
    for gw in &replicas {
        let rows = usage_json(gw).await;
        assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
        assert_eq!(rows[0]["client"], "team-a");
        assert_eq!(rows[0]["runs"], serde_json::json!({"succeeded": 4}));
        assert_eq!(rows[0]["tokens"], 4 * 1234);
    }
    // The same finished run reported on every replica at once (a blocking answer here, an
    // event there, a read elsewhere) is counted by exactly one of them.
    let run = new_run();
    let reports = futures_util::future::join_all(replicas.iter().map(|gw| {
        gw.gateway
            .usage()
            .finished("default", "team-b", &run, "succeeded", 10, 1, 0.5)
    }))
    .await;
    assert_eq!(
        reports.iter().filter(|c| **c == Counted::Counted).count(),
        1,
        "{reports:?}"
    );
    assert_eq!(
        reports.iter().filter(|c| **c == Counted::Duplicate).count(),
        2
    );
    let counted: usize = replicas
        .iter()
        .filter(|gw| {
            gw.gateway
                .metrics_text()
                .contains("usage_runs_total{client=\"team-b\"")
        })
        .count();
    assert_eq!(counted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_restart_with_redis_and_quotas_are_fleet_wide() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let a = team("team-a", "quota_runs_per_day = 2\n");
    let toml = shared(&redis, &[&a]);
    let first = spawn_gateway(config(&up, &toml)).await;
    let runs: Vec<String> = (0..2).map(|_| finished_run(&up, "succeeded")).collect();
    for run in &runs {
        assert_eq!(read(&first, &a, run).await.status, StatusCode::OK);
    }
    until_over_quota(&first, "team-a").await;
    // Over its quota, the client still reads its runs, old and new.
    assert_eq!(read(&first, &a, &runs[0]).await.status, StatusCode::OK);
    let fresh = finished_run(&up, "succeeded");
    assert_eq!(read(&first, &a, &fresh).await.status, StatusCode::OK);
    first.shutdown().await;

    let second = spawn_gateway(config(&up, &toml)).await;
    let rows = usage_json(&second).await;
    assert_eq!(rows[0]["runs"], serde_json::json!({"succeeded": 3}));
    assert_eq!(rows[0]["tokens"], 3 * 1234);
    // A run counted before the restart is not counted again after it.
    let again = second
        .gateway
        .usage()
        .finished("default", "team-a", &runs[1], "succeeded", 1234, 4, 1.2)
        .await;
    assert_eq!(again, Counted::Duplicate);
    // The quota counts what the fleet (here: before the restart) ran today.
    let wait = second
        .gateway
        .usage()
        .check_quota("team-a", "default")
        .await
        .unwrap_err();
    assert!(wait.as_secs() >= 1 && wait.as_secs() <= 86_400);
    let s = get(&client(), &second.admin_url("/admin/status"))
        .await
        .json();
    assert_eq!(s["clients"][0]["runs_today"], 3);
    assert_eq!(s["clients"][0]["quota_runs_per_day"], 2);
    assert_eq!(
        s["shared_tier"]["configured"],
        serde_json::Value::Bool(true)
    );
}

#[tokio::test]
async fn a_run_that_ends_while_its_first_reader_long_polls_is_counted_to_that_reader() {
    let up = spawn_upstream().await;
    let a = team("team-a", "");
    let gw = spawn_gateway(config(
        &up,
        &format!("[cache]\nrunning_ttl = \"100ms\"\n{}", a.entry),
    ))
    .await;
    let run = new_run();
    up.set_sequence(
        &run,
        vec![
            Reply::run(&run, "\"running\""),
            Reply::run(&run, "\"running\""),
            Reply::run(&run, "\"succeeded\""),
        ],
    );
    // The first read is the long-poll itself: the run ends while the watcher refreshes it.
    let auth = format!("Bearer {}", a.token);
    let got = request(
        &client(),
        Method::GET,
        &gw.run_url(&run),
        &[("authorization", &auth), ("prefer", "wait=10")],
    )
    .await;
    assert_eq!(got.json()["status"], "succeeded");
    let usage = usage_json(&gw).await;
    assert_eq!(usage[0]["client"], "team-a", "{usage}");
    assert_eq!(usage[0]["runs"]["succeeded"], 1);
}

//! Ownership through the front door: a run recorded for one client reads as Dify's unknown run
//! to the app's other clients, answered locally (no upstream request, no cached answer leaked),
//! on every replica sharing a Redis; unrecorded runs stay readable by all.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use common::*;
use dify_gateway::cache::AppId;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::mock::{MockDify, Reply};
use dify_gateway::ownership::{Access, Kind, Recorded};
use http::{Method, StatusCode};
use redis_server::RedisServer;

struct Team {
    name: &'static str,
    token: String,
    entry: String,
}

fn team(name: &'static str) -> Team {
    let token = generate_token().unwrap();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n",
        token_sha256_hex(&token)
    );
    Team { name, token, entry }
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

/// A succeeded run the mock knows.
fn known_run(up: &MockDify) -> String {
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"succeeded\""));
    id
}

fn uuid(id: &str) -> uuid::Uuid {
    id.parse().unwrap()
}

fn assert_difys_unknown_run(got: &Got) {
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(
        got.json(),
        serde_json::json!({"code": "not_found", "message": "Workflow run not found.", "status": 404})
    );
    assert_eq!(got.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn another_client_gets_difys_404_for_a_recorded_run_and_costs_nothing() {
    let up = spawn_upstream().await;
    let (a, b) = (team("team-a"), team("team-b"));
    let gw = spawn_gateway(config(&up, &format!("{}{}", a.entry, b.entry))).await;
    let owned = known_run(&up);
    let free = known_run(&up);
    let recorded = gw
        .gateway
        .ownership()
        .record(AppId(0), Kind::Run, uuid(&owned), Some(a.name))
        .await;
    assert_eq!(recorded, Recorded::Local);

    let got = read(&gw, &a, &owned).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["status"], "succeeded");
    assert_eq!(up.total(), 1);
    // The answer is cached now; the foreign client must still not see it, nor cost a fetch.
    for _ in 0..3 {
        let got = read(&gw, &b, &owned).await;
        assert_difys_unknown_run(&got);
        assert_eq!(got.x_cache(), "MISS");
    }
    assert_eq!(up.total(), 1);
    assert_eq!(read(&gw, &a, &owned).await.x_cache(), "HIT");
    // Upper case names the same run.
    assert_difys_unknown_run(&read(&gw, &b, &owned.to_uppercase()).await);

    // A run nobody recorded is readable by every client of the app.
    for t in [&a, &b] {
        let got = read(&gw, t, &free).await;
        assert_eq!(got.status, StatusCode::OK, "{}", t.name);
        assert_eq!(got.json()["id"], free.as_str());
    }
    assert!(gw.gateway.metrics_text().contains("reason=\"not_owner\""));
}

#[tokio::test]
async fn with_isolation_off_every_client_reads_a_recorded_run() {
    let up = spawn_upstream().await;
    let (a, b) = (team("team-a"), team("team-b"));
    let toml = format!(
        "[[apps]]\nname = \"default\"\napi_key_env = \"KEY\"\nbase_url = \"{}\"\nisolate_clients = false\n\n{}{}",
        up.base_url(),
        a.entry,
        b.entry
    );
    let gw = spawn_gateway(config_with_env(&toml, &[("KEY", KEY)])).await;
    let owned = known_run(&up);
    gw.gateway
        .ownership()
        .record(AppId(0), Kind::Run, uuid(&owned), Some(a.name))
        .await;
    for t in [&a, &b] {
        let got = read(&gw, t, &owned).await;
        assert_eq!(got.status, StatusCode::OK, "{}", t.name);
        assert_eq!(got.json()["status"], "succeeded");
    }
}

#[tokio::test]
async fn a_reload_turns_isolation_off_and_on() {
    let up = spawn_upstream().await;
    let (a, b) = (team("team-a"), team("team-b"));
    let clients = format!("{}{}", a.entry, b.entry);
    let app = |isolate: bool| {
        format!(
            "[[apps]]\nname = \"default\"\napi_key_env = \"KEY\"\nbase_url = \"{}\"\nisolate_clients = {isolate}\n\n{clients}",
            up.base_url()
        )
    };
    let gw = spawn_gateway(config_with_env(&app(true), &[("KEY", KEY)])).await;
    let owned = known_run(&up);
    gw.gateway
        .ownership()
        .record(AppId(0), Kind::Run, uuid(&owned), Some(a.name))
        .await;
    assert_difys_unknown_run(&read(&gw, &b, &owned).await);
    gw.gateway
        .reload(Ok(config_with_env(&app(false), &[("KEY", KEY)])), None)
        .unwrap();
    assert_eq!(read(&gw, &b, &owned).await.status, StatusCode::OK);
    gw.gateway
        .reload(Ok(config_with_env(&app(true), &[("KEY", KEY)])), None)
        .unwrap();
    assert_difys_unknown_run(&read(&gw, &b, &owned).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_recorded_on_one_replica_is_refused_on_another() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let (a, b) = (team("team-a"), team("team-b"));
    let toml = format!(
        "{}{}[shared]\nurls = [\"{}\"]\ntimeout = \"2s\"\n",
        a.entry,
        b.entry,
        redis.url()
    );
    let one = spawn_gateway(config(&up, &toml)).await;
    let two = spawn_gateway(config(&up, &toml)).await;
    let owned = known_run(&up);
    let recorded = one
        .gateway
        .ownership()
        .record_run(
            AppId(0),
            uuid(&owned),
            Some(uuid::Uuid::new_v4()),
            Some(a.name),
        )
        .await;
    assert_eq!(recorded, Recorded::Shared);
    assert_eq!(two.gateway.ownership().held(), 0);

    assert_difys_unknown_run(&read(&two, &b, &owned).await);
    assert_eq!(up.total(), 0);
    let got = read(&two, &a, &owned).await;
    assert_eq!(got.status, StatusCode::OK);
    // Replica two now holds the record itself.
    assert_eq!(two.gateway.ownership().held(), 1);
    // A run recorded nowhere is readable on both.
    let free = known_run(&up);
    for gw in [&one, &two] {
        assert_eq!(read(gw, &b, &free).await.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_remembers_the_shared_tiers_no_record_for_unknown_ttl() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let (a, b) = (team("team-a"), team("team-b"));
    let shared = format!(
        "{}{}[shared]\nurls = [\"{}\"]\ntimeout = \"2s\"\n",
        a.entry,
        b.entry,
        redis.url()
    );
    let fleet = |ownership: &str| config(&up, &format!("{}{ownership}", shared));
    let ask = |gw: &TestGateway, id: uuid::Uuid| {
        let o = std::sync::Arc::clone(gw.gateway.ownership());
        async move { o.check(AppId(0), Kind::Run, id, Some(b.name)).await }
    };
    let writer = spawn_gateway(fleet("")).await;
    let remembers = spawn_gateway(fleet("")).await;
    let asks_each_time = spawn_gateway(fleet("[ownership]\nunknown_ttl = \"0s\"\n")).await;
    let id = uuid::Uuid::new_v4();
    for gw in [&remembers, &asks_each_time] {
        assert_eq!(ask(gw, id).await, Access::Unknown);
    }
    // Written late (a handler must never do this; it bounds the harm if one does).
    writer
        .gateway
        .ownership()
        .record(AppId(0), Kind::Run, id, Some(a.name))
        .await;
    assert_eq!(ask(&remembers, id).await, Access::Unknown);
    assert_eq!(ask(&asks_each_time, id).await, Access::Foreign);
    // A record made on the replica itself replaces what it remembered.
    remembers
        .gateway
        .ownership()
        .record(AppId(0), Kind::Run, id, Some(a.name))
        .await;
    assert_eq!(ask(&remembers, id).await, Access::Foreign);
}

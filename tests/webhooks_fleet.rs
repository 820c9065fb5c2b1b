//! Webhooks across gateways sharing a real Redis: each run announced once by the fleet, a
//! delivery pending and a run followed when a gateway stops taken up by the next one, and the
//! queue's bound held fleet-wide.

mod common;
#[path = "common/webhooks.rs"]
mod hooks;
#[path = "common/redis.rs"]
mod redis_server;

use std::time::Duration;

use common::*;
use dify_gateway::mock::Reply;
use hooks::*;
use http::StatusCode;
use redis_server::RedisServer;

fn fleet_toml(redis: &RedisServer, entry: &str, webhooks: &str) -> String {
    format!(
        "[shared]\nurls = [\"{}\"]\ntimeout = \"500ms\"\n[cache]\nrunning_ttl = \"100ms\"\n{webhooks}{entry}",
        redis.url()
    )
}

#[tokio::test]
async fn two_replicas_announce_each_run_once() {
    let redis = RedisServer::start();
    let (hook, addr) = Receiver::start(vec![]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    let webhooks = "[webhooks]\nretry_base_delay = \"50ms\"\ntimeout = \"300ms\"\n";
    let toml = fleet_toml(&redis, &entry, webhooks);
    let a = spawn_gateway(config_with_secret(&up, &toml)).await;
    let b = spawn_gateway(config_with_secret(&up, &toml)).await;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let got = start(&a, &auth, "blocking").await;
        runs.push(got.json()["workflow_run_id"].as_str().unwrap().to_owned());
    }
    // Both replicas see every run end: A followed them, B is asked for them too.
    for run in &runs {
        detail(&b, &auth, run).await;
    }
    hook.until_delivered(5).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let all = hook.all();
    assert_eq!(all.len(), 5, "{all:?}");
    let mut got: Vec<String> = all.iter().map(Delivery::run).collect();
    got.sort();
    runs.sort();
    assert_eq!(got, runs);
}

#[tokio::test]
async fn a_delivery_pending_at_a_restart_is_made_by_the_next_gateway() {
    let redis = RedisServer::start();
    let (hook, addr) = Receiver::start(vec![Then::Answer(503)]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    // The retry waits long enough for the gateway to be gone by then.
    let webhooks =
        "[webhooks]\nretry_base_delay = \"1500ms\"\nmax_delay = \"1500ms\"\ntimeout = \"300ms\"\n";
    let toml = fleet_toml(&redis, &entry, webhooks);
    let first = spawn_gateway(config_with_secret(&up, &toml)).await;
    let got = start(&first, &auth, "blocking").await;
    assert_eq!(got.status, StatusCode::OK);
    eventually("the first attempt", || !hook.all().is_empty()).await;
    first.shutdown().await;
    assert!(hook.delivered().is_empty());
    let _next = spawn_gateway(config_with_secret(&up, &toml)).await;
    let delivered = hook.until_delivered(1).await;
    assert!(delivered[0].signed_by(SECRET));
    assert_eq!(hook.all().len(), 2);
    assert_eq!(hook.all()[0].delivery, delivered[0].delivery);
}

#[tokio::test]
async fn a_delivery_cut_by_shutdown_is_made_by_the_next_gateway_at_once() {
    let redis = RedisServer::start();
    // The first attempt is never answered; the gateway stops while it waits.
    let (hook, addr) = Receiver::start(vec![Then::Hang]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    // Far longer than the test: only the handing back at shutdown lets the next gateway in.
    let webhooks = "[webhooks]\ntimeout = \"60s\"\n";
    let toml = fleet_toml(&redis, &entry, webhooks);
    let first = spawn_gateway(config_with_secret(&up, &toml)).await;
    let run = start(&first, &auth, "blocking").await.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the first attempt", || !hook.all().is_empty()).await;
    first.shutdown().await;
    let _next = spawn_gateway(config_with_secret(&up, &toml)).await;
    let delivered = hook.until_delivered(1).await;
    assert_eq!(delivered[0].run(), run);
    assert_eq!(hook.all()[0].delivery, delivered[0].delivery);
}

#[tokio::test]
async fn a_run_followed_when_its_gateway_stops_is_announced_by_the_next() {
    let redis = RedisServer::start();
    let (hook, addr) = Receiver::start(vec![]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    let toml = fleet_toml(&redis, &entry, "[webhooks]\ntimeout = \"300ms\"\n");
    let run = new_run();
    up.set(&run, Reply::run(&run, "\"running\""));
    let first = spawn_gateway(config_with_secret(&up, &toml)).await;
    let s = subscribe(&first, &auth, &run).await;
    assert_eq!(s.status, StatusCode::ACCEPTED);
    assert_eq!(s.json()["subscription"], "watching");
    // The first gateway follows the run (one look per running_ttl) until it stops.
    let hits = up.hits(&run);
    eventually("the run followed", || up.hits(&run) >= hits + 2).await;
    first.shutdown().await;
    up.set(&run, Reply::run(&run, "\"succeeded\""));
    assert!(hook.all().is_empty());
    let next = spawn_gateway(config_with_secret(&up, &toml)).await;
    let delivered = hook.until_delivered(1).await;
    assert_eq!(delivered[0].run(), run);
    assert_eq!(delivered[0].body, detail(&next, &auth, &run).await);
    assert!(delivered[0].signed_by(SECRET));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.all().len(), 1);
}

#[tokio::test]
async fn the_queue_is_bounded_fleet_wide() {
    let redis = RedisServer::start();
    // The first delivery is never answered, so it stays queued.
    let (hook, addr) = Receiver::start(vec![Then::Hang]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    let webhooks = "[webhooks]\ntimeout = \"60s\"\nmax_pending = 1\n";
    let toml = fleet_toml(&redis, &entry, webhooks);
    let a = spawn_gateway(config_with_secret(&up, &toml)).await;
    let b = spawn_gateway(config_with_secret(&up, &toml)).await;
    let (one, two) = (new_run(), new_run());
    up.set(&one, Reply::run(&one, "\"succeeded\""));
    up.set(&two, Reply::run(&two, "\"failed\""));
    let s = subscribe(&a, &auth, &one).await;
    assert_eq!(s.json()["subscription"], "queued");
    eventually("the first attempt", || !hook.all().is_empty()).await;
    // On the other replica the queue is just as full.
    let s = subscribe(&b, &auth, &two).await;
    assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s.json()["code"], "overloaded");
    let dropped = "dify_gateway_webhook_deliveries_total{outcome=\"dropped\"} 1";
    assert!(b.gateway.metrics_text().contains(dropped));
    let depth = "dify_gateway_webhook_queue_depth 1";
    eventually("the queue depth", || {
        b.gateway.metrics_text().contains(depth)
    })
    .await;
}

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
use dify_gateway::mock::{MockDify, Reply};
use hooks::*;
use http::StatusCode;
use redis_server::RedisServer;

/// A receiver, a mock Dify, a Redis and the config of gateways that share it, one client with
/// a webhook.
struct Fleet {
    hook: Receiver,
    up: MockDify,
    auth: String,
    toml: String,
    /// Stopped when the test ends.
    _redis: RedisServer,
}

impl Fleet {
    /// The receiver answers as `script` says; `webhooks` is the `[webhooks]` section.
    async fn new(script: Vec<Then>, webhooks: &str) -> Fleet {
        let redis = RedisServer::start();
        let (hook, addr) = Receiver::start(script).await;
        let (entry, auth) = client_entry("team-a", Some(addr));
        let toml = format!(
            "[shared]\nurls = [\"{}\"]\ntimeout = \"500ms\"\n[cache]\nrunning_ttl = \"100ms\"\n[webhooks]\n{webhooks}\n{entry}",
            redis.url()
        );
        Fleet {
            hook,
            up: spawn_upstream().await,
            auth,
            toml,
            _redis: redis,
        }
    }

    async fn gateway(&self) -> TestGateway {
        spawn_gateway(config_with_secret(&self.up, &self.toml)).await
    }

    /// A blocking run started through `gw`; its id.
    async fn blocking_run(&self, gw: &TestGateway) -> String {
        let got = start(gw, &self.auth, "blocking").await;
        assert_eq!(got.status, StatusCode::OK);
        got.json()["workflow_run_id"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn two_replicas_announce_each_run_once() {
    let f = Fleet::new(vec![], "retry_base_delay = \"50ms\"\ntimeout = \"300ms\"").await;
    let (a, b) = (f.gateway().await, f.gateway().await);
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(f.blocking_run(&a).await);
    }
    // Both replicas see every run end: A followed them, B is asked for them too.
    for run in &runs {
        detail(&b, &f.auth, run).await;
    }
    f.hook.until_delivered(5).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let all = f.hook.all();
    assert_eq!(all.len(), 5, "{all:?}");
    let mut got: Vec<String> = all.iter().map(Delivery::run).collect();
    got.sort();
    runs.sort();
    assert_eq!(got, runs);
}

#[tokio::test]
async fn a_delivery_pending_at_a_restart_is_made_by_the_next_gateway() {
    // The retry waits long enough for the gateway to be gone by then.
    let webhooks = "retry_base_delay = \"1500ms\"\nmax_delay = \"1500ms\"\ntimeout = \"300ms\"";
    let f = Fleet::new(vec![Then::Answer(503)], webhooks).await;
    let first = f.gateway().await;
    f.blocking_run(&first).await;
    eventually("the first attempt", || !f.hook.all().is_empty()).await;
    first.shutdown().await;
    assert!(f.hook.delivered().is_empty());
    let _next = f.gateway().await;
    let delivered = f.hook.until_delivered(1).await;
    assert!(delivered[0].signed_by(SECRET));
    assert_eq!(f.hook.all().len(), 2);
    assert_eq!(f.hook.all()[0].delivery, delivered[0].delivery);
}

#[tokio::test]
async fn a_delivery_cut_by_shutdown_is_made_by_the_next_gateway_at_once() {
    // The first attempt is never answered, and its timeout (and lease) is far longer than the
    // test: only the handing back at shutdown lets the next gateway make it.
    let f = Fleet::new(vec![Then::Hang], "timeout = \"60s\"").await;
    let first = f.gateway().await;
    let run = f.blocking_run(&first).await;
    eventually("the first attempt", || !f.hook.all().is_empty()).await;
    first.shutdown().await;
    let _next = f.gateway().await;
    let delivered = f.hook.until_delivered(1).await;
    assert_eq!(delivered[0].run(), run);
    assert_eq!(f.hook.all()[0].delivery, delivered[0].delivery);
}

#[tokio::test]
async fn a_run_followed_when_its_gateway_stops_is_announced_by_the_next() {
    let f = Fleet::new(vec![], "timeout = \"300ms\"").await;
    let run = new_run();
    f.up.set(&run, Reply::run(&run, "\"running\""));
    let first = f.gateway().await;
    let s = subscribe(&first, &f.auth, &run).await;
    assert_eq!(s.status, StatusCode::ACCEPTED);
    assert_eq!(s.json()["subscription"], "watching");
    // The first gateway follows the run (one look per running_ttl) until it stops.
    let hits = f.up.hits(&run);
    eventually("the run followed", || f.up.hits(&run) >= hits + 2).await;
    first.shutdown().await;
    f.up.set(&run, Reply::run(&run, "\"succeeded\""));
    assert!(f.hook.all().is_empty());
    let next = f.gateway().await;
    let delivered = f.hook.until_delivered(1).await;
    assert_eq!(delivered[0].run(), run);
    assert_eq!(delivered[0].body, detail(&next, &f.auth, &run).await);
    assert!(delivered[0].signed_by(SECRET));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.hook.all().len(), 1);
}

#[tokio::test]
async fn the_queue_is_bounded_fleet_wide() {
    // The first delivery is never answered, so it stays queued.
    let f = Fleet::new(vec![Then::Hang], "timeout = \"60s\"\nmax_pending = 1").await;
    let (a, b) = (f.gateway().await, f.gateway().await);
    let (one, two) = (new_run(), new_run());
    f.up.set(&one, Reply::run(&one, "\"succeeded\""));
    f.up.set(&two, Reply::run(&two, "\"failed\""));
    let s = subscribe(&a, &f.auth, &one).await;
    assert_eq!(s.json()["subscription"], "queued");
    eventually("the first attempt", || !f.hook.all().is_empty()).await;
    // On the other replica the queue is just as full.
    let s = subscribe(&b, &f.auth, &two).await;
    assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s.json()["code"], "overloaded");
    let dropped = "dify_gateway_webhook_deliveries_total{outcome=\"dropped\"} 1";
    assert!(b.gateway.metrics_text().contains(dropped));
    // A dropped announcement was not made: asked again, the replica tries again (and is still
    // full), rather than answer that it went already.
    let s = subscribe(&b, &f.auth, &two).await;
    assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s.json()["code"], "overloaded");
    let depth = "dify_gateway_webhook_queue_depth 1";
    eventually("the queue depth", || {
        b.gateway.metrics_text().contains(depth)
    })
    .await;
}

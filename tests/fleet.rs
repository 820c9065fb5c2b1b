//! Several gateway replicas sharing one real Redis: one upstream fetch per run across the
//! fleet, shared short-lived entries, survival of a Redis outage, and corrupt values ignored.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use common::*;
use dify_gateway::mock::Reply;
use http::StatusCode;
use redis_server::RedisServer;

fn fleet_config(
    up: &dify_gateway::mock::MockDify,
    redis: &RedisServer,
    extra: &str,
) -> dify_gateway::Config {
    config(
        up,
        &format!(
            "[shared]\nurls = [\"{}\"]\ntimeout = \"500ms\"\nwait_timeout = \"3s\"\n{extra}",
            redis.url()
        ),
    )
}

async fn fleet(
    up: &dify_gateway::mock::MockDify,
    redis: &RedisServer,
    extra: &str,
) -> Vec<TestGateway> {
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(spawn_gateway(fleet_config(up, redis, extra)).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_fetch_a_fresh_terminal_run_once() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"succeeded\""));
    up.set_delay(Duration::from_millis(300));
    let gws = fleet(&up, &redis, "").await;
    // Let each replica's subscriber connect before the burst.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let url = gws[i % 3].run_url(&id);
        tasks.push(tokio::spawn(async move { get(&client(), &url).await }));
    }
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.json()["status"], "succeeded");
    }
    assert_eq!(up.hits(&id), 1, "one upstream request across the fleet");
    up.set_delay(Duration::ZERO);
    let c = client();
    for gw in &gws {
        assert_eq!(get(&c, &gw.run_url(&id)).await.x_cache(), "HIT");
    }
    // A replica that starts later (a restart) serves it from the shared tier.
    let fresh = spawn_gateway(fleet_config(&up, &redis, "")).await;
    let got = get(&c, &fresh.run_url(&id)).await;
    assert_eq!((got.status, got.x_cache()), (StatusCode::OK, "HIT"));
    assert_eq!(up.hits(&id), 1);
    let m = String::from_utf8_lossy(&get(&c, &fresh.admin_url("/metrics")).await.body).into_owned();
    assert!(m.contains("dify_gateway_shared_tier_hits_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_runs_cost_one_upstream_request_per_ttl_across_the_fleet() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"running\""));
    let gws = fleet(&up, &redis, "[cache]\nrunning_ttl = \"500ms\"\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let poll_for = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..15 {
        let url = gws[i % 3].run_url(&id);
        tasks.push(tokio::spawn(async move {
            let c = client();
            while start.elapsed() < poll_for {
                assert_eq!(get(&c, &url).await.status, StatusCode::OK);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = up.hits(&id);
    // One per TTL for the whole fleet (plus the first and a boundary), not one per replica.
    let bound = (poll_for.as_millis() / 500) as u64 + 2;
    assert!(
        n <= bound,
        "{n} upstream requests for 3 replicas in {poll_for:?}; bound {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_is_not_an_outage_and_the_tier_comes_back() {
    let mut redis = RedisServer::start();
    let up = spawn_upstream().await;
    let gws = fleet(&up, &redis, "").await;
    let c = client();
    redis.stop();
    for _ in 0..5 {
        let id = new_run();
        up.set(&id, Reply::run(&id, "\"succeeded\""));
        for gw in &gws {
            let got = get(&c, &gw.run_url(&id)).await;
            assert_eq!(
                got.status,
                StatusCode::OK,
                "Redis down must not fail requests"
            );
        }
    }
    let m =
        String::from_utf8_lossy(&get(&c, &gws[0].admin_url("/metrics")).await.body).into_owned();
    assert!(
        m.contains("dify_gateway_shared_tier_errors_total{reason="),
        "errors counted: {m}"
    );

    redis.restart();
    // Once it is back, a run fetched by one replica is served by another without the upstream.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let id = new_run();
        up.set(&id, Reply::run(&id, "\"succeeded\""));
        get(&c, &gws[0].run_url(&id)).await;
        let other = get(&c, &gws[1].run_url(&id)).await;
        assert_eq!(other.status, StatusCode::OK);
        if up.hits(&id) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shared tier was not used again after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_corrupt_value_in_redis_is_not_served_and_is_overwritten() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let id = new_run();
    let body = dify_gateway::mock::run_body(&id, "\"succeeded\"", 300);
    up.set(&id, Reply::ok_json(body.clone()));
    let gw = spawn_gateway(fleet_config(&up, &redis, "")).await;
    let tag = gw.gateway.app_tag(0).to_owned();
    let key = format!("dify-gateway:v1:run:{{{tag}:{id}}}");
    let mut raw = redis.raw();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(b"DGW\x01garbage-not-a-value".as_slice())
        .query(&mut raw)
        .unwrap();
    let c = client();
    let got = get(&c, &gw.run_url(&id)).await;
    assert_eq!(got.body, body, "the planted value was served");
    assert_eq!(up.hits(&id), 1);
    // The fetched answer replaces the corrupt value (just after the answer): another replica is
    // served from Redis.
    eventually("the value is replaced", || {
        let v: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut redis.raw()).unwrap();
        !v.ends_with(b"garbage-not-a-value")
    })
    .await;
    let other = spawn_gateway(fleet_config(&up, &redis, "")).await;
    let again = get(&c, &other.run_url(&id)).await;
    assert_eq!((again.body.clone(), again.x_cache()), (body, "HIT"));
    assert_eq!(up.hits(&id), 1);
}

/// Holds a long-poll on `b` for `RUN` (running, fresh for far longer than the wait), with the
/// shared tier down while it joins when `down_at_join`; then `a` refreshes the run to
/// `succeeded` and the held request must answer with it.
async fn a_refresh_on_one_replica_wakes_a_long_poll_on_another(down_at_join: bool) {
    let mut redis = RedisServer::start();
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    // Entries stay fresh far longer than the wait: only another replica's fetch can wake it.
    let extra = "[cache]\nrunning_ttl = \"60s\"\n";
    if down_at_join {
        redis.stop();
    }
    let a = spawn_gateway(fleet_config(&up, &redis, extra)).await;
    let b = spawn_gateway(fleet_config(&up, &redis, extra)).await;
    let url = b.run_url(RUN);
    let waiter = tokio::spawn(async move {
        request(&client(), http::Method::GET, &url, &[("prefer", "wait=25")]).await
    });
    let m = std::sync::Arc::clone(b.gateway.metrics());
    eventually("a held request on b", move || m.longpoll_waiters.get() == 1).await;
    if down_at_join {
        // The run's watcher starts with no subscription to hear the fleet on.
        tokio::time::sleep(Duration::from_millis(100)).await;
        redis.restart();
    }
    // b hears a's publication only once its subscription is up (it connects in the background).
    let tier = b.gateway.shared_tier().unwrap().clone();
    eventually("b subscribed to the fleet's notifications", move || {
        tier.subscribed()
    })
    .await;
    // a's commands reach Redis again (its connection reconnects on use).
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.gateway.shared_tier().unwrap().ping().await.is_err() {
        assert!(Instant::now() < deadline, "a never reached Redis again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    // Replica a refreshes (its entry purged from both tiers) and publishes the new state.
    a.gateway
        .purge_run(dify_gateway::run_id::RunId::parse(RUN).unwrap(), None)
        .await;
    let fresh = get(&client(), &a.run_url(RUN)).await;
    assert_eq!(fresh.json()["status"], "succeeded");
    let got = waiter.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["status"], "succeeded", "woken by a's refresh");
    assert_eq!(got.header("preference-applied"), Some("wait=25"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_one_replica_wakes_on_another_replicas_refresh() {
    a_refresh_on_one_replica_wakes_a_long_poll_on_another(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_held_before_the_subscription_is_up_wakes_on_another_replicas_refresh() {
    a_refresh_on_one_replica_wakes_a_long_poll_on_another(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_answers_its_waiters_before_it_writes_to_redis() {
    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(
        &up,
        &format!(
            "[shared]\nurls = [\"{}\"]\ntimeout = \"10s\"\nwait_timeout = \"3s\"\n",
            redis.url()
        ),
    ))
    .await;
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"succeeded\""));
    up.set_delay(Duration::from_millis(400));
    let asked = {
        let url = gw.run_url(&id);
        tokio::spawn(async move {
            let c = client();
            let (a, b) = tokio::join!(get(&c, &url), get(&c, &url));
            (a, b)
        })
    };
    // The lookup and the lock are done when the upstream is asked; freeze Redis then.
    eventually("the upstream is asked", || up.hits(&id) == 1).await;
    redis.freeze(true);
    let answered = tokio::time::timeout(Duration::from_secs(20), asked).await;
    // When the answer is out, no Redis call has failed yet: none was waited for (a leader that
    // wrote first would have answered only once its calls to the frozen Redis had failed).
    let stats = gw.gateway.shared_tier().unwrap().stats();
    redis.freeze(false);
    let (a, b) = answered.expect("the waiters were answered").unwrap();
    assert_eq!(
        (stats.timeout, stats.connection),
        (0, 0),
        "Redis was waited for before answering"
    );
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(a.body, b.body);
    assert_eq!(up.hits(&id), 1, "one fetch for both");
    // Thawed, the answer reaches Redis for the other replicas.
    let key = format!("dify-gateway:v1:run:{{{}:{id}}}", gw.gateway.app_tag(0));
    eventually("the answer is in Redis", || {
        redis::cmd("EXISTS")
            .arg(&key)
            .query::<bool>(&mut redis.raw())
            .unwrap_or(false)
    })
    .await;
}

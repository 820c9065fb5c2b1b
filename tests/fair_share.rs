//! Fair shares of the upstream slots: a client or app flooding cold fetches against a slow
//! upstream gets the `503 overloaded`, while another client's cold fetch still gets a slot.

mod common;

use std::time::Duration;

use common::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::mock::{MockDify, Reply};
use http::{Method, StatusCode};
use tokio::task::JoinSet;

/// A client entry for `app` and the header that authenticates it.
fn client_entry(name: &str, app: &str) -> (String, String) {
    let token = generate_token().unwrap();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"{app}\"\n",
        token_sha256_hex(&token)
    );
    (entry, format!("Bearer {token}"))
}

/// Adds `n` requests with `auth` to `set`, for fresh run ids the upstream never answers.
fn flood(set: &mut JoinSet<Got>, gw: &TestGateway, up: &MockDify, auth: &str, n: usize) {
    for _ in 0..n {
        let id = new_run();
        up.set(&id, Reply::Hang);
        let (url, auth) = (gw.run_url(&id), auth.to_owned());
        set.spawn(async move {
            request(&client(), Method::GET, &url, &[("authorization", &auth)]).await
        });
    }
}

/// Waits for `n` answers of the flood; each must be `503 overloaded`.
async fn expect_overloaded(set: &mut JoinSet<Got>, n: usize) {
    for _ in 0..n {
        let got = set.join_next().await.unwrap().unwrap();
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(got.json()["code"], "overloaded");
        assert_eq!(got.header("retry-after"), Some("1"));
    }
}

fn rejected(gw: &TestGateway, reason: &str) -> u64 {
    let text = gw.gateway.metrics_text();
    let prefix = format!("dify_gateway_rejected_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.parse().unwrap())
}

const LIMITS: &str = "[upstream]\nmax_concurrent = 8\nqueue_timeout = \"200ms\"\ntotal_timeout = \"20s\"\nretry_attempts = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_client_gets_the_503s_and_another_client_still_gets_a_slot() {
    let up = spawn_upstream().await;
    let (a_entry, a) = client_entry("flooder", "default");
    let (b_entry, b) = client_entry("neighbour", "default");
    // Default share: half of max_concurrent, 4 slots, per client.
    let gw = spawn_gateway(config(&up, &format!("{LIMITS}{a_entry}{b_entry}"))).await;

    let mut a_flood = JoinSet::new();
    flood(&mut a_flood, &gw, &up, &a, 20);
    // A holds its 4 slots; its 16 other fetches time out waiting on its own share.
    expect_overloaded(&mut a_flood, 16).await;
    eventually("the flooder's 4 fetches to reach the upstream", || {
        up.total() == 4
    })
    .await;
    assert_eq!(rejected(&gw, "overload_client"), 16);
    assert_eq!(rejected(&gw, "overload"), 0);

    // B's cold fetch finds one of the 4 global slots A could not take.
    cold_fetch_is_served(&gw, &up, &b).await;
    assert_eq!(up.total(), 5);

    // A fetch is charged to its leader: A, at its share, joins B's fetch and is answered.
    up.set_delay(Duration::from_secs(1));
    let shared_id = new_run();
    up.set(&shared_id, Reply::run(&shared_id, "\"succeeded\""));
    let url = gw.run_url(&shared_id);
    let b_leads = {
        let (url, b) = (url.clone(), b.clone());
        tokio::spawn(async move {
            request(&client(), Method::GET, &url, &[("authorization", &b)]).await
        })
    };
    eventually("B's fetch to reach the upstream", || up.total() == 6).await;
    let a_joins = request(&client(), Method::GET, &url, &[("authorization", &a)]).await;
    assert_eq!(
        (a_joins.status, a_joins.x_cache()),
        (StatusCode::OK, "COALESCED")
    );
    assert_eq!(b_leads.await.unwrap().status, StatusCode::OK);
    assert_eq!(up.total(), 6);
    // A's held fetches are still hanging: none of them ended.
    assert!(a_flood.try_join_next().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_app_gets_the_503s_and_another_app_still_gets_a_slot() {
    let alpha = MockDify::start("app-alpha-key-111").await.unwrap();
    let beta = MockDify::start("app-beta-key-222").await.unwrap();
    let (a1_entry, a1) = client_entry("alpha-one", "alpha");
    let (a2_entry, a2) = client_entry("alpha-two", "alpha");
    let (b_entry, b) = client_entry("beta-one", "beta");
    // No per-client share, so only the app's share (4 of 8 slots) binds alpha's two clients.
    let toml = format!(
        "{LIMITS}max_share_per_app = 0.5\nmax_share_per_client = 1.0\n\n[[apps]]\nname = \"alpha\"\napi_key_env = \"KEY_ALPHA\"\nbase_url = \"{}\"\n\n[[apps]]\nname = \"beta\"\napi_key_env = \"KEY_BETA\"\nbase_url = \"{}\"\n\n{a1_entry}{a2_entry}{b_entry}",
        alpha.base_url(),
        beta.base_url()
    );
    let config = config_with_env(
        &toml,
        &[
            ("KEY_ALPHA", "app-alpha-key-111"),
            ("KEY_BETA", "app-beta-key-222"),
        ],
    );
    let gw = spawn_gateway(config).await;

    let mut alpha_flood = JoinSet::new();
    flood(&mut alpha_flood, &gw, &alpha, &a1, 10);
    flood(&mut alpha_flood, &gw, &alpha, &a2, 10);
    // Alpha holds its 4 slots, whichever client started them; its 16 other fetches time out.
    expect_overloaded(&mut alpha_flood, 16).await;
    eventually("alpha's 4 fetches to reach its upstream", || {
        alpha.total() == 4
    })
    .await;
    assert_eq!(rejected(&gw, "overload_app"), 16);
    assert_eq!(alpha.total(), 4);

    cold_fetch_is_served(&gw, &beta, &b).await;
    assert_eq!(beta.total(), 1);
}

/// A fresh terminal run asked with `token` is fetched (`MISS`) and answered 200.
async fn cold_fetch_is_served(gw: &TestGateway, up: &MockDify, token: &str) {
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"succeeded\""));
    let got = request(
        &client(),
        Method::GET,
        &gw.run_url(&id),
        &[("authorization", token)],
    )
    .await;
    assert_eq!((got.status, got.x_cache()), (StatusCode::OK, "MISS"));
}

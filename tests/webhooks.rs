//! Webhooks on one gateway: a client's runs announced to its URL when they end — signed,
//! retried through failures and timeouts, never redirected — streamed, blocking, async and
//! subscribed runs alike, a stream that ends without `workflow_finished` followed to the run's
//! end, another client's run refused, and the secret in no log line, error or `Debug`.
//! (Gateways sharing a Redis: `tests/webhooks_fleet.rs`.)

mod common;
#[path = "common/webhooks.rs"]
mod hooks;
#[path = "common/logs.rs"]
mod logs;

use std::time::Duration;

use common::pass::*;
use common::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::config::{Overrides, RawConfig, API_KEY_ENV};
use dify_gateway::mock::{Reply, RunEnd, RunScript};
use hooks::*;
use http::{Method, StatusCode};

const JSON: (&str, &str) = ("content-type", "application/json");
/// [`FAST`], with a delivery given up after its second attempt.
const TWO_ATTEMPTS: &str = "[webhooks]\nretry_base_delay = \"50ms\"\ntimeout = \"300ms\"\nmax_attempts = 2\n[cache]\nrunning_ttl = \"100ms\"\n";

/// Starts a streaming run through `gw` and reads its stream to the end; answers the run id.
async fn stream_run(gw: &TestGateway, auth: &str) -> String {
    let resp = open(
        &body_client(),
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, ("authorization", auth)],
        start_body("streaming"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut events = EventReader::new(resp.into_body());
    let run = EventReader::run_id(&events.next_event().await.unwrap());
    while events.next_event().await.is_some() {}
    run
}

#[tokio::test]
async fn a_streamed_run_is_announced_signed_through_a_failure_and_a_timeout() {
    let (hook, addr) = Receiver::start(vec![Then::Answer(500), Then::Hang]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    let gw = spawn_gateway(config_with_secret(&up, &format!("{FAST}{entry}"))).await;
    let run = stream_run(&gw, &auth).await;
    let delivered = hook.until_delivered(1).await;
    let all = hook.all();
    assert_eq!(all.len(), 3, "a 500, a timeout, then 200: {all:?}");
    for g in &all {
        assert_eq!(g.event, "workflow_run.finished");
        assert!(g.signed_by(SECRET), "signature of {g:?}");
        assert!(!g.signed_by("another-secret-0123"));
        assert_eq!(
            g.delivery, all[0].delivery,
            "one delivery id across attempts"
        );
    }
    // The body is the run detail as Dify gives it, byte for byte.
    assert_eq!(delivered[0].body, detail(&gw, &auth, &run).await);
    let v: serde_json::Value = serde_json::from_slice(&delivered[0].body).unwrap();
    assert_eq!(v["id"], run.as_str());
    assert_eq!(v["status"], "succeeded");
    let m = gw.gateway.metrics_text();
    for line in [
        "dify_gateway_webhook_attempts_total{outcome=\"status\"} 1",
        "dify_gateway_webhook_attempts_total{outcome=\"timeout\"} 1",
        "dify_gateway_webhook_attempts_total{outcome=\"delivered\"} 1",
        "dify_gateway_webhook_deliveries_total{outcome=\"delivered\"} 1",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
    // Nothing more comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hook.all().len(), 3);
}

#[tokio::test]
async fn blocking_async_and_subscribed_runs_are_announced_and_others_refused() {
    let (hook, addr) = Receiver::start(vec![]).await;
    let up = spawn_upstream().await;
    let (a, auth_a) = client_entry("team-a", Some(addr));
    let (b, auth_b) = client_entry("team-b", None);
    let gw = spawn_gateway(config_with_secret(&up, &format!("{FAST}{a}{b}"))).await;
    let blocking = start(&gw, &auth_a, "blocking").await;
    assert_eq!(blocking.status, StatusCode::OK);
    let blocking_run = blocking.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = start(&gw, &auth_a, "async").await;
    assert_eq!(started.status, StatusCode::ACCEPTED);
    let async_run = started.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    hook.until_delivered(2).await;

    // A run not started through the gateway: running now, then succeeded.
    let other = new_run();
    up.set_sequence(
        &other,
        vec![
            Reply::run(&other, "\"running\""),
            Reply::run(&other, "\"running\""),
            Reply::run(&other, "\"succeeded\""),
        ],
    );
    let s = subscribe(&gw, &auth_a, &other).await;
    assert_eq!(s.status, StatusCode::ACCEPTED, "{:?}", s.body);
    assert_eq!(s.json()["subscription"], "watching");
    assert_eq!(s.json()["status"], "running");
    // A run that has ended already is announced at once, and once.
    let ended = new_run();
    up.set(&ended, Reply::run(&ended, "\"failed\""));
    let s = subscribe(&gw, &auth_a, &ended).await;
    assert_eq!(s.status, StatusCode::ACCEPTED);
    assert_eq!(s.json()["subscription"], "queued");
    let s = subscribe(&gw, &auth_a, &ended).await;
    assert_eq!(s.json()["subscription"], "already_announced");
    let delivered = hook.until_delivered(4).await;
    let mut runs: Vec<String> = delivered.iter().map(Delivery::run).collect();
    runs.sort();
    let mut want = vec![blocking_run, async_run, other.clone(), ended];
    want.sort();
    assert_eq!(runs, want);
    assert!(delivered.iter().all(|g| g.signed_by(SECRET)));
    // Each body is the run detail a client reads now.
    let g = delivered.iter().find(|g| g.run() == other).unwrap();
    assert_eq!(g.body, detail(&gw, &auth_a, &other).await);

    // Refusals: no webhook, a bad id, an unknown run.
    let s = subscribe(&gw, &auth_b, &new_run()).await;
    assert_eq!(s.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.json()["code"], "webhook_not_configured");
    let s = subscribe(&gw, &auth_a, "not-a-run").await;
    assert_eq!(s.status, StatusCode::BAD_REQUEST);
    let s = subscribe(&gw, &auth_a, &new_run()).await;
    assert_eq!(s.status, StatusCode::NOT_FOUND);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.all().len(), 4, "nothing else announced");
}

#[tokio::test]
async fn a_stream_that_ends_without_workflow_finished_is_followed_to_the_runs_end() {
    let (hook, addr) = Receiver::start(vec![]).await;
    let up = spawn_upstream().await;
    up.set_run_script(RunScript {
        end: RunEnd::Unfinished,
        ..RunScript::default()
    });
    let (entry, auth) = client_entry("team-a", Some(addr));
    let gw = spawn_gateway(config_with_secret(&up, &format!("{FAST}{entry}"))).await;
    let run = stream_run(&gw, &auth).await;
    // The run stays running after its stream: it is looked at (once per running_ttl) and
    // nothing is announced yet.
    let hits = up.hits(&run);
    eventually("the run looked at again", || up.hits(&run) >= hits + 3).await;
    assert!(hook.all().is_empty());
    up.set(&run, Reply::run(&run, "\"succeeded\""));
    let delivered = hook.until_delivered(1).await;
    assert_eq!(delivered[0].run(), run);
    assert_eq!(delivered[0].body, detail(&gw, &auth, &run).await);
    assert!(delivered[0].signed_by(SECRET));
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_never_followed() {
    let (elsewhere, other_addr) = Receiver::start(vec![]).await;
    let to = format!("http://{other_addr}/stolen");
    let (hook, addr) = Receiver::start(vec![Then::Redirect(to.clone()), Then::Redirect(to)]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    let toml = format!("{TWO_ATTEMPTS}{entry}");
    let gw = spawn_gateway(config_with_secret(&up, &toml)).await;
    let started = start(&gw, &auth, "blocking").await;
    assert_eq!(started.status, StatusCode::OK);
    let failed = "dify_gateway_webhook_deliveries_total{outcome=\"failed\"} 1";
    eventually("the delivery given up", || {
        gw.gateway.metrics_text().contains(failed)
    })
    .await;
    assert_eq!(hook.all().len(), 2);
    assert!(hook.delivered().is_empty());
    assert!(
        elsewhere.all().is_empty(),
        "only the configured URL is called"
    );
    let m = gw.gateway.metrics_text();
    assert!(m.contains("dify_gateway_webhook_attempts_total{outcome=\"status\"} 2"));
}

#[tokio::test]
async fn another_clients_run_cannot_be_subscribed_to() {
    let (hook, addr) = Receiver::start(vec![]).await;
    let up = spawn_upstream().await;
    let (a, auth_a) = client_entry("team-a", Some(addr));
    let token_b = generate_token().unwrap();
    let b = format!(
        "[[clients]]\nname = \"team-b\"\ntoken_sha256 = \"{}\"\napp = \"iso\"\nwebhook_url = \"http://{addr}/b\"\nwebhook_secret_env = \"{SECRET_ENV}\"\n",
        token_sha256_hex(&token_b)
    );
    let a = a.replace("app = \"default\"", "app = \"iso\"");
    let toml = format!(
        "{FAST}[[apps]]\nname = \"iso\"\napi_key_env = \"{API_KEY_ENV}\"\nisolate_clients = true\n{a}{b}"
    );
    let gw = spawn_gateway(config_with_secret(&up, &toml)).await;
    let started = start(&gw, &auth_a, "blocking").await;
    let run = started.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let s = subscribe(&gw, &format!("Bearer {token_b}"), &run).await;
    assert_eq!(s.status, StatusCode::NOT_FOUND);
    assert_eq!(s.json()["code"], "not_found");
    // Team A's own announcement still goes, to A's URL only.
    hook.until_delivered(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.all().len(), 1);
}

/// Every log line of a gateway whose deliveries fail and are given up, at TRACE: the secret is
/// in none. (tokio's test runtime runs every task on this thread, so the scoped subscriber
/// sees all of them.)
#[tokio::test]
async fn the_secret_is_in_no_log_line() {
    let captured = logs::Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _scope = tracing::subscriber::set_default(subscriber);
    let (hook, addr) = Receiver::start(vec![Then::Answer(500), Then::Answer(502)]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    let toml = format!("{TWO_ATTEMPTS}{entry}");
    let gw = spawn_gateway(config_with_secret(&up, &toml)).await;
    stream_run(&gw, &auth).await;
    eventually("two attempts", || hook.all().len() == 2).await;
    let given_up = || captured.line_with(&["webhook delivery given up"]);
    eventually("the give-up logged", || given_up().is_some()).await;
    assert!(captured
        .line_with(&["webhook delivery failed; retrying"])
        .is_some());
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(text.lines().count() > 10, "the gateway logged: {text}");
    assert!(!text.contains(SECRET), "the secret in a log line");
}

#[test]
fn webhook_secrets_stay_out_of_debug_and_errors() {
    let toml = format!(
        "[[clients]]\nname = \"a\"\ntoken_sha256 = \"{}\"\napp = \"default\"\nwebhook_url = \"https://hooks.example/x\"\nwebhook_secret_env = \"S\"\n",
        token_sha256_hex("t")
    );
    let env = |secret: &'static str| {
        move |n: &str| match n {
            API_KEY_ENV => Some(KEY.to_owned()),
            "S" => Some(secret.to_owned()),
            _ => None,
        }
    };
    let validate = |toml: &str, secret: &'static str| {
        RawConfig::from_toml(toml)
            .unwrap()
            .validate(&Overrides::default(), None, &env(secret))
    };
    let ok = validate(&toml, "a-long-enough-secret-42").unwrap();
    assert!(!format!("{ok:?}").contains("a-long-enough-secret-42"));
    let short = validate(&toml, "short-s3cret").unwrap_err().to_string();
    assert!(short.contains("at least 16"), "{short}");
    assert!(!short.contains("short-s3cret"), "{short}");
    let bad_url = toml.replace("https://hooks.example/x", "ftp://hooks.example/x");
    let e = validate(&bad_url, "a-long-enough-secret-42")
        .unwrap_err()
        .to_string();
    assert!(e.contains("webhook_url"), "{e}");
    // A variable that is not set is named, and nothing else.
    let unset = toml.replace("\"S\"", "\"NOT_SET\"");
    let e = validate(&unset, "a-long-enough-secret-42")
        .unwrap_err()
        .to_string();
    assert!(e.contains("NOT_SET"), "{e}");
    let missing_file = toml.replace(
        "webhook_secret_env = \"S\"",
        "webhook_secret_file = \"/nonexistent/webhook-secret\"",
    );
    let e = validate(&missing_file, "a-long-enough-secret-42")
        .unwrap_err()
        .to_string();
    assert!(e.contains("webhook_secret_file"), "{e}");
}

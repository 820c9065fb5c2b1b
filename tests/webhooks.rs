//! Webhooks: a client's runs announced to its URL when they end — signed, retried through
//! failures and timeouts, once per run across replicas sharing a real Redis, surviving a
//! restart — and subscriptions to runs the client did not start.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::pass::*;
use common::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::config::{Overrides, RawConfig, API_KEY_ENV};
use dify_gateway::mock::{MockDify, Reply};
use dify_gateway::Config;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use redis_server::RedisServer;
use sha2::Sha256;
use tokio::net::TcpListener;

const JSON: (&str, &str) = ("content-type", "application/json");
const SECRET: &str = "whsec-0123456789abcdef";
const SECRET_ENV: &str = "TEAM_A_WEBHOOK_SECRET";

/// What the receiver does with the next delivery.
#[derive(Clone, Copy, Debug)]
enum Then {
    Answer(u16),
    /// Never answers (the gateway's timeout ends the attempt).
    Hang,
}

/// One delivery as the receiver got it.
#[derive(Clone, Debug)]
struct Got {
    event: String,
    timestamp: String,
    signature: String,
    delivery: String,
    body: Bytes,
    answered: Option<u16>,
}

impl Got {
    /// Checks the signature as a receiver would: HMAC-SHA256(secret, timestamp "." body).
    fn signed_by(&self, secret: &str) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(self.timestamp.as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        let Some(hex) = self.signature.strip_prefix("sha256=") else {
            return false;
        };
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        want == hex
    }
}

/// A webhook receiver on 127.0.0.1:0: answers as scripted (200 once the script is spent).
#[derive(Clone, Default)]
struct Receiver {
    script: Arc<Mutex<VecDeque<Then>>>,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    async fn start(script: Vec<Then>) -> (Receiver, SocketAddr) {
        let r = Receiver {
            script: Arc::new(Mutex::new(script.into())),
            ..Receiver::default()
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let me = r.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, std::convert::Infallible>(me.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (r, addr)
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let mut got = Got {
            event: h("x-dify-gateway-event"),
            timestamp: h("x-dify-gateway-timestamp"),
            signature: h("x-dify-gateway-signature"),
            delivery: h("x-dify-gateway-delivery"),
            body: Bytes::new(),
            answered: None,
        };
        got.body = req.into_body().collect().await.unwrap().to_bytes();
        let then = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Then::Answer(200));
        let status = match then {
            Then::Answer(s) => s,
            Then::Hang => {
                self.got.lock().unwrap().push(got);
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        got.answered = Some(status);
        self.got.lock().unwrap().push(got);
        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        resp
    }

    fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn delivered(&self) -> Vec<Got> {
        let mut v = self.all();
        v.retain(|g| g.answered.is_some_and(|s| (200..300).contains(&s)));
        v
    }
}

/// Config in front of `up` with `toml`, the webhook secret in the environment.
fn config_with_secret(up: &MockDify, toml: &str) -> Config {
    RawConfig::from_toml(toml)
        .expect("test toml parses")
        .validate(
            &Overrides {
                upstream: Some(up.base_url()),
                listen: Some("127.0.0.1:0".into()),
                admin_listen: Some("127.0.0.1:0".into()),
                ..Overrides::default()
            },
            None,
            &|n| match n {
                API_KEY_ENV => Some(KEY.to_owned()),
                SECRET_ENV => Some(SECRET.to_owned()),
                _ => None,
            },
        )
        .expect("test config validates")
}

/// A client entry (with a webhook to `hook` when given) and its bearer header value.
fn client_entry(name: &str, hook: Option<SocketAddr>) -> (String, String) {
    let token = generate_token().unwrap();
    let webhook = hook
        .map(|a| {
            format!(
                "webhook_url = \"http://{a}/hooks/dify\"\nwebhook_secret_env = \"{SECRET_ENV}\"\n"
            )
        })
        .unwrap_or_default();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n{webhook}\n",
        token_sha256_hex(&token)
    );
    (entry, format!("Bearer {token}"))
}

const FAST: &str = "[webhooks]\nretry_base_delay = \"50ms\"\nmax_delay = \"200ms\"\ntimeout = \"300ms\"\nmax_attempts = 5\n[cache]\nrunning_ttl = \"100ms\"\n";

fn start_body(mode: &str) -> String {
    format!(r#"{{"inputs": {{"q": "hi"}}, "response_mode": "{mode}", "user": "u1"}}"#)
}

/// Waits (at most 10 s) until the receiver has `n` deliveries answered 2xx.
async fn until_delivered(r: &Receiver, n: usize) -> Vec<Got> {
    eventually("deliveries", || r.delivered().len() >= n).await;
    r.delivered()
}

/// The run detail of `run`, as a client reads it through `gw`.
async fn detail(gw: &TestGateway, auth: &str, run: &str) -> Bytes {
    let got = request(
        &client(),
        Method::GET,
        &gw.run_url(run),
        &[("authorization", auth)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    got.body
}

#[tokio::test]
async fn a_streamed_run_is_announced_signed_through_a_failure_and_a_timeout() {
    let (hook, addr) = Receiver::start(vec![Then::Answer(500), Then::Hang]).await;
    let up = spawn_upstream().await;
    let (entry, auth) = client_entry("team-a", Some(addr));
    let gw = spawn_gateway(config_with_secret(&up, &format!("{FAST}{entry}"))).await;
    let resp = open(
        &body_client(),
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, ("authorization", &auth)],
        start_body("streaming"),
    )
    .await;
    let mut events = EventReader::new(resp.into_body());
    let run = EventReader::run_id(&events.next_event().await.unwrap());
    while events.next_event().await.is_some() {}
    let delivered = until_delivered(&hook, 1).await;
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
    let toml = format!("{FAST}{a}{b}");
    let gw = spawn_gateway(config_with_secret(&up, &toml)).await;
    let c = body_client();
    let start = |mode: &'static str| {
        let (c, url, auth) = (c.clone(), gw.url("/v1/workflows/run"), auth_a.clone());
        async move {
            let h = [JSON, ("authorization", auth.as_str())];
            send(&c, Method::POST, &url, &h, start_body(mode)).await
        }
    };
    let blocking = start("blocking").await;
    assert_eq!(blocking.status, StatusCode::OK);
    let blocking_run = blocking.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let async_run = start("async").await.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    until_delivered(&hook, 2).await;

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
    let sub = |run: String, auth: String| {
        let c = c.clone();
        let url = gw.url(&format!("/v1/workflows/run/{run}/subscribe"));
        async move {
            send(
                &c,
                Method::POST,
                &url,
                &[("authorization", auth.as_str())],
                "",
            )
            .await
        }
    };
    let s = sub(other.clone(), auth_a.clone()).await;
    assert_eq!(s.status, StatusCode::ACCEPTED, "{:?}", s.body);
    assert_eq!(s.json()["subscription"], "watching");
    assert_eq!(s.json()["status"], "running");
    // A run that has ended already is announced at once.
    let ended = new_run();
    up.set(&ended, Reply::run(&ended, "\"failed\""));
    let s = sub(ended.clone(), auth_a.clone()).await;
    assert_eq!(s.status, StatusCode::ACCEPTED);
    assert_eq!(s.json()["subscription"], "queued");
    let delivered = until_delivered(&hook, 4).await;
    let mut runs: Vec<String> = delivered
        .iter()
        .map(|g| {
            let v: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    runs.sort();
    let mut want = vec![blocking_run, async_run, other, ended];
    want.sort();
    assert_eq!(runs, want);
    assert!(delivered.iter().all(|g| g.signed_by(SECRET)));

    // Refusals: no webhook, a bad id, an unknown run.
    let s = sub(new_run(), auth_b.clone()).await;
    assert_eq!(s.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.json()["code"], "webhook_not_configured");
    let s = sub("not-a-run".into(), auth_a.clone()).await;
    assert_eq!(s.status, StatusCode::BAD_REQUEST);
    let s = sub(new_run(), auth_a.clone()).await;
    assert_eq!(s.status, StatusCode::NOT_FOUND);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.all().len(), 4, "nothing else announced");
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
    let started = send(
        &body_client(),
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &[JSON, ("authorization", &auth_a)],
        start_body("blocking"),
    )
    .await;
    let run = started.json()["workflow_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = gw.url(&format!("/v1/workflows/run/{run}/subscribe"));
    let auth_b = format!("Bearer {token_b}");
    let s = send(
        &body_client(),
        Method::POST,
        &url,
        &[("authorization", &auth_b)],
        "",
    )
    .await;
    assert_eq!(s.status, StatusCode::NOT_FOUND);
    assert_eq!(s.json()["code"], "not_found");
    // Team A's own announcement still goes, to A's URL only.
    until_delivered(&hook, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.all().len(), 1);
}

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
        let got = send(
            &body_client(),
            Method::POST,
            &a.url("/v1/workflows/run"),
            &[JSON, ("authorization", &auth)],
            start_body("blocking"),
        )
        .await;
        runs.push(got.json()["workflow_run_id"].as_str().unwrap().to_owned());
    }
    // Both replicas see every run end: A followed them, B is asked for them too.
    for run in &runs {
        detail(&b, &auth, run).await;
    }
    until_delivered(&hook, 5).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let all = hook.all();
    assert_eq!(all.len(), 5, "{all:?}");
    let mut ids: Vec<_> = all.iter().map(|g| g.delivery.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5);
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
    let got = send(
        &body_client(),
        Method::POST,
        &first.url("/v1/workflows/run"),
        &[JSON, ("authorization", &auth)],
        start_body("blocking"),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    eventually("the first attempt", || !hook.all().is_empty()).await;
    first.shutdown().await;
    assert!(hook.delivered().is_empty());
    let _next = spawn_gateway(config_with_secret(&up, &toml)).await;
    let delivered = until_delivered(&hook, 1).await;
    assert!(delivered[0].signed_by(SECRET));
    assert_eq!(hook.all().len(), 2);
    assert_eq!(hook.all()[0].delivery, delivered[0].delivery);
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
    let ok = RawConfig::from_toml(&toml)
        .unwrap()
        .validate(&Overrides::default(), None, &env("a-long-enough-secret-42"))
        .unwrap();
    assert!(!format!("{ok:?}").contains("a-long-enough-secret-42"));
    let short = RawConfig::from_toml(&toml)
        .unwrap()
        .validate(&Overrides::default(), None, &env("short-s3cret"))
        .unwrap_err()
        .to_string();
    assert!(short.contains("at least 16"), "{short}");
    assert!(!short.contains("short-s3cret"), "{short}");
    let bad_url = toml.replace("https://hooks.example/x", "ftp://hooks.example/x");
    let e = RawConfig::from_toml(&bad_url)
        .unwrap()
        .validate(&Overrides::default(), None, &env("a-long-enough-secret-42"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("webhook_url"), "{e}");
}

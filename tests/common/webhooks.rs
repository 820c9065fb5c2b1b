//! A webhook receiver on 127.0.0.1:0 that checks signatures with its own HMAC and answers as a
//! test scripts it, the config of gateways whose clients have webhooks, and the requests those
//! clients make.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::config::API_KEY_ENV;
use dify_gateway::mock::MockDify;
use dify_gateway::Config;
use hmac::{Hmac, Mac};
use http::header::LOCATION;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Sha256;
use tokio::net::TcpListener;

use crate::common::pass::{body_client, send};
use crate::common::{
    client, config_with_env, eventually, request, Got as Answer, TestGateway, KEY,
};

pub const SECRET: &str = "whsec-0123456789abcdef";
pub const SECRET_ENV: &str = "TEAM_A_WEBHOOK_SECRET";

/// Short delays: retries after 50 ms, attempts cut at 300 ms, runs looked at every 100 ms.
pub const FAST: &str = "[webhooks]\nretry_base_delay = \"50ms\"\nmax_delay = \"200ms\"\ntimeout = \"300ms\"\nmax_attempts = 5\n[cache]\nrunning_ttl = \"100ms\"\n";

/// What the receiver does with the next delivery.
#[derive(Clone, Debug)]
pub enum Then {
    Answer(u16),
    /// Never answers (the gateway's timeout ends the attempt).
    Hang,
    /// Answers 307 to this URL.
    Redirect(String),
}

/// One delivery attempt as the receiver got it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event: String,
    pub timestamp: String,
    pub signature: String,
    pub delivery: String,
    pub body: Bytes,
    pub answered: Option<u16>,
}

impl Delivery {
    /// Checks the signature as a receiver would: HMAC-SHA256(secret, timestamp "." body).
    pub fn signed_by(&self, secret: &str) -> bool {
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

    /// The `id` of the run-detail body.
    pub fn run(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }
}

/// A webhook receiver on 127.0.0.1:0: answers as scripted (200 once the script is spent).
#[derive(Clone, Default)]
pub struct Receiver {
    script: Arc<Mutex<VecDeque<Then>>>,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    pub async fn start(script: Vec<Then>) -> (Receiver, SocketAddr) {
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
        let mut got = Delivery {
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
        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
        let status = match then {
            Then::Answer(s) => s,
            Then::Redirect(to) => {
                resp.headers_mut().insert(LOCATION, to.parse().unwrap());
                307
            }
            Then::Hang => {
                self.got.lock().unwrap().push(got);
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        got.answered = Some(status);
        self.got.lock().unwrap().push(got);
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        resp
    }

    /// Every delivery attempt received.
    pub fn all(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// The attempts answered 2xx.
    pub fn delivered(&self) -> Vec<Delivery> {
        let mut v = self.all();
        v.retain(|g| g.answered.is_some_and(|s| (200..300).contains(&s)));
        v
    }

    /// Waits (at most 10 s) until `n` attempts were answered 2xx.
    pub async fn until_delivered(&self, n: usize) -> Vec<Delivery> {
        eventually("deliveries", || self.delivered().len() >= n).await;
        self.delivered()
    }
}

/// Config in front of `up` with `toml`, the webhook secret in the environment.
pub fn config_with_secret(up: &MockDify, toml: &str) -> Config {
    let toml = format!("[upstream]\nbase_url = \"{}\"\n{toml}", up.base_url());
    config_with_env(&toml, &[(API_KEY_ENV, KEY), (SECRET_ENV, SECRET)])
}

/// A client entry (with a webhook to `hook` when given) and its bearer header value.
pub fn client_entry(name: &str, hook: Option<SocketAddr>) -> (String, String) {
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

/// A run start's JSON body.
pub fn start_body(mode: &str) -> String {
    format!(r#"{{"inputs": {{"q": "hi"}}, "response_mode": "{mode}", "user": "u1"}}"#)
}

/// The run detail of `run`, as a client reads it through `gw`.
pub async fn detail(gw: &TestGateway, auth: &str, run: &str) -> Bytes {
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

/// `POST /v1/workflows/run/{run}/subscribe` through `gw` as `auth`.
pub async fn subscribe(gw: &TestGateway, auth: &str, run: &str) -> Answer {
    let url = gw.url(&format!("/v1/workflows/run/{run}/subscribe"));
    send(
        &body_client(),
        Method::POST,
        &url,
        &[("authorization", auth)],
        "",
    )
    .await
}

/// A run start (`mode`: blocking, streaming or async) through `gw` as `auth`, read whole.
pub async fn start(gw: &TestGateway, auth: &str, mode: &str) -> Answer {
    let h = [
        ("content-type", "application/json"),
        ("authorization", auth),
    ];
    send(
        &body_client(),
        Method::POST,
        &gw.url("/v1/workflows/run"),
        &h,
        start_body(mode),
    )
    .await
}

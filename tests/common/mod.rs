//! Helpers shared by the integration tests: a gateway and a mock Dify on `127.0.0.1:0`, and a
//! small HTTP client.
#![allow(dead_code)]

pub mod binary;
pub mod pass;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dify_gateway::access_log::AccessLog;
use dify_gateway::config::{Config, Overrides, RawConfig, API_KEY_ENV};
use dify_gateway::mock::MockDify;
use dify_gateway::server::Drain;
use dify_gateway::tls::TlsAcceptor;
use dify_gateway::{Gateway, Listeners, Prepared, RunOptions};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The app key the mock expects and the gateway injects.
pub const KEY: &str = "app-TESTKEY-9f8e7d6c5b4a3210";

/// A valid run id.
pub const RUN: &str = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c";

pub async fn spawn_upstream() -> MockDify {
    MockDify::start(KEY).await.expect("mock starts")
}

/// A running gateway.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub tls: Option<TlsAcceptor>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Drain>,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    pub fn run_url(&self, id: &str) -> String {
        self.url(&format!("/v1/workflows/run/{id}"))
    }

    /// Signals shutdown and waits for the drain to end.
    pub async fn shutdown(mut self) -> Drain {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.expect("server task")
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Config for `upstream` with defaults, then `toml` applied over it.
pub fn config(upstream: &MockDify, toml: &str) -> Config {
    config_for(&upstream.base_url(), toml)
}

/// [`config`] for an upstream given by its base URL.
pub fn config_for(base_url: &str, toml: &str) -> Config {
    let raw = RawConfig::from_toml(toml).expect("test toml parses");
    raw.validate(
        &Overrides {
            upstream: Some(base_url.to_owned()),
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        },
        None,
        &|n| (n == API_KEY_ENV).then(|| KEY.to_owned()),
    )
    .expect("test config validates")
}

/// `toml` validated with loopback listeners on port 0 and only the variables in `env`.
pub fn config_with_env(toml: &str, env: &[(&str, &str)]) -> Config {
    RawConfig::parse(toml)
        .expect("test toml parses")
        .validate(
            &Overrides {
                listen: Some("127.0.0.1:0".into()),
                admin_listen: Some("127.0.0.1:0".into()),
                ..Overrides::default()
            },
            None,
            &|n| {
                env.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| (*v).to_owned())
            },
        )
        .expect("test config validates")
}

pub async fn spawn_gateway(config: Config) -> TestGateway {
    spawn_gateway_logged(config, None).await
}

/// [`spawn_gateway`], writing access lines (when `log.access_log` is on) to `access_log`.
pub async fn spawn_gateway_logged(
    config: Config,
    access_log: Option<Arc<AccessLog>>,
) -> TestGateway {
    spawn_gateway_with(
        config,
        RunOptions {
            access_log,
            reload: None,
            // Tests count upstream requests: they probe by hand.
            probes: false,
        },
    )
    .await
}

/// A gateway served by [`dify_gateway::Prepared`], as the binary serves one, on loopback
/// listeners on port 0; it stops (both listeners) on [`TestGateway::shutdown`] or when dropped.
pub async fn spawn_gateway_with(config: Config, options: RunOptions) -> TestGateway {
    let listeners = Listeners {
        public: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let prepared = Prepared::new(listeners, config, options).expect("gateway builds");
    let (tx, rx) = oneshot::channel();
    TestGateway {
        addr: prepared.addr(),
        admin_addr: prepared.admin_addr(),
        gateway: Arc::clone(prepared.gateway()),
        tls: prepared.tls().cloned(),
        stop: Some(tx),
        task: tokio::spawn(prepared.serve(async {
            let _ = rx.await;
        })),
    }
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(c: &TestClient, method: Method, url: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        c.request(b.body(Empty::new()).unwrap()),
    )
    .await
    .expect("request finishes in time")
    .expect("request succeeds");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(c: &TestClient, url: &str) -> Got {
    request(c, Method::GET, url, &[]).await
}

/// A fresh random run id.
pub fn new_run() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A fake upstream on `127.0.0.1:0` that reads each request head, writes `answer` verbatim and
/// closes, for answers no HTTP library would send; returns its base URL.
pub async fn spawn_raw_upstream(answer: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// Polls `cond` until it holds, for at most 10 s (for counters no event announces).
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

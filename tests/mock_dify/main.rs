//! The mock Dify on its own, talked to directly over HTTP on loopback: its routes, Dify's shapes,
//! its knobs and what it records. The gateway's own tests rely on all of this.

mod api;
mod files;
mod workflow;

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dify_gateway::mock::MockDify;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The app key the mock expects.
pub const KEY: &str = "app-MOCKTEST-0123456789abcdef";

/// A request body.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// Bounds a step of a test, so a broken mock fails it instead of hanging it.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the mock answered in time")
}

pub fn bytes_body(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A whole answer.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A client of one mock, sending its key unless told otherwise.
pub struct Http {
    client: Client<HttpConnector, ReqBody>,
    base: String,
}

impl Http {
    pub fn new(mock: &MockDify) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{}", mock.addr()),
        }
    }

    /// Sends `method path` with `headers` (the key added unless `authorization` is among them).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> http::Response<Incoming> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            req = req.header("authorization", format!("Bearer {KEY}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        within(self.client.request(req.body(body).expect("request")))
            .await
            .expect("the mock answers")
    }

    /// Sends and reads the whole answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Got {
        let resp = self.send(method, path, headers, body).await;
        let (parts, body) = resp.into_parts();
        let body = within(body.collect()).await.expect("body").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Got {
        self.call(Method::GET, path, &[], bytes_body(Bytes::new()))
            .await
    }

    pub async fn post_json(&self, path: &str, json: &str) -> Got {
        self.call(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            bytes_body(json.to_owned()),
        )
        .await
    }

    /// Opens an event stream with a JSON body (`None`: a `GET`).
    pub async fn stream(&self, path: &str, json: Option<&str>) -> (http::response::Parts, Frames) {
        let resp = match json {
            Some(j) => {
                self.send(
                    Method::POST,
                    path,
                    &[("content-type", "application/json")],
                    bytes_body(j.to_owned()),
                )
                .await
            }
            None => {
                self.send(Method::GET, path, &[], bytes_body(Bytes::new()))
                    .await
            }
        };
        let (parts, body) = resp.into_parts();
        (
            parts,
            Frames {
                body,
                buf: BytesMut::new(),
            },
        )
    }
}

/// An event stream read frame by frame.
pub struct Frames {
    body: Incoming,
    buf: BytesMut,
}

impl Frames {
    /// The next frame, without its blank-line end; `None` at the stream's end.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame = self.buf.split_to(at + 2);
                return Some(String::from_utf8_lossy(&frame[..at]).into_owned());
            }
            let frame = within(self.body.frame()).await?.expect("stream reads");
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// Every frame left.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(f) = self.next().await {
            all.push(f);
        }
        assert!(self.buf.is_empty(), "bytes after the last frame");
        all
    }
}

/// A `data:` frame's JSON.
pub fn event(frame: &str) -> serde_json::Value {
    let json = frame
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("not a data frame: {frame}"));
    serde_json::from_str(json).expect("frame JSON")
}

/// A frame's event name (`ping` for the bare ping frame).
pub fn event_name(frame: &str) -> String {
    if frame == "event: ping" {
        return "ping".into();
    }
    event(frame)["event"]
        .as_str()
        .expect("event name")
        .to_owned()
}

pub async fn mock() -> (MockDify, Http) {
    let m = MockDify::start(KEY).await.expect("mock starts");
    let http = Http::new(&m);
    (m, http)
}

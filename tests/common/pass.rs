//! A client for the passed-through routes: request bodies sent whole or streamed, answers read
//! whole or event by event.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use super::Got;

type Sent = BoxBody<Bytes, std::io::Error>;

/// A client whose requests carry bodies.
pub type BodyClient = Client<HttpConnector, Sent>;

pub fn body_client() -> BodyClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client speaking HTTP/2 (prior knowledge), whose streamed bodies need no announced length.
pub fn h2_body_client() -> BodyClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Bound of every wait in these helpers.
pub const WAIT: Duration = Duration::from_secs(30);

fn build(method: Method, url: &str, headers: &[(&str, &str)], body: Sent) -> Request<Sent> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).unwrap()
}

/// Sends `body` whole and returns the answer's head, its body still streaming.
pub async fn open(
    c: &BodyClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let body = Full::new(body.into()).map_err(|e| match e {}).boxed();
    tokio::time::timeout(WAIT, c.request(build(method, url, headers, body)))
        .await
        .expect("answer in time")
        .expect("request succeeds")
}

/// Sends `body` whole and reads the whole answer.
pub async fn send(
    c: &BodyClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Got {
    let resp = open(c, method, url, headers, body).await;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Where a test writes a streamed request body.
pub type BodySender = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

/// The answer to a streamed request, once it comes.
pub type Answer = tokio::task::JoinHandle<Result<Got, hyper_util::client::legacy::Error>>;

/// Starts a request whose body the test streams through the returned sender (dropping it ends
/// the body); the answer comes through the join handle.
pub fn streaming(
    c: &BodyClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (BodySender, Answer) {
    let (tx, rx) = mpsc::channel(4);
    let frames =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let body = StreamBody::new(frames).boxed();
    let req = build(method, url, headers, body);
    let c = c.clone();
    let answer = tokio::spawn(async move {
        let resp = c.request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Ok(Got {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    });
    (tx, answer)
}

/// Reads an event stream frame by frame.
pub struct EventReader {
    body: Incoming,
    buf: Vec<u8>,
}

impl EventReader {
    pub fn new(body: Incoming) -> EventReader {
        EventReader {
            body,
            buf: Vec::new(),
        }
    }

    /// The next whole SSE block (up to its blank line), comments included; `None` at the end.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Some(String::from_utf8(block).expect("UTF-8 events"));
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an event in time")?;
            if let Ok(d) = frame.expect("stream ok").into_data() {
                self.buf.extend_from_slice(&d);
            }
        }
    }

    /// The next block that is not a comment.
    pub async fn next_event(&mut self) -> Option<String> {
        loop {
            let b = self.next().await?;
            if !b.starts_with(':') {
                return Some(b);
            }
        }
    }

    /// The `workflow_run_id` of a `workflow_started` block.
    pub fn run_id(block: &str) -> String {
        let data = block
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("a data line");
        let v: serde_json::Value = serde_json::from_str(data).expect("JSON data");
        v["workflow_run_id"].as_str().expect("a run id").to_owned()
    }
}

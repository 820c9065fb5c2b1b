//! What the gateway accepts at the door, as Dify does: a GET with a small body, the method
//! judged before the body, repeated slashes merged; what it refuses, and how the refusal shows in
//! the access log.

mod common;
#[path = "common/http1.rs"]
mod http1;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dify_gateway::access_log::AccessLog;
use dify_gateway::clients::token_sha256_hex;
use dify_gateway::config::LogFormat;
use dify_gateway::intake::MAX_BODY_BYTES;
use dify_gateway::mock::{MockDify, Reply};
use http::{Method, StatusCode};
use http1::{exchange, RawConn};

fn get_with_body(method: &str, path: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A mock Dify that knows [`RUN`] as succeeded, and a gateway in front of it with `toml`.
async fn serving_run(toml: &str) -> (MockDify, TestGateway) {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let gw = spawn_gateway(config(&up, toml)).await;
    (up, gw)
}

/// Sends `request` on a new connection and expects the gateway's own error answer, `status` and
/// `code`, then the connection closed.
async fn refused_and_closed(addr: std::net::SocketAddr, request: String, status: u16, code: &str) {
    let mut c = RawConn::open(addr).await;
    c.send(request.as_bytes()).await;
    let got = c.response(false).await;
    assert_eq!(got.status, status, "{got:?}");
    let v = got.json();
    assert_eq!(
        (v["code"].as_str(), &v["status"]),
        (Some(code), &status.into())
    );
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(got.header("connection"), Some("close"));
    assert!(c.closed().await, "the connection stays open after {status}");
}

#[tokio::test]
async fn a_get_or_head_with_a_small_body_is_answered_as_usual() {
    let (up, gw) = serving_run("").await;
    let path = format!("/v1/workflows/run/{RUN}");

    // The shape a Python SDK sends with every GET, then a plain GET on the same connection:
    // the body was read to its end, so the connection stays usable.
    let mut c = RawConn::open(gw.addr).await;
    c.send(&get_with_body("GET", &path, "{}", "")).await;
    let first = c.response(false).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json()["id"], RUN);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let second = c.response(false).await;
    assert_eq!(
        (second.status, second.header("x-cache")),
        (200, Some("HIT"))
    );
    assert_eq!(second.body, first.body);

    let head = exchange(gw.addr, &get_with_body("HEAD", &path, "{}", "")).await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    let health = exchange(gw.addr, &get_with_body("GET", "/healthz", "{\"a\":1}", "")).await;
    assert_eq!(health.status, 200);
    // A body of exactly the cap is still read and dropped.
    let full = "x".repeat(MAX_BODY_BYTES as usize);
    let at_cap = exchange(gw.addr, &get_with_body("GET", &path, &full, "")).await;
    assert_eq!(at_cap.status, 200);

    // The body never reaches Dify: one upstream request, with no body of its own.
    assert_eq!(up.total(), 1);
    let seen = up.last_headers().unwrap();
    assert!(seen.get("content-type").is_none(), "{seen:?}");
    assert!(
        seen.get("content-length").is_none_or(|v| v == "0"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_body_past_the_cap_gets_413_and_the_connection_closes() {
    let (up, gw) = serving_run("").await;
    let path = format!("/v1/workflows/run/{RUN}");
    let over = MAX_BODY_BYTES + 1;
    // Announced larger than the cap: refused before any of it is read.
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {over}\r\n\r\n");
    refused_and_closed(gw.addr, head, 413, "request_too_large").await;
    assert_eq!(up.total(), 0);
}

#[tokio::test]
async fn a_body_that_stalls_is_cut_at_the_header_read_timeout() {
    let (up, gw) = serving_run("[server]\nheader_read_timeout = \"1s\"\n").await;
    let path = format!("/v1/workflows/run/{RUN}");
    let started = Instant::now();
    // Ten bytes announced, two sent, then silence.
    let stalled = format!("GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{{}}");
    refused_and_closed(gw.addr, stalled, 408, "request_timeout").await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(up.total(), 0, "a stalled request reached the upstream");
}

#[tokio::test]
async fn the_method_is_judged_before_the_body() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "")).await;
    let path = format!("/v1/workflows/run/{RUN}");
    for (method, target) in [
        ("POST", path.as_str()),
        ("PUT", path.as_str()),
        ("POST", "/healthz"),
    ] {
        let got = exchange(
            gw.addr,
            &get_with_body(method, target, "{\"inputs\":{}}", "Connection: close\r\n"),
        )
        .await;
        assert_eq!(got.status, 405, "{method} {target}: {got:?}");
        assert_eq!(got.header("allow"), Some("GET, HEAD"));
        assert_eq!(got.json()["code"], "method_not_allowed");
    }
    assert_eq!(up.total(), 0);
}

#[tokio::test]
async fn transfer_encoding_stays_refused_with_bad_framing() {
    let (up, gw) = serving_run("").await;
    // Chunked alone, and the smuggling shapes: hyper drops a Content-Length sent beside
    // Transfer-Encoding, so the gateway cannot tell them apart and refuses all three.
    for extra in [
        "Transfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ] {
        let request =
            format!("GET /v1/workflows/run/{RUN} HTTP/1.1\r\nHost: x\r\n{extra}\r\n0\r\n\r\n");
        refused_and_closed(gw.addr, request, 400, "bad_framing").await;
    }
    assert_eq!(up.total(), 0);
}

#[tokio::test]
async fn repeated_slashes_are_merged_before_routing() {
    let (up, gw) = serving_run("").await;
    let c = client();
    let mut caches = Vec::new();
    for path in [
        format!("/v1//workflows/run/{RUN}"),
        format!("//v1///workflows//run//{RUN}"),
        format!("/v1/workflows/run/{RUN}"),
    ] {
        let got = get(&c, &gw.url(&path)).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert_eq!(got.json()["id"], RUN);
        caches.push(got.x_cache().to_owned());
    }
    // One entry: the merged paths are the same request.
    assert_eq!(caches, ["MISS", "HIT", "HIT"]);
    assert_eq!(up.total(), 1);
    assert_eq!(get(&c, &gw.url("//healthz")).await.status, StatusCode::OK);
    // `%2F` is not a separator and is never decoded into one.
    let encoded = get(&c, &gw.url(&format!("/v1/workflows/run%2F{RUN}"))).await;
    assert_eq!(encoded.status, StatusCode::NOT_FOUND);
    let encoded = get(&c, &gw.url(&format!("/v1/workflows/run/%2F%2F{RUN}"))).await;
    assert_eq!(encoded.status, StatusCode::BAD_REQUEST);
    assert_eq!(encoded.json()["code"], "invalid_param");
    assert_eq!(up.total(), 1);
}

/// The access lines written so far.
fn lines(log: &AccessLog) -> String {
    let mut out = Vec::new();
    log.take(&mut out, Duration::ZERO);
    String::from_utf8(out).expect("UTF-8 lines")
}

#[tokio::test]
async fn a_refusal_writes_its_error_code_in_the_access_line() {
    let token = "dgw_".to_owned() + &"ab".repeat(32);
    for format in [LogFormat::Text, LogFormat::Json] {
        let up = spawn_upstream().await;
        up.set(RUN, Reply::run(RUN, "\"succeeded\""));
        let clients = format!(
            "[[clients]]\nname = \"team\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n",
            token_sha256_hex(&token)
        );
        let log = Arc::new(AccessLog::new(format));
        let gw = spawn_gateway_logged(config(&up, &clients), Some(Arc::clone(&log))).await;
        let auth = format!("Authorization: Bearer {token}\r\n");
        let path = format!("/v1/workflows/run/{RUN}");
        let over = MAX_BODY_BYTES + 1;
        let cases: Vec<(Vec<u8>, u16, Option<&str>)> = vec![
            (
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes(),
                200,
                None,
            ),
            (
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(),
                401,
                Some("unauthorized"),
            ),
            (
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(),
                400,
                Some("bad_framing"),
            ),
            (
                get_with_body("POST", &path, "{}", &auth),
                405,
                Some("method_not_allowed"),
            ),
            (
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {over}\r\n\r\n").into_bytes(),
                413,
                Some("request_too_large"),
            ),
            (
                format!("GET /v1/workflows/run/nope HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes(),
                400,
                Some("invalid_param"),
            ),
            (
                b"GET /v1/chat-messages HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                404,
                Some("not_found"),
            ),
        ];
        for (bytes, status, code) in &cases {
            let got = exchange(gw.addr, bytes).await;
            assert_eq!(got.status, *status, "{}", String::from_utf8_lossy(bytes));
            if code.is_some() {
                // The logged word is the answer's JSON `code`.
                assert_eq!(got.json()["code"].as_str(), *code);
            }
        }
        let text = lines(&log);
        let logged: Vec<&str> = text.lines().collect();
        assert_eq!(logged.len(), cases.len(), "{text}");
        for (line, (_, status, code)) in logged.iter().zip(&cases) {
            match format {
                LogFormat::Json => {
                    let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
                    assert_eq!(v["status"], *status, "{line}");
                    assert_eq!(v["error"].as_str(), *code, "{line}");
                }
                LogFormat::Text => {
                    assert!(line.contains(&format!(" status={status} ")), "{line}");
                    match code {
                        Some(c) => assert!(line.contains(&format!(" error=\"{c}\" ")), "{line}"),
                        None => assert!(!line.contains(" error="), "{line}"),
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn an_upstream_failure_writes_its_error_code_in_the_access_line() {
    let up = spawn_upstream().await;
    let log = Arc::new(AccessLog::new(LogFormat::Text));
    let gw = spawn_gateway_logged(
        config(&up, "[upstream]\ntotal_timeout = \"2s\"\n"),
        Some(Arc::clone(&log)),
    )
    .await;
    up.stop();
    let got = request(&client(), Method::GET, &gw.run_url(&new_run()), &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let code = got.json()["code"].as_str().unwrap().to_owned();
    let text = lines(&log);
    assert!(
        text.contains(&format!(
            " status=502 route=\"run_detail\" cache=\"miss\" error=\"{code}\""
        )),
        "{text}"
    );
}

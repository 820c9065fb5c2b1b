//! Real Dify SDKs, replayed byte for byte: the requests in `tests/fixtures/sdk/` were recorded
//! from the SDKs themselves by `scripts/capture-sdk-requests.py`. Only the `Host` line is
//! rewritten to the gateway's address; token, run id, headers and framing are the SDK's.

mod common;
#[path = "common/http1.rs"]
mod http1;

use std::path::PathBuf;

use common::*;
use dify_gateway::clients::token_sha256_hex;
use dify_gateway::mock::Reply;
use http1::RawConn;

/// The fake client token the capture script gives every SDK.
const TOKEN: &str = "dgw_5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

/// Every recorded request, by file name.
fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdk");
    let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/sdk exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "http"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("readable fixture"))
        })
        .collect();
    all.sort();
    all
}

/// `request` with its `Host` field's value replaced by `host`; every other byte as recorded.
fn with_host(request: &[u8], host: &str) -> Vec<u8> {
    let end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = std::str::from_utf8(&request[..end]).expect("ASCII head");
    let head: Vec<String> = head
        .split("\r\n")
        .map(|line| match line.split_once(':') {
            Some((name, _)) if name.eq_ignore_ascii_case("host") => format!("{name}: {host}"),
            _ => line.to_owned(),
        })
        .collect();
    let mut out = head.join("\r\n").into_bytes();
    out.extend_from_slice(&request[end..]);
    out
}

#[tokio::test]
async fn requests_recorded_from_real_sdks_get_the_run() {
    let fixtures: Vec<_> = fixtures()
        .into_iter()
        .filter(|(n, _)| n.contains("-get-run"))
        .collect();
    for lang in ["python-", "node-"] {
        assert!(
            fixtures.iter().any(|(n, _)| n.starts_with(lang)),
            "no {lang}* SDK fixture"
        );
    }
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let client = format!(
        "[[clients]]\nname = \"sdk\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n",
        token_sha256_hex(TOKEN)
    );
    let gw = spawn_gateway(config(&up, &client)).await;
    let mut bodies = Vec::new();
    for (name, recorded) in &fixtures {
        let text = String::from_utf8_lossy(recorded);
        assert!(
            text.contains(TOKEN) && text.contains(RUN),
            "{name} holds the test token and run"
        );
        let mut c = RawConn::open(gw.addr).await;
        c.send(&with_host(recorded, &gw.addr.to_string())).await;
        let got = c.response(false).await;
        assert_eq!(got.status, 200, "{name}: {got:?}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        let v = got.json();
        assert_eq!((&v["id"], &v["status"]), (&RUN.into(), &"succeeded".into()));
        bodies.push(got.body);
    }
    // One upstream fetch served them all, with the same bytes.
    assert_eq!(up.total(), 1);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    // The SDK's token stayed with the gateway; Dify got the app key.
    let seen = up.last_headers().unwrap();
    assert_eq!(seen["authorization"], format!("Bearer {KEY}").as_str());
}

#[tokio::test]
async fn run_starts_recorded_from_real_sdks_run_blocking_and_streaming() {
    let fixtures: Vec<_> = fixtures()
        .into_iter()
        .filter(|(n, _)| n.contains("-run-blocking") || n.contains("-run-streaming"))
        .collect();
    for want in ["python-dify-client-", "node-dify-client-"] {
        for mode in ["blocking", "streaming"] {
            assert!(
                fixtures
                    .iter()
                    .any(|(n, _)| n.starts_with(want) && n.contains(mode)),
                "no {want}*-run-{mode} fixture"
            );
        }
    }
    let up = spawn_upstream().await;
    let client = format!(
        "[[clients]]\nname = \"sdk\"\ntoken_sha256 = \"{}\"\napp = \"default\"\nuser_prefix = \"sdk:\"\n",
        token_sha256_hex(TOKEN)
    );
    let gw = spawn_gateway(config(&up, &client)).await;
    for (i, (name, recorded)) in fixtures.iter().enumerate() {
        let mut c = RawConn::open(gw.addr).await;
        c.send(&with_host(recorded, &gw.addr.to_string())).await;
        let got = c.response(false).await;
        assert_eq!(got.status, 200, "{name}: {got:?}");
        if name.contains("streaming") {
            assert_eq!(
                got.header("content-type")
                    .map(|t| t.starts_with("text/event-stream")),
                Some(true),
                "{name}"
            );
            assert_eq!(got.header("x-accel-buffering"), Some("no"));
            let body = String::from_utf8(c.until(b"0\r\n\r\n").await).unwrap();
            assert!(
                body.contains("workflow_started") && body.contains("workflow_finished"),
                "{name}: {body}"
            );
        } else {
            // The upstream's length is kept when it sent one; otherwise the answer is chunked.
            let body = match got.header("content-length") {
                Some(_) => String::from_utf8(got.body.clone()).unwrap(),
                None => String::from_utf8(c.until(b"0\r\n\r\n").await).unwrap(),
            };
            assert!(body.contains("\"succeeded\""), "{name}: {body}");
        }
        // The SDK's bytes reached Dify with the client's user prefixed and its key swapped.
        let runs = up.runs();
        assert_eq!(runs.len(), i + 1, "{name}");
        assert_eq!(runs[i].user, "sdk:abc-123");
        let seen = up.last_headers().unwrap();
        assert_eq!(seen["authorization"], format!("Bearer {KEY}").as_str());
    }
}

#[test]
fn only_the_host_line_is_rewritten() {
    let sent = b"GET /v1/x HTTP/1.1\r\nAccept: */*\r\nHost: 127.0.0.1:1\r\nX-Host: keep\r\n\r\n{}";
    assert_eq!(
        with_host(sent, "127.0.0.1:9"),
        b"GET /v1/x HTTP/1.1\r\nAccept: */*\r\nHost: 127.0.0.1:9\r\nX-Host: keep\r\n\r\n{}"
    );
}

//! Upstream answers the gateway asks for and refuses: `Accept-Encoding: identity` is sent, and
//! a content-coded body or an interim (1xx) status as the final answer becomes
//! `502 upstream_bad_response`, never cached.

mod common;

use bytes::Bytes;
use common::*;
use dify_gateway::mock::Reply;
use http::StatusCode;

/// One attempt per fetch, so each request below is one upstream exchange.
const ONE_ATTEMPT: &str = "[upstream]\nretry_attempts = 1\n";

fn assert_bad_response(got: &Got) {
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["code"], "upstream_bad_response");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("content-encoding"), None);
}

#[tokio::test]
async fn identity_is_asked_for_and_a_coded_body_is_refused_and_not_cached() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, ONE_ATTEMPT)).await;
    let c = client();

    let plain = new_run();
    up.set(&plain, Reply::run(&plain, "\"succeeded\""));
    assert_eq!(get(&c, &gw.run_url(&plain)).await.status, StatusCode::OK);
    let sent = up.last_headers().unwrap();
    assert_eq!(sent["accept-encoding"], "identity");

    // A terminal run, gzipped against the request's wishes.
    let gzipped = new_run();
    up.set(
        &gzipped,
        Reply::Bytes {
            status: StatusCode::OK,
            content_type: "application/json",
            headers: vec![("content-encoding", "gzip".into())],
            body: Bytes::from_static(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00"),
        },
    );
    for _ in 0..2 {
        assert_bad_response(&get(&c, &gw.run_url(&gzipped)).await);
    }
    // Never cached: each request went upstream.
    assert_eq!(up.hits(&gzipped), 2);
    assert_eq!(gw.gateway.cache().stats().entries, 1);
}

#[tokio::test]
async fn switching_protocols_as_the_final_answer_is_a_bad_response() {
    let base = spawn_raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let gw = spawn_gateway(config_for(&base, ONE_ATTEMPT)).await;
    let c = client();
    for _ in 0..2 {
        let got = get(&c, &gw.run_url(&new_run())).await;
        assert_bad_response(&got);
        assert_eq!(got.x_cache(), "MISS");
    }
    assert_eq!(gw.gateway.cache().stats().entries, 0);
}

#[tokio::test]
async fn an_interim_answer_with_nothing_after_it_is_a_bad_response() {
    let base = spawn_raw_upstream(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n").await;
    let gw = spawn_gateway(config_for(&base, ONE_ATTEMPT)).await;
    let got = get(&client(), &gw.run_url(&new_run())).await;
    assert_bad_response(&got);
    assert_eq!(gw.gateway.cache().stats().entries, 0);
}

//! Clients that stop polling: conditional requests (ETag, 304, Cache-Control), long-poll with
//! `Prefer: wait=N`, and the status stream, against the mock Dify.

mod common;

use common::*;
use dify_gateway::mock::Reply;
use http::{Method, StatusCode};

#[tokio::test]
async fn etag_304_and_cache_control_for_running_and_terminal() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"running\""));
    let gw = spawn_gateway(config(&up, "[cache]\nrunning_ttl = \"50ms\"\n")).await;
    let c = client();

    let first = get(&c, &gw.run_url(RUN)).await;
    assert_eq!(first.status, StatusCode::OK);
    let etag = first.header("etag").expect("etag").to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34,
        "{etag}"
    );
    assert_eq!(first.header("cache-control"), Some("private, no-cache"));

    // A match — plain, weak, in a list, or `*` — is a 304 with no body, from the cache.
    let weak = format!("W/{etag}");
    let list = format!("\"other\", {etag}");
    for inm in [etag.as_str(), weak.as_str(), list.as_str(), "*"] {
        let got = request(&c, Method::GET, &gw.run_url(RUN), &[("if-none-match", inm)]).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(got.body.is_empty());
        assert_eq!(got.header("etag"), Some(etag.as_str()));
        assert_eq!(got.header("cache-control"), Some("private, no-cache"));
    }
    let other = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("if-none-match", "\"x\"")],
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.body, first.body);

    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    let done = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "the body changed");
    let done_tag = done.header("etag").unwrap().to_owned();
    assert_ne!(done_tag, etag);
    assert_eq!(
        done.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    let hits = up.hits(RUN);
    let again = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("if-none-match", &done_tag)],
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(
        again.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    assert_eq!(up.hits(RUN), hits, "a 304 comes from the cache");
}

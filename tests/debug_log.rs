//! What the gateway works out but does not answer with reaches its debug log, in the words of
//! the enums that hold it: why an answer was not kept, why a client was not let in, and how the
//! shared tier's lock, write, notification and release went.

mod common;
#[path = "common/logs.rs"]
mod logs;
#[path = "common/redis.rs"]
mod redis_server;

use common::*;
use dify_gateway::clients::token_sha256_hex;
use dify_gateway::mock::Reply;
use http::{Method, StatusCode};
use logs::Captured;
use redis_server::RedisServer;

/// One test in this binary: the subscriber is global.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_and_shared_tier_outcomes_are_logged_at_debug() {
    let logs = Captured::install(tracing::Level::DEBUG);

    let redis = RedisServer::start();
    let up = spawn_upstream().await;
    let token = "dgw_debug-log-test-token";
    let gw = spawn_gateway(config(
        &up,
        &format!(
            "[shared]\nurls = [\"{}\"]\ntimeout = \"500ms\"\n\
             [[clients]]\nname = \"team\"\ntoken_sha256 = \"{}\"\napp = \"default\"\n",
            redis.url(),
            token_sha256_hex(token)
        ),
    ))
    .await;
    let c = client();
    let bearer = format!("Bearer {token}");
    let with_token = [("authorization", bearer.as_str())];

    // A 401 from the upstream is passed on and not kept: the policy's reason is logged.
    let refused = new_run();
    up.set(
        &refused,
        Reply::dify_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Access token is invalid",
        ),
    );
    let got = request(&c, Method::GET, &gw.run_url(&refused), &with_token).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    let line = logs.line_with(&["answer not kept", &refused]);
    assert!(
        line.as_deref()
            .is_some_and(|l| l.contains("reason=\"upstream_status\"")),
        "{line:?}"
    );

    // A terminal run is fetched under the fleet lock, written, announced and the lock released.
    let done = new_run();
    up.set(&done, Reply::run(&done, "\"succeeded\""));
    let got = request(&c, Method::GET, &gw.run_url(&done), &with_token).await;
    assert_eq!(got.status, StatusCode::OK);
    // Written after the answer: the line comes a moment later.
    eventually("the shared fetch's line", || {
        logs.line_with(&["shared fetch done", &done]).is_some()
    })
    .await;
    let line = logs.line_with(&["shared fetch done", &done]);
    for word in [
        "put=\"written\"",
        "notify=\"published\"",
        "release=\"released\"",
    ] {
        assert!(
            line.as_deref().is_some_and(|l| l.contains(word)),
            "{word}: {line:?}"
        );
    }

    // A token no client holds, and none at all: each refusal says which.
    let wrong = [("authorization", "Bearer dgw_not-a-client")];
    for (headers, reason) in [
        (&wrong[..], "reason=\"unknown_token\""),
        (&[][..], "reason=\"missing_token\""),
    ] {
        let got = request(&c, Method::GET, &gw.run_url(&done), headers).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        let line = logs.line_with(&["client not let in", reason]);
        assert!(line.is_some(), "{reason}");
    }
}

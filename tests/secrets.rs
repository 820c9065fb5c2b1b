//! The upstream key never leaves the gateway: not in responses, not in log lines (at every level),
//! not in `Debug` output of config or gateway types.

mod common;
#[path = "common/logs.rs"]
mod logs;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dify_gateway::access_log::AccessLog;
use dify_gateway::config::LogFormat;
use dify_gateway::mock::Reply;
use http::{Method, StatusCode};
use logs::Captured;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_never_appears_in_responses_logs_or_debug_output() {
    let logs = Captured::install(tracing::Level::TRACE);

    let up = spawn_upstream().await;
    let ok = new_run();
    up.set(&ok, Reply::run(&ok, "\"succeeded\""));
    let unauthorized = new_run();
    up.set(
        &unauthorized,
        Reply::dify_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Access token is invalid",
        ),
    );
    let cfg = config(&up, "[upstream]\ntotal_timeout = \"2s\"\n");
    let debug_cfg = format!("{cfg:?}");
    let access = Arc::new(AccessLog::new(LogFormat::Text));
    let gw = spawn_gateway_logged(cfg, Some(Arc::clone(&access))).await;
    let c = client();

    let mut bodies = Vec::new();
    for url in [
        gw.run_url(&ok),
        gw.run_url(&ok),
        gw.run_url(&unauthorized),
        gw.run_url("bad-id"),
        gw.url("/nope"),
        gw.url("/healthz"),
    ] {
        let got = request(
            &c,
            Method::GET,
            &url,
            &[("authorization", "Bearer something-else")],
        )
        .await;
        bodies.push(format!(
            "{:?} {}",
            got.headers,
            String::from_utf8_lossy(&got.body)
        ));
    }
    up.stop();
    let down = get(&c, &gw.run_url(&new_run())).await;
    bodies.push(format!(
        "{:?} {}",
        down.headers,
        String::from_utf8_lossy(&down.body)
    ));

    let secret_part = KEY.trim_start_matches("app-");
    for b in &bodies {
        assert!(!b.contains(secret_part), "key in a response: {b}");
    }
    assert!(!debug_cfg.contains(secret_part), "key in Debug of config");
    let upstream_dbg = format!(
        "{:?}",
        {
            let c = config(&up, "");
            dify_gateway::upstream::Upstream::new(&c.upstream, &c.apps[0])
        }
        .unwrap()
    );
    assert!(
        !upstream_dbg.contains(secret_part),
        "key in Debug of the upstream client"
    );

    let mut lines = logs.0.lock().unwrap().clone();
    access.take(&mut lines, Duration::ZERO);
    let text = String::from_utf8(lines).unwrap();
    assert!(
        text.contains("INFO access: request_id="),
        "access lines were logged: {text}"
    );
    assert!(!text.contains(secret_part), "key in the logs");
}

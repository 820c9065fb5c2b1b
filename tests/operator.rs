//! What an operator sees from the binary: config errors that point at the line and key but never
//! echo a secret (at start and on SIGHUP), listen addresses as people write them, keys that
//! rotate on SIGHUP, a loud start-up warning when `base_url` is not Dify's API root, and the
//! offline demo.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::binary::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::mock::{MockDify, Reply};

fn check_config(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = gateway_command();
    c.args(["--config", file.to_str().unwrap(), "--check-config"]);
    c.env("DIFY_API_KEY", "app-x");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_points_at_line_column_and_key_and_never_echoes_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    for (text, secret, at, key) in [
        (
            "[[apps]]\nname = \"a\"\napi_key = \"app-InlineKeySecret\"\n",
            "InlineKeySecret",
            "line 3, column 1",
            "apps[0].api_key",
        ),
        (
            "[shared]\nurls = \"redis://:RedisPwSecret@cache:6379\"\n",
            "RedisPwSecret",
            "line 2, column 8",
            "shared.urls",
        ),
        (
            "[upstream]\nbase_url = \"https://ops:UrlPwSecret@dify.example/v1\"\n",
            "UrlPwSecret",
            "line 2, column 12",
            "upstream.base_url",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = check_config(&file, &[]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = stderr(&out);
        assert!(!err.contains(secret), "secret echoed: {err}");
        assert!(
            err.contains("gw.toml") && err.contains(at) && err.contains(&format!("`{key}`")),
            "{err}"
        );
    }
}

#[test]
fn listen_takes_host_names_and_a_bare_port_and_errors_name_the_flag_or_variable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:8080\"\n").unwrap();
    let summary = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = gateway_command();
        c.args(["--config", file.to_str().unwrap(), "--check-config"])
            .args(args)
            .env("DIFY_API_KEY", "app-x");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = summary(
        &["--listen", "localhost:8081", "--admin-listen", ":9091"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen 127.0.0.1:8081"), "{text}");
    assert!(text.contains("admin 0.0.0.0:9091"), "{text}");

    let out = summary(&[], &[("DIFY_GATEWAY_LISTEN", "localhost:80x")]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("`DIFY_GATEWAY_LISTEN`"), "{err}");
    assert!(
        !err.contains("server.listen") && !err.contains("gw.toml"),
        "{err}"
    );

    let out = summary(&["--listen", "no-such-host.invalid:8080"], &[]);
    let err = stderr(&out);
    assert!(
        err.contains("`--listen`") && err.contains("cannot resolve"),
        "{err}"
    );
}

#[test]
fn whitespace_in_dify_api_key_is_the_variables_problem() {
    let out = gateway_command()
        .arg("--check-config")
        .env("DIFY_API_KEY", "app-abc def")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("`DIFY_API_KEY`") && err.contains("whitespace"),
        "{err}"
    );
    assert!(
        !err.contains("api_key_file") && !err.contains("abc def"),
        "{err}"
    );
}

/// A runtime for a mock Dify the binary talks to.
fn mock_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn sighup_rotates_a_key_file_and_logs_refusals_without_secrets() {
    let rt = mock_runtime();
    let up = rt.block_on(MockDify::start("app-hup-old")).unwrap();
    let run = uuid::Uuid::new_v4().to_string();
    up.set(&run, Reply::run(&run, "\"succeeded\""));
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "app-hup-old\n").unwrap();
    let token = generate_token().unwrap();
    let good = format!(
        "[[apps]]\nname = \"main\"\napi_key_file = \"{}\"\nbase_url = \"{}\"\n\n\
         [[clients]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\napp = \"main\"\n",
        key_file.display(),
        up.base_url(),
        token_sha256_hex(&token)
    );
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, &good).unwrap();
    let mut gw = Running::spawn(gateway_command().args([
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]));
    let serving = gw.wait_for("dify-gateway serving");
    let (addr, admin) = (
        logged_addr(&serving, "listen"),
        logged_addr(&serving, "admin"),
    );
    let auth = format!("Bearer {token}");
    let path = format!("/v1/workflows/run/{run}");
    assert_eq!(
        http_get(addr, &path, &[("authorization", &auth)]).status,
        200
    );

    // The mounted Secret changes in place; the old key stops working at Dify.
    std::fs::write(&key_file, "app-hup-new\n").unwrap();
    up.set_keys(&["app-hup-new"]);
    gw.signal("HUP");
    let line = gw.wait_for("configuration reloaded");
    assert!(line.contains("main"), "{line}");
    let other = uuid::Uuid::new_v4().to_string();
    up.set(&other, Reply::run(&other, "\"succeeded\""));
    let got = http_get(
        addr,
        &format!("/v1/workflows/run/{other}"),
        &[("authorization", &auth)],
    );
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        up.last_headers().unwrap()["authorization"],
        "Bearer app-hup-new"
    );

    // Two bad files in turn: each refusal is logged with its position and key, no secret.
    for (bad, secret, key) in [
        (
            good.replace(
                "[[clients]]",
                "api_key = \"app-HupInlineSecret\"\n[[clients]]",
            ),
            "HupInlineSecret",
            "apps[0].api_key",
        ),
        (
            good.replace("http://", "http://ops:HupUrlSecret@"),
            "HupUrlSecret",
            "apps.base_url",
        ),
    ] {
        std::fs::write(&file, bad).unwrap();
        gw.signal("HUP");
        let line = gw.wait_for("reload refused");
        assert!(line.contains("gw.toml") && line.contains(key), "{line}");
        assert!(line.contains("line ") && line.contains("column "), "{line}");
        assert!(line.contains("invalid_config"), "{line}");
        assert!(!line.contains(secret), "{line}");
    }
    let metrics = http_get(admin, "/metrics", &[]).body;
    assert!(
        metrics.contains("dify_gateway_reloads_total{result=\"ok\"} 1")
            && metrics.contains("dify_gateway_reloads_total{result=\"invalid_config\"} 2"),
        "{metrics}"
    );
    let report = http_get(admin, "/admin/reload", &[]);
    assert!(
        report.body.contains("\"result\":\"invalid_config\"")
            && report.body.contains("\"reloads\":3"),
        "{}",
        report.body
    );
    gw.signal("TERM");
    gw.wait_for("drained");
    let all = gw.seen.join("\n") + &report.body;
    for secret in [
        "HupInlineSecret",
        "HupUrlSecret",
        "app-hup-old",
        "app-hup-new",
    ] {
        assert!(!all.contains(secret), "{secret} in the output:\n{all}");
    }
}

#[test]
fn the_start_up_probe_says_loudly_when_base_url_is_not_difys_api_root() {
    let rt = mock_runtime();
    let up = rt.block_on(MockDify::start("app-probe")).unwrap();
    // The classic mistake: the host without `/v1`.
    let root = format!("http://{}", up.addr());
    let mut gw = Running::spawn(gateway_command().env("DIFY_API_KEY", "app-probe").args([
        "--upstream",
        &root,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]));
    let admin = logged_addr(&gw.wait_for("dify-gateway serving"), "admin");
    let line = gw.wait_for("NOT DIFY");
    assert!(
        line.contains("ERROR") && line.contains("should end in /v1"),
        "{line}"
    );
    let ready = http_get(admin, "/readyz", &[]);
    assert_eq!(ready.status, 503, "{ready:?}");
    let v: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
    let problem = v["apps"][0]["problem"].as_str().unwrap();
    assert!(problem.contains("should end in /v1"), "{problem}");
}

#[test]
fn demo_serves_the_walkthrough_offline_with_no_key() {
    let mut demo = Running::spawn(gateway_command().args([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--running-for",
        "1s",
    ]));
    let gateway_line = demo.wait_for("gateway    http://");
    let addr: std::net::SocketAddr = gateway_line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let try_line = demo.wait_for("curl -si http://");
    let path = try_line[try_line.find("/v1/").unwrap()..].trim().to_owned();
    demo.wait_for("for i in $(seq");
    let unknown = demo.wait_for("# 404");
    assert!(unknown.contains("/v1/workflows/run/00000000-"), "{unknown}");
    demo.wait_for("Ctrl-C");

    let first = http_get(addr, &path, &[]);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert!(
        first.body.contains("\"status\": \"running\""),
        "{}",
        first.body
    );
    assert_eq!(http_get(addr, &path, &[]).header("x-cache"), Some("HIT"));

    // A real process: poll until the run has ended, then watch Age grow.
    let deadline = Instant::now() + Duration::from_secs(15);
    let ended = loop {
        let got = http_get(addr, &path, &[]);
        if got.body.contains("\"status\": \"succeeded\"") {
            break got;
        }
        assert!(Instant::now() < deadline, "the run never ended: {got:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ended.header("x-cache"), Some("MISS"));
    let hit = http_get(addr, &path, &[]);
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    std::thread::sleep(Duration::from_millis(1100));
    let later = http_get(addr, &path, &[]);
    assert_eq!(later.header("x-cache"), Some("HIT"));
    let age = |a: &Answer| a.header("age").unwrap().parse::<u64>().unwrap();
    assert!(age(&later) > age(&hit), "{hit:?} {later:?}");

    let unknown_path = unknown[unknown.find("/v1/").unwrap()..]
        .split_whitespace()
        .next()
        .unwrap();
    let missing = http_get(addr, unknown_path, &[]);
    assert_eq!(missing.status, 404, "{missing:?}");
    assert!(missing.body.contains("\"not_found\""), "{}", missing.body);
}

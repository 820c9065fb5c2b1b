//! Reloading while serving: app keys rotate, client changes apply, a changed app list is refused,
//! and every outcome is counted and shown on `/admin/reload`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::config::RawConfig;
use dify_gateway::mock::{MockDify, Reply};
use dify_gateway::reload::ReloadError;
use http::{Method, StatusCode};

const OLD_KEY: &str = "app-rotation-old-1111";
const NEW_KEY: &str = "app-rotation-new-2222";

/// A client and its `[[clients]]` entry.
struct Team {
    token: String,
    entry: String,
}

fn team(name: &str, app: &str) -> Team {
    let token = generate_token().unwrap();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"{app}\"\n",
        token_sha256_hex(&token)
    );
    Team { token, entry }
}

/// One app `main` on `up` whose key is read from `key_file`, then `rest`.
fn app_toml(up: &MockDify, key_file: &Path, rest: &str) -> String {
    format!(
        "[[apps]]\nname = \"main\"\napi_key_file = \"{}\"\nbase_url = \"{}\"\n\n{rest}",
        key_file.display(),
        up.base_url()
    )
}

async fn get_as(c: &TestClient, url: &str, t: &Team) -> Got {
    let auth = format!("Bearer {}", t.token);
    request(c, Method::GET, url, &[("authorization", &auth)]).await
}

fn sent_key(up: &MockDify) -> String {
    up.last_headers().unwrap()["authorization"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// `dify_gateway_reloads_total{result="…"}` as scraped.
async fn reloads_counted(c: &TestClient, gw: &TestGateway, result: &str) -> String {
    let text = get(c, &gw.admin_url("/metrics")).await.body;
    let text = String::from_utf8_lossy(&text).into_owned();
    let series = format!("dify_gateway_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_in_place_goes_upstream_after_reload_and_clients_keep_applying() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("dify-key");
    std::fs::write(&key_file, format!("{OLD_KEY}\n")).unwrap();
    let up = MockDify::start(OLD_KEY).await.unwrap();
    let (stay, leave) = (team("stay", "main"), team("leave", "main"));
    let both = app_toml(&up, &key_file, &format!("{}{}", stay.entry, leave.entry));
    let gw = spawn_gateway(config_with_env(&both, &[])).await;
    let c = client();
    let first = new_run();
    up.set(&first, Reply::run(&first, "\"succeeded\""));
    assert_eq!(
        get_as(&c, &gw.run_url(&first), &stay).await.status,
        StatusCode::OK
    );
    assert_eq!(sent_key(&up), format!("Bearer {OLD_KEY}"));

    // A request in flight when the key rotates finishes (Dify accepts both keys for a while).
    up.set_keys(&[OLD_KEY, NEW_KEY]);
    up.set_delay(Duration::from_millis(300));
    let slow = new_run();
    up.set(&slow, Reply::run(&slow, "\"succeeded\""));
    let before = up.total();
    let in_flight = {
        let (c, url, auth) = (
            c.clone(),
            gw.run_url(&slow),
            format!("Bearer {}", stay.token),
        );
        tokio::spawn(
            async move { request(&c, Method::GET, &url, &[("authorization", &auth)]).await },
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.total() == before {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sent_key(&up), format!("Bearer {OLD_KEY}"));

    // The Secret is rewritten in place, the same file.
    std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap();
    let applied = gw
        .gateway
        .reload(Ok(config_with_env(&both, &[])), None)
        .expect("rotation applies");
    assert_eq!(applied.keys_rotated, ["main"]);
    assert_eq!(applied.clients, 2);
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    up.set_delay(Duration::ZERO);
    up.set_keys(&[NEW_KEY]);

    let second = new_run();
    up.set(&second, Reply::run(&second, "\"succeeded\""));
    assert_eq!(
        get_as(&c, &gw.run_url(&second), &stay).await.status,
        StatusCode::OK
    );
    assert_eq!(sent_key(&up), format!("Bearer {NEW_KEY}"));
    // Cached answers stay: the rotated key is the same app's.
    assert_eq!(
        get_as(&c, &gw.run_url(&first), &stay).await.x_cache(),
        "HIT"
    );

    // A later reload that removes a client applies too.
    let one = app_toml(&up, &key_file, &stay.entry);
    let applied = gw
        .gateway
        .reload(Ok(config_with_env(&one, &[])), None)
        .unwrap();
    assert!(applied.keys_rotated.is_empty());
    assert_eq!(applied.clients, 1);
    assert_eq!(
        get_as(&c, &gw.run_url(&first), &leave).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get_as(&c, &gw.run_url(&first), &stay).await.status,
        StatusCode::OK
    );

    assert_eq!(reloads_counted(&c, &gw, "ok").await, "2");
    let report = get(&c, &gw.admin_url("/admin/reload")).await.json();
    assert_eq!(report["reloads"], 2);
    assert_eq!(report["last"]["result"], "ok");
    assert_eq!(report["last"]["applied"]["clients"], 1);
    assert!(report["last"]["at_unix"].as_u64().unwrap() > 1_700_000_000);
    let text = report.to_string();
    assert!(
        !text.contains("rotation-new") && !text.contains("rotation-old"),
        "{text}"
    );
}

#[tokio::test]
async fn a_changed_app_list_is_refused_counted_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("dify-key");
    std::fs::write(&key_file, OLD_KEY).unwrap();
    let up = MockDify::start(OLD_KEY).await.unwrap();
    let a = team("a", "main");
    let gw = spawn_gateway(config_with_env(&app_toml(&up, &key_file, &a.entry), &[])).await;
    let c = client();
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));

    // A second app, with a client of its own.
    let b = team("b", "second");
    let added = app_toml(
        &up,
        &key_file,
        &format!(
            "[[apps]]\nname = \"second\"\napi_key_env = \"SECOND_KEY\"\nbase_url = \"{}\"\n\n{}{}",
            up.base_url(),
            a.entry,
            b.entry
        ),
    );
    let e = gw
        .gateway
        .reload(
            Ok(config_with_env(&added, &[("SECOND_KEY", "app-second")])),
            None,
        )
        .unwrap_err();
    assert!(matches!(e, ReloadError::AppsChanged(_)), "{e}");
    assert!(e.to_string().contains("app `second` was added"), "{e}");
    assert_eq!(
        get_as(&c, &gw.run_url(RUN), &b).await.status,
        StatusCode::UNAUTHORIZED
    );

    // The same app, its key now from a variable: a different key source is a different app.
    let moved = format!(
        "[[apps]]\nname = \"main\"\napi_key_env = \"MAIN_KEY\"\nbase_url = \"{}\"\n\n{}",
        up.base_url(),
        a.entry
    );
    let e = gw
        .gateway
        .reload(Ok(config_with_env(&moved, &[("MAIN_KEY", OLD_KEY)])), None)
        .unwrap_err();
    assert!(e.to_string().contains("key source of app `main`"), "{e}");

    // A file that does not load changes nothing either.
    let bad = RawConfig::parse("[cache]\nrunning_ttl = \"soon\"\n").unwrap_err();
    let loaded = Err(dify_gateway::config::ConfigError::Parse {
        path: "gw.toml".into(),
        error: bad,
    });
    assert!(gw.gateway.reload(loaded, None).is_err());
    assert_eq!(
        get_as(&c, &gw.run_url(RUN), &a).await.status,
        StatusCode::OK
    );

    assert_eq!(reloads_counted(&c, &gw, "apps_changed").await, "2");
    assert_eq!(reloads_counted(&c, &gw, "invalid_config").await, "1");
    assert_eq!(reloads_counted(&c, &gw, "ok").await, "0");
    let report = get(&c, &gw.admin_url("/admin/reload")).await.json();
    assert_eq!(report["reloads"], 3);
    assert_eq!(report["last"]["result"], "invalid_config");
    let error = report["last"]["error"].as_str().unwrap();
    assert!(
        error.contains("gw.toml") && error.contains("cache.running_ttl"),
        "{error}"
    );
}

/// A reload asked for through [`dify_gateway::Reload`] re-reads the file as the binary does on
/// SIGHUP: a rotated key is probed at once (no periodic probes run here), and a file that no
/// longer loads is refused and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_requests_reread_the_file_and_probe_a_rotated_key_at_once() {
    use dify_gateway::config::Overrides;
    use dify_gateway::{Reload, RunOptions};
    use futures_util::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("dify-key");
    std::fs::write(&key_file, format!("{OLD_KEY}\n")).unwrap();
    let file = dir.path().join("gw.toml");
    let up = MockDify::start(OLD_KEY).await.unwrap();
    std::fs::write(&file, app_toml(&up, &key_file, "")).unwrap();
    let load = {
        let file = file.clone();
        move || {
            RawConfig::from_file(&file)?.validate(
                &Overrides {
                    listen: Some("127.0.0.1:0".into()),
                    admin_listen: Some("127.0.0.1:0".into()),
                    ..Overrides::default()
                },
                Some(&file),
                &|_| None,
            )
        }
    };
    let (ask, asked) = tokio::sync::mpsc::unbounded_channel::<()>();
    let requests =
        futures_util::stream::unfold(
            asked,
            |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
        )
        .boxed();
    let gw = spawn_gateway_with(
        load().expect("the file validates"),
        RunOptions {
            access_log: None,
            reload: Some(Reload {
                requests,
                load: std::sync::Arc::new(load),
            }),
            probes: false,
        },
    )
    .await;
    let key_health = || gw.gateway.readiness().report().apps[0].key;
    assert_eq!(key_health(), "unknown");

    std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap();
    up.set_keys(&[NEW_KEY]);
    ask.send(()).unwrap();
    eventually("the rotated key to be probed", || key_health() == "ok").await;
    assert_eq!(sent_key(&up), format!("Bearer {NEW_KEY}"));
    let report = gw.gateway.reloads().report();
    assert_eq!(report.reloads, 1);
    assert_eq!(report.last.unwrap().applied.unwrap().keys_rotated, ["main"]);

    std::fs::write(&file, "[cache]\nrunning_ttl = \"soon\"\n").unwrap();
    ask.send(()).unwrap();
    eventually("the second reload", || {
        gw.gateway.reloads().report().reloads == 2
    })
    .await;
    let last = gw.gateway.reloads().report().last.unwrap();
    assert_eq!(last.result, "invalid_config");
    assert!(last.error.unwrap().contains("gw.toml"));
    let c = client();
    assert_eq!(reloads_counted(&c, &gw, "invalid_config").await, "1");
    assert_eq!(reloads_counted(&c, &gw, "ok").await, "1");
}

/// A fetch loads its key once: when the key rotates between its attempts, the retry still
/// carries the key (and so the shared-tier tag) the fetch started with.
#[tokio::test]
async fn a_retry_after_a_rotation_carries_the_key_its_fetch_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("dify-key");
    std::fs::write(&key_file, format!("{OLD_KEY}\n")).unwrap();
    let up = MockDify::start(OLD_KEY).await.unwrap();
    up.set_keys(&[OLD_KEY, NEW_KEY]);
    let t = team("t", "main");
    let toml = app_toml(&up, &key_file, &t.entry);
    let gw = spawn_gateway(config_with_env(&toml, &[])).await;
    let c = client();
    let run = new_run();
    let path = format!("/v1/workflows/run/{run}");
    up.set(&run, Reply::run(&run, "\"succeeded\""));
    // The first attempt is held, then fails with a retryable 503; the second succeeds.
    up.fail_next(
        &path,
        vec![Reply::dify_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "try again",
        )],
    );
    up.set_delay(Duration::from_millis(300));
    let in_flight = {
        let (c, url, auth) = (c.clone(), gw.run_url(&run), format!("Bearer {}", t.token));
        tokio::spawn(
            async move { request(&c, Method::GET, &url, &[("authorization", &auth)]).await },
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.path_hits(&path) == 0 {
        assert!(
            Instant::now() < deadline,
            "the fetch never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap();
    let applied = gw
        .gateway
        .reload(Ok(config_with_env(&toml, &[])), None)
        .expect("rotation applies");
    assert_eq!(applied.keys_rotated, ["main"]);
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    let keys: Vec<String> = up
        .requests_to(&path)
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        [format!("Bearer {OLD_KEY}"), format!("Bearer {OLD_KEY}")]
    );
}

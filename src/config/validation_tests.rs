//! Values that are valid TOML but wrong, and where their errors point.

use super::tests::key_env;
use super::*;

fn validate(toml: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    RawConfig::parse(toml)
        .unwrap()
        .validate(overrides, Some(Path::new("gw.toml")), &key_env)
}

#[test]
fn terminal_statuses_must_be_dify_terminal_words() {
    let e = validate(
        "[cache]\nterminal_statuses = [\"succeeded\", \"succeded\"]\n",
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`succeded` is not a Dify run status"), "{e}");
    assert!(
        e.contains("succeeded, failed, stopped, partial-succeeded"),
        "the known statuses are listed: {e}"
    );
    assert!(e.contains("line 2, column 35"), "{e}");
    for word in NON_TERMINAL_STATUSES {
        let e = validate(
            &format!("[cache]\nterminal_statuses = [\"{word}\"]\n"),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("`{word}` is not terminal")), "{e}");
    }
    let ok = validate(
        "[cache]\nterminal_statuses = [\"succeeded\", \"stopped\"]\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(ok.cache.terminal_statuses, ["succeeded", "stopped"]);
}

#[test]
fn listen_addresses_take_names_and_bare_ports() {
    assert_eq!(
        parse_listen(":8080").unwrap(),
        "0.0.0.0:8080".parse().unwrap()
    );
    assert_eq!(
        parse_listen("localhost:8080").unwrap(),
        "127.0.0.1:8080".parse().unwrap()
    );
    assert_eq!(
        parse_listen("[::1]:80").unwrap(),
        "[::1]:80".parse().unwrap()
    );
    assert!(parse_listen("8080").unwrap_err().contains("no port"));
    assert!(parse_listen("::1:80").unwrap_err().contains("brackets"));
    assert!(parse_listen("host:http")
        .unwrap_err()
        .contains("not a port"));
}

#[test]
fn an_overridden_value_is_blamed_on_its_flag_or_variable() {
    let mut overrides = Overrides {
        listen: Some("nowhere".into()),
        ..Overrides::default()
    };
    let e = validate("[server]\nlisten = \"127.0.0.1:1\"\n", &overrides).unwrap_err();
    assert!(
        matches!(
            &e,
            ConfigError::Invalid {
                key: "--listen",
                file: None,
                ..
            }
        ),
        "{e:?}"
    );
    overrides.origins.listen = "DIFY_GATEWAY_LISTEN";
    let e = validate("", &overrides).unwrap_err().to_string();
    assert!(
        e.starts_with("invalid value for `DIFY_GATEWAY_LISTEN`:"),
        "{e}"
    );
    // The same value in the file is the file's.
    let e = validate("[server]\nlisten = \"nowhere\"\n", &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`server.listen` in gw.toml: line 2, column 10"),
        "{e}"
    );
}

#[test]
fn a_key_with_whitespace_is_blamed_on_where_it_came_from() {
    let spaced = |name: &str| (name == API_KEY_ENV).then(|| "app-abc def".to_owned());
    let e = RawConfig::default()
        .validate(&Overrides::default(), Some(Path::new("gw.toml")), &spaced)
        .unwrap_err();
    assert!(
        matches!(
            &e,
            ConfigError::Invalid {
                key: API_KEY_ENV,
                file: None,
                ..
            }
        ),
        "{e:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "app-abc def\n").unwrap();
    let e = validate(
        &format!("[upstream]\napi_key_file = \"{}\"\n", key.display()),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            ConfigError::Invalid {
                key: "upstream.api_key_file",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.to_string().contains("abc def"), "{e}");
}

#[test]
fn apps_remember_where_their_key_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "app-from-file").unwrap();
    let c = RawConfig::parse(&format!(
        "[[apps]]\nname = \"a\"\napi_key_env = \"A_KEY\"\n[[apps]]\nname = \"b\"\napi_key_file = \"{}\"\n\
         [[clients]]\nname = \"c\"\ntoken_sha256 = \"{}\"\napp = \"a\"\n",
        key.display(),
        "0".repeat(64)
    ))
    .unwrap()
    .validate(&Overrides::default(), None, &|n| {
        (n == "A_KEY").then(|| "app-from-env".to_owned())
    })
    .unwrap();
    assert_eq!(c.apps[0].key_source, KeySource::Env("A_KEY".into()));
    assert_eq!(c.apps[1].key_source, KeySource::File(key));
}

#[test]
fn redacted_urls_keep_neither_userinfo_nor_query() {
    assert_eq!(
        redact_url("https://user:pw@dify.example:8443/v1?token=t#f"),
        "https://***@dify.example:8443/v1"
    );
    assert_eq!(
        redact_url("redis://:pw@cache:6379/0"),
        "redis://***@cache:6379/0"
    );
    assert_eq!(redact_url("app-not-a-url"), "<not a URL>");
}

const CLIENT: &str = "[[clients]]\nname = \"team-a\"\ntoken_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\napp = \"default\"\n";

#[test]
fn clients_turn_isolation_on_by_default_and_carry_their_start_limits() {
    let open = validate("", &Overrides::default()).unwrap();
    assert!(!open.apps[0].isolate_clients);
    let c = validate(CLIENT, &Overrides::default()).unwrap();
    assert!(c.apps[0].isolate_clients);
    assert!(!c.clients[0].read_app_logs);
    assert_eq!(c.clients[0].starts, StartLimits::default());
    let c = validate(
        &format!("{CLIENT}runs_per_minute = 30\nmax_open_streams = 4\nread_app_logs = true\n"),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(
        c.clients[0].starts.runs_per_minute.map(|n| n.get()),
        Some(30)
    );
    assert_eq!(
        c.clients[0].starts.max_open_streams.map(|n| n.get()),
        Some(4)
    );
    assert!(c.clients[0].read_app_logs);
    let off = validate(
        &format!(
            "[[apps]]\nname = \"default\"\napi_key_env = \"{API_KEY_ENV}\"\nisolate_clients = false\n{CLIENT}"
        ),
        &Overrides::default(),
    )
    .unwrap();
    assert!(!off.apps[0].isolate_clients);
    assert_eq!(c.clients[0].quota, Default::default());
    let q = validate(
        &format!("{CLIENT}quota_runs_per_day = 500\nquota_tokens_per_day = 5000000000\n"),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(q.clients[0].quota.runs_per_day.map(|n| n.get()), Some(500));
    assert_eq!(
        q.clients[0].quota.tokens_per_day.map(|n| n.get()),
        Some(5_000_000_000)
    );
    for key in [
        "runs_per_minute",
        "max_open_streams",
        "quota_runs_per_day",
        "quota_tokens_per_day",
    ] {
        let e = validate(&format!("{CLIENT}{key} = 0\n"), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("clients.{key}")) && e.contains("at least 1"),
            "{e}"
        );
    }
}

#[test]
fn webhook_delivery_settings_are_checked() {
    let ok = validate("", &Overrides::default()).unwrap();
    assert_eq!(ok.webhooks, WebhooksConfig::default());
    assert_eq!(ok.webhooks.retry_base_delay, DEFAULT_RETRY_BASE_DELAY);
    assert_eq!(ok.webhooks.max_attempts, DEFAULT_MAX_ATTEMPTS);
    for (toml, key, says) in [
        ("max_attempts = 0", "webhooks.max_attempts", "above zero"),
        (
            "retry_base_delay = \"0s\"",
            "webhooks.retry_base_delay",
            "above zero",
        ),
        ("timeout = \"0s\"", "webhooks.timeout", "above zero"),
        ("max_pending = 0", "webhooks.max_pending", "above zero"),
        (
            "retry_base_delay = \"10s\"\nmax_delay = \"5s\"",
            "webhooks.max_delay",
            "at least webhooks.retry_base_delay",
        ),
    ] {
        let e = validate(&format!("[webhooks]\n{toml}\n"), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(says), "{toml}: {e}");
    }
    let e = RawConfig::parse("[webhooks]\nretry = 3\n").unwrap_err();
    assert!(format!("{e:?}").contains("unknown key `retry`"), "{e:?}");
}

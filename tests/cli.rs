//! The binary's start-up contract: key from the environment only, config errors named, a
//! check mode, and a real serve-and-stop cycle.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dify-gateway");

fn gateway() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("DIFY_API_KEY")
        .env_remove("DIFY_GATEWAY_CONFIG")
        .env_remove("DIFY_GATEWAY_LISTEN")
        .env_remove("DIFY_GATEWAY_UPSTREAM")
        .env_remove("DIFY_GATEWAY_LOG_FORMAT");
    c
}

#[test]
fn starting_without_a_key_fails_clearly() {
    let out = gateway().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DIFY_API_KEY"), "{err}");
}

#[test]
fn there_is_no_flag_for_the_key() {
    let out = gateway().args(["--api-key", "x"]).output().unwrap();
    assert!(!out.status.success());
    let help = gateway().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(!text.to_lowercase().contains("api-key"), "{text}");
}

#[test]
fn check_config_validates_the_example_and_names_bad_keys() {
    let ok = gateway()
        .args(["--config", "config/dify-gateway.toml", "--check-config"])
        .env("DIFY_API_KEY", "app-x")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[cache]\nrunning_ttl = \"fast\"\n").unwrap();
    let out = gateway()
        .args(["--config", bad.to_str().unwrap(), "--check-config"])
        .env("DIFY_API_KEY", "app-x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("running_ttl") && err.contains("bad.toml"),
        "{err}"
    );

    std::fs::write(&bad, "[cache]\nmax_byts = 5\n").unwrap();
    let out = gateway()
        .args(["--config", bad.to_str().unwrap(), "--check-config"])
        .env("DIFY_API_KEY", "app-x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_byts"), "{err}");
}

#[test]
fn serves_and_exits_zero_on_sigterm() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = gateway()
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9/v1",
        ])
        .env("DIFY_API_KEY", "app-clitest-secret")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the child if an assertion below fails, so no gateway outlives the test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let pid = child.id();
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut first = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        first.push_str(&line);
        if line.contains("serving") {
            break;
        }
    }
    assert!(first.contains("serving"), "{first}");
    assert!(
        first.contains("NO CLIENTS CONFIGURED"),
        "open mode is announced: {first}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("gateway did not listen: {e}"),
        }
    };
    use std::io::{Read, Write};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let probe = gateway()
        .args(["--health-probe", &format!("127.0.0.1:{port}")])
        .status()
        .unwrap();
    assert!(probe.success());

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.0.wait().unwrap();
    assert_eq!(code.code(), Some(0));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let all = rest.join("\n");
    assert!(!all.contains("clitest-secret") && !first.contains("clitest-secret"));
    assert!(
        all.contains("INFO access: request_id=") && all.contains("path=/healthz status=200"),
        "the access line reaches stdout by exit: {all}"
    );
    let probe = gateway()
        .args(["--health-probe", &format!("127.0.0.1:{port}")])
        .status()
        .unwrap();
    assert!(!probe.success(), "probe fails once the gateway is gone");
}

#[test]
fn gen_token_prints_a_token_and_its_config_entry() {
    let out = gateway()
        .args(["gen-token", "--client", "team-a", "--app", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text
        .split_whitespace()
        .find(|w| w.starts_with("dgw_"))
        .expect("a token is printed");
    let digest = dify_gateway::clients::token_sha256_hex(token);
    assert!(
        text.contains(&format!("token_sha256 = \"{digest}\"")),
        "{text}"
    );
    // The printed entry is a valid config.
    let entry = &text[text.find("[[clients]]").unwrap()..];
    let raw = dify_gateway::config::RawConfig::from_toml(entry).unwrap();
    let cfg = raw
        .validate(&Default::default(), None, &|n| {
            (n == "DIFY_API_KEY").then(|| "app-x".to_owned())
        })
        .unwrap();
    assert_eq!(cfg.clients[0].name, "team-a");
}

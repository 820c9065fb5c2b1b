//! The front door: client tokens, app isolation, rate limits, the upstream concurrency cap,
//! token revocation by reload, TLS with certificate reload, and hostile request shapes.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dify_gateway::clients::{generate_token, token_sha256_hex};
use dify_gateway::config::{Overrides, RawConfig, API_KEY_ENV};
use dify_gateway::mock::{MockDify, Reply};
use http::{Method, StatusCode};

struct Team {
    token: String,
    entry: String,
}

fn team(name: &str, app: &str, extra: &str) -> Team {
    let token = generate_token().unwrap();
    let entry = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\napp = \"{app}\"\n{extra}\n",
        token_sha256_hex(&token)
    );
    Team { token, entry }
}

fn bearer(t: &Team) -> String {
    format!("Bearer {}", t.token)
}

/// Two apps on two mock upstreams with different keys; env lookup serves both keys.
fn two_app_config(a: &MockDify, b: &MockDify, clients: &str) -> dify_gateway::Config {
    let toml = format!(
        "[[apps]]\nname = \"alpha\"\napi_key_env = \"KEY_ALPHA\"\nbase_url = \"{}\"\n\n[[apps]]\nname = \"beta\"\napi_key_env = \"KEY_BETA\"\nbase_url = \"{}\"\n\n{clients}",
        a.base_url(),
        b.base_url()
    );
    config_with_env(
        &toml,
        &[
            ("KEY_ALPHA", "app-alpha-key-111"),
            ("KEY_BETA", "app-beta-key-222"),
        ],
    )
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_and_cost_nothing() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let t = team("team-a", "default", "");
    let gw = spawn_gateway(config(&up, &t.entry)).await;
    let c = client();
    for auth in [
        None,
        Some("Bearer wrong-token"),
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer "),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        for url in [gw.run_url(RUN), gw.run_url("not-a-uuid")] {
            let got = request(&c, Method::GET, &url, &headers).await;
            assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{auth:?} {url}");
            assert_eq!(got.json()["code"], "unauthorized");
            assert_eq!(got.json()["status"], 401);
            assert!(got
                .header("www-authenticate")
                .unwrap()
                .starts_with("Bearer"));
        }
    }
    assert_eq!(up.total(), 0);
    assert_eq!(gw.gateway.cache().stats().entries, 0);
    let ok = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("authorization", &bearer(&t))],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    // The client's token never reaches the upstream; the app key does.
    let seen = up.last_headers().unwrap();
    assert_eq!(seen["authorization"], format!("Bearer {KEY}").as_str());
    assert!(!format!("{seen:?}").contains(&t.token));
    // Liveness needs no token.
    assert_eq!(get(&c, &gw.url("/healthz")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn clients_of_different_apps_never_share_an_entry() {
    let alpha = MockDify::start("app-alpha-key-111").await.unwrap();
    let beta = MockDify::start("app-beta-key-222").await.unwrap();
    alpha.set(
        RUN,
        Reply::ok_json(dify_gateway::mock::run_body(RUN, "\"succeeded\"", 100)),
    );
    // The same run id is unknown to app beta (Dify scopes runs to the key's app).
    let (ta, tb) = (team("team-a", "alpha", ""), team("team-b", "beta", ""));
    let gw = spawn_gateway(two_app_config(
        &alpha,
        &beta,
        &format!("{}{}", ta.entry, tb.entry),
    ))
    .await;
    let c = client();
    let a1 = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("authorization", &bearer(&ta))],
    )
    .await;
    assert_eq!((a1.status, a1.x_cache()), (StatusCode::OK, "MISS"));
    let a2 = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("authorization", &bearer(&ta))],
    )
    .await;
    assert_eq!(a2.x_cache(), "HIT");
    let b1 = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("authorization", &bearer(&tb))],
    )
    .await;
    assert_eq!((b1.status, b1.x_cache()), (StatusCode::NOT_FOUND, "MISS"));
    assert_ne!(b1.body, a1.body);
    assert_eq!(alpha.hits(RUN), 1);
    assert_eq!(beta.hits(RUN), 1);
    assert_eq!(
        alpha.last_headers().unwrap()["authorization"],
        "Bearer app-alpha-key-111"
    );
    assert_eq!(
        beta.last_headers().unwrap()["authorization"],
        "Bearer app-beta-key-222"
    );
    // Purge for one app leaves the other app's entry alone.
    let purged = request(
        &c,
        Method::DELETE,
        &gw.admin_url(&format!("/admin/cache/runs/{RUN}?app=beta")),
        &[],
    )
    .await;
    assert_eq!(purged.status, StatusCode::OK);
    let a3 = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("authorization", &bearer(&ta))],
    )
    .await;
    assert_eq!(a3.x_cache(), "HIT");
    let dbg = format!("{:?}", two_app_config(&alpha, &beta, &ta.entry));
    assert!(!dbg.contains("alpha-key") && !dbg.contains("beta-key"));
}

#[tokio::test]
async fn several_apps_without_clients_is_a_config_error() {
    let alpha = MockDify::start("k").await.unwrap();
    let r = std::panic::catch_unwind(|| two_app_config(&alpha, &alpha, ""));
    assert!(r.is_err());
    let err = RawConfig::from_toml("[[apps]]\nname = \"a\"\napi_key_env = \"X\"\n[[apps]]\nname = \"b\"\napi_key_env = \"X\"\n")
        .unwrap()
        .validate(&Overrides::default(), None, &|_| Some("k".into()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("clients"), "{err}");
    let inline =
        RawConfig::from_toml("[[apps]]\nname = \"a\"\napi_key = \"app-inline\"\n").unwrap_err();
    assert!(inline.contains("api_key"), "{inline}");
    let _ = API_KEY_ENV;
}

#[tokio::test]
async fn rate_limits_are_per_client_with_retry_after() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let slow = team("slow", "default", "rate_per_second = 1\nburst = 2");
    let free = team("free", "default", "");
    let gw = spawn_gateway(config(&up, &format!("{}{}", slow.entry, free.entry))).await;
    let c = client();
    let h = [("authorization", bearer(&slow))];
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for _ in 0..2 {
        assert_eq!(
            request(&c, Method::GET, &gw.run_url(RUN), &h).await.status,
            StatusCode::OK
        );
    }
    let limited = request(&c, Method::GET, &gw.run_url(RUN), &h).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.json()["code"], "too_many_requests");
    assert_eq!(limited.json()["status"], 429);
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));
    // Another client is not affected.
    for _ in 0..5 {
        let got = request(
            &c,
            Method::GET,
            &gw.run_url(RUN),
            &[("authorization", &bearer(&free))],
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let m = get(&c, &gw.admin_url("/metrics")).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("dify_gateway_rejected_total{reason=\"rate_limit\"} 1"),
        "{text}"
    );
    assert!(text.contains("client=\"slow\""));
    assert!(!text.contains(&slow.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_concurrency_is_capped_and_excess_gets_503() {
    let up = spawn_upstream().await;
    up.set_delay(Duration::from_millis(600));
    let gw = spawn_gateway(config(
        &up,
        "[upstream]\nmax_concurrent = 2\nqueue_timeout = \"100ms\"\n",
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let id = new_run();
        up.set(&id, Reply::run(&id, "\"succeeded\""));
        let url = gw.run_url(&id);
        tasks.push(tokio::spawn(async move { get(&client(), &url).await }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        let got = t.await.unwrap();
        match got.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                overloaded += 1;
                assert_eq!(got.json()["code"], "overloaded");
                assert!(got.header("retry-after").is_some());
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, overloaded), (2, 4));
    assert_eq!(up.total(), 2);
    // Nothing about the refused ones was cached.
    assert_eq!(gw.gateway.cache().stats().entries, 2);
}

#[tokio::test]
async fn a_revoked_token_stops_working_at_once_after_reload() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let (keep, revoke) = (team("keep", "default", ""), team("revoke", "default", ""));
    let gw = spawn_gateway(config(&up, &format!("{}{}", keep.entry, revoke.entry))).await;
    let c = client();
    for t in [&keep, &revoke] {
        let got = request(
            &c,
            Method::GET,
            &gw.run_url(RUN),
            &[("authorization", &bearer(t))],
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let n = gw
        .gateway
        .reload(Ok(config(&up, &keep.entry)), None)
        .unwrap()
        .clients;
    assert_eq!(n, 1);
    let gone = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("authorization", &bearer(&revoke))],
    )
    .await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
    let still = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[("authorization", &bearer(&keep))],
    )
    .await;
    assert_eq!((still.status, still.x_cache()), (StatusCode::OK, "HIT"));
}

/// Sends raw bytes and returns the raw answer (up to close or 2 s).
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_request_shapes_never_reach_the_upstream() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let gw = spawn_gateway(config(&up, "")).await;
    let addr = gw.addr;
    let answers = tokio::task::spawn_blocking(move || {
        let long = "a".repeat(20_000);
        vec![
            raw(addr, format!("GET /v1/workflows/run/{RUN} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").as_bytes()),
            raw(addr, format!("GET /v1/workflows/run/{RUN} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello").as_bytes()),
            raw(addr, b"GET /v1/workflows/run/..%2F..%2Fparameters HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            raw(addr, b"GET /v1/workflows/run/%2e%2e/%2e%2e/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            raw(addr, b"GET /v1/workflows/run/../../info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            raw(addr, b"GET //v1//workflows/run/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            raw(addr, format!("GET /v1/workflows/run/{long} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()),
            raw(addr, format!("GET /v1/workflows/run/{RUN} HTTP/1.1\r\nHost: x\r\nX-Big: {long}\r\nConnection: close\r\n\r\n").as_bytes()),
            raw(addr, b"GET http://evil.example/v1/parameters HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"),
            raw(addr, format!("GET /v1/workflows/run/{RUN} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n").as_bytes()),
        ]
    })
    .await
    .unwrap();
    let status = |a: &str| a.split(' ').nth(1).unwrap_or("").to_owned();
    assert_eq!(status(&answers[0]), "400", "CL+TE: {}", answers[0]);
    assert_eq!(status(&answers[1]), "400", "two CLs: {}", answers[1]);
    assert_eq!(status(&answers[2]), "400");
    assert_eq!(status(&answers[3]), "404");
    assert_eq!(status(&answers[4]), "404");
    // Slashes merged as Dify's nginx does: `/v1/workflows/run/x`, whose id is not a UUID.
    assert_eq!(status(&answers[5]), "400");
    assert!(
        ["414", "431", "400"].contains(&status(&answers[6]).as_str()),
        "{}",
        &answers[6][..80.min(answers[6].len())]
    );
    assert_eq!(status(&answers[7]), "431");
    assert_eq!(status(&answers[8]), "404");
    assert_eq!(status(&answers[9]), "400", "TE+CL: {}", answers[9]);
    assert!(answers[0]
        .to_ascii_lowercase()
        .contains("connection: close"));
    assert_eq!(up.total(), 0, "a hostile request reached the upstream");
    // Still serving, and the upstream sees its own Host, not the client's.
    let c = client();
    let got = request(
        &c,
        Method::GET,
        &gw.run_url(RUN),
        &[
            ("host", "evil.example"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = up.last_headers().unwrap();
    assert_eq!(seen["host"], up.addr().to_string().as_str());
    assert!(seen.get("x-forwarded-host").is_none());
}

mod tls {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use rustls::pki_types::CertificateDer;

    fn self_signed() -> (String, String, CertificateDer<'static>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = ck.cert.der().clone();
        (ck.cert.pem(), ck.key_pair.serialize_pem(), der)
    }

    async fn https_get(
        root: &CertificateDer<'static>,
        port: u16,
        h2: bool,
    ) -> (StatusCode, http::Version) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let tls =
            rustls::ClientConfig::builder_with_provider(dify_gateway::upstream::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let conn = if h2 {
            b.enable_http2().build()
        } else {
            b.enable_http1().build()
        };
        let c: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(conn);
        let resp = c
            .get(
                format!("https://localhost:{port}/v1/workflows/run/{RUN}")
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        let v = resp.version();
        let s = resp.status();
        let _ = resp.into_body().collect().await;
        (s, v)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_https_over_h1_and_h2_and_reloads_the_certificate() {
        let up = spawn_upstream().await;
        up.set(RUN, Reply::run(RUN, "\"succeeded\""));
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, der1) = self_signed();
        let (cp, kp) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cp, cert).unwrap();
        std::fs::write(&kp, key).unwrap();
        let cfg = config(
            &up,
            &format!(
                "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nhandshake_timeout = \"1s\"\n",
                cp.display(),
                kp.display()
            ),
        );
        let gw = spawn_gateway(cfg).await;
        let port = gw.addr.port();
        assert_eq!(
            https_get(&der1, port, false).await,
            (StatusCode::OK, http::Version::HTTP_11)
        );
        assert_eq!(
            https_get(&der1, port, true).await,
            (StatusCode::OK, http::Version::HTTP_2)
        );

        // A plain-text client that never handshakes is cut after the handshake timeout.
        let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut buf = [0u8; 1];
        let cut = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
        )
        .await;
        assert!(
            matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
            "idle handshake not cut"
        );

        // Replace the files and reload: new handshakes get the new certificate.
        let (cert2, key2, der2) = self_signed();
        std::fs::write(&cp, cert2).unwrap();
        std::fs::write(&kp, key2).unwrap();
        gw.tls.as_ref().unwrap().reload().unwrap();
        assert_eq!(https_get(&der2, port, false).await.0, StatusCode::OK);
        // A broken file keeps the current certificate.
        std::fs::write(&cp, "not a certificate").unwrap();
        assert!(gw.tls.as_ref().unwrap().reload().is_err());
        assert_eq!(https_get(&der2, port, true).await.0, StatusCode::OK);
        let _ = Arc::new(());
    }
}

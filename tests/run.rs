//! `dify_gateway::run`, the one entry point the binary, the demo and these tests share: both
//! listeners serve until the caller's shutdown, the probes start with it when asked, and a start
//! that cannot set up says why.

mod common;

use common::*;
use dify_gateway::mock::Reply;
use dify_gateway::server::Drain;
use dify_gateway::{Listeners, RunError, RunOptions};
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};

async fn loopback() -> Listeners {
    Listeners {
        public: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        access_log: None,
        reload: None,
        probes: false,
    }
}

#[tokio::test]
async fn run_serves_both_listeners_until_shutdown_then_closes_both() {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let listeners = loopback().await;
    let addr = listeners.public.local_addr().unwrap();
    let admin = listeners.admin.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(dify_gateway::run(
        listeners,
        config(&up, ""),
        quiet(),
        async {
            let _ = stopped.await;
        },
    ));
    let c = client();
    let got = get(&c, &format!("http://{addr}/v1/workflows/run/{RUN}")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        get(&c, &format!("http://{admin}/healthz")).await.status,
        StatusCode::OK
    );

    stop.send(()).unwrap();
    let drain = served.await.unwrap().expect("the gateway starts");
    assert_eq!(drain, Drain::Complete);
    assert!(TcpStream::connect(addr).await.is_err());
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the admin listener stops with the public one"
    );
}

#[tokio::test]
async fn probes_start_with_the_gateway_when_asked() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway_with(
        config(&up, ""),
        RunOptions {
            probes: true,
            ..quiet()
        },
    )
    .await;
    let c = client();
    eventually("the first probe", || {
        gw.gateway.readiness().report().apps[0].key == "ok"
    })
    .await;
    let ready = get(&c, &gw.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert!(up.total() >= 1, "the probe reached the upstream");
}

#[tokio::test]
async fn a_certificate_that_cannot_be_read_stops_the_start() {
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let cfg = config(
        &up,
        &format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let listeners = loopback().await;
    let addr = listeners.public.local_addr().unwrap();
    let e = dify_gateway::run(listeners, cfg, quiet(), std::future::pending())
        .await
        .expect_err("no start without a certificate");
    assert!(matches!(e, RunError::Tls(_)), "{e}");
    assert!(e.to_string().contains("cert.pem"), "{e}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listeners are released"
    );
}

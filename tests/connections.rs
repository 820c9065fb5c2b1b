//! Connections that send nothing useful cannot hold the listeners: stalled clients of every
//! protocol are cut at the first-request deadline, idle ones at the idle timeout, a full listener
//! makes room for a newcomer, shutdown does not wait for idle clients, and the admin listener's
//! `/healthz` answers while all its slots are held.
//!
//! Timings are printed (`cargo test --test connections -- --nocapture`) and asserted only
//! against generous bounds.

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::time::{Duration, Instant};

use common::*;
use dify_gateway::mock::Reply;
use dify_gateway::server::Drain;
use http::StatusCode;
use raw::*;
use tokio::io::AsyncWriteExt;

/// Stalled connections per kind; each kind fills `max_connections` on its own.
const STALLED: usize = 16;

/// Bound on every "is it closed" wait: far above the deadlines used here, far below a hang.
const LIMIT: Duration = Duration::from_secs(5);

fn short_deadlines(extra: &str) -> String {
    format!("[server]\nheader_read_timeout = \"300ms\"\nmax_connections = {STALLED}\n{extra}")
}

/// A mock Dify that answers `RUN`, and a gateway in front of it with `toml` applied.
async fn gateway_for_run(toml: &str) -> (dify_gateway::mock::MockDify, TestGateway) {
    let up = spawn_upstream().await;
    up.set(RUN, Reply::run(RUN, "\"succeeded\""));
    let gw = spawn_gateway(config(&up, toml)).await;
    (up, gw)
}

/// An HTTP/2 connection that has asked for `RUN` and read the answer.
async fn h2_served(gw: &TestGateway) -> tokio::net::TcpStream {
    let mut h2 = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    h2.write_all(&h2_get(&format!("/v1/workflows/run/{RUN}")))
        .await
        .unwrap();
    read_h2_response(&mut h2).await;
    h2
}

/// Waits for every watched connection to be closed; the fastest and slowest cut.
async fn all_closed(
    label: &str,
    cuts: Vec<tokio::task::JoinHandle<Option<Duration>>>,
) -> (Duration, Duration) {
    let mut times = Vec::new();
    for c in cuts {
        let t = c.await.unwrap();
        assert!(
            t.is_some(),
            "{label}: a stalled connection was never closed"
        );
        times.extend(t);
    }
    (*times.iter().min().unwrap(), *times.iter().max().unwrap())
}

/// Opens `STALLED` connections of one kind, checks each is closed within `LIMIT` and that a
/// fresh client is served meanwhile; returns the slowest and fastest cut.
async fn stall_and_serve(gw: &TestGateway, stall: Stall) -> (Duration, Duration) {
    let start = Instant::now();
    let mut held = Vec::new();
    for _ in 0..STALLED {
        held.push(stalled(gw.addr, stall).await);
    }
    let cuts: Vec<_> = held
        .into_iter()
        .map(|s| tokio::spawn(closed_after(s, start, LIMIT)))
        .collect();
    // While they stall, a fresh client is served.
    let got = get(&client(), &gw.run_url(RUN)).await;
    assert_eq!(got.status, StatusCode::OK, "{stall:?}: fresh client");
    let served_after = start.elapsed();
    let (min, max) = all_closed(&format!("{stall:?}"), cuts).await;
    println!(
        "{stall:?}: {STALLED} held, cut after {min:?}..{max:?}; fresh client served after {served_after:?}"
    );
    (min, max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_of_every_kind_are_cut_at_the_first_request_deadline() {
    let (_up, gw) = gateway_for_run(&short_deadlines("")).await;
    for stall in Stall::ALL {
        let (_, slowest) = stall_and_serve(&gw, stall).await;
        assert!(slowest < Duration::from_secs(3), "{stall:?}: {slowest:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_that_handshake_and_stall_are_cut_at_the_same_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed();
    let (cp, kp) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cp, cert).unwrap();
    std::fs::write(&kp, key).unwrap();
    // The handshake timeout is long: the first-request deadline is what cuts them.
    let (_up, gw) = gateway_for_run(&short_deadlines(&format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nhandshake_timeout = \"10s\"\n",
        cp.display(),
        kp.display()
    )))
    .await;
    for (label, alpn, first) in [
        (
            "tls, nothing after the handshake",
            &[b"h2".as_slice(), b"http/1.1"][..],
            &b""[..],
        ),
        (
            "tls h2, one byte after the handshake",
            &[b"h2".as_slice()][..],
            &b"P"[..],
        ),
        (
            "tls h1, partial head",
            &[b"http/1.1".as_slice()][..],
            &Stall::PartialHead.bytes()[..],
        ),
    ] {
        let start = Instant::now();
        let mut cuts = Vec::new();
        for _ in 0..STALLED {
            let mut s = tls_connect(gw.addr, &der, alpn).await.expect("handshake");
            s.write_all(first).await.unwrap();
            s.flush().await.unwrap();
            cuts.push(tokio::spawn(closed_after(s, start, LIMIT)));
        }
        // A fresh TLS client completes a request meanwhile.
        let mut fresh = tls_connect(gw.addr, &der, &[b"http/1.1"])
            .await
            .expect("handshake");
        fresh
            .write_all(
                format!(
                    "GET /v1/workflows/run/{RUN} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            LIMIT,
            tokio::io::AsyncReadExt::read_to_end(&mut fresh, &mut answer),
        )
        .await;
        let served_after = start.elapsed();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{label}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)])
        );
        let (fastest, slowest) = all_closed(label, cuts).await;
        println!(
            "{label}: {STALLED} held, cut after {fastest:?}..{slowest:?}; fresh client served after {served_after:?}"
        );
        assert!(slowest < Duration::from_secs(3), "{label}: {slowest:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_makes_room_by_closing_the_longest_stalled_connection() {
    // The deadline is far away: only making room can let the newcomer in.
    let (_up, gw) =
        gateway_for_run("[server]\nheader_read_timeout = \"60s\"\nmax_connections = 8\n").await;
    let start = Instant::now();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(stalled(gw.addr, Stall::H2Preface).await);
    }
    // Each stalled client is admitted once the server has sent its SETTINGS.
    for s in &mut held {
        let f = read_frame(s, LIMIT).await.expect("the server's SETTINGS");
        assert_eq!(f.kind, SETTINGS);
    }
    let got = get(&client(), &gw.run_url(RUN)).await;
    assert_eq!(got.status, StatusCode::OK);
    let served_after = start.elapsed();
    // The oldest stalled connection gave up its slot; the others are still open.
    let oldest = held.remove(0);
    let cut = closed_after(oldest, start, LIMIT).await;
    assert!(cut.is_some(), "the oldest stalled connection is still open");
    for s in held.iter_mut() {
        let closed = closed_after(s, Instant::now(), Duration::from_millis(100)).await;
        assert!(
            closed.is_none(),
            "a younger stalled connection was closed too"
        );
    }
    println!(
        "8 stalled h2 connections filled the listener; the newcomer was served after {served_after:?}, the oldest closed after {:?}",
        cut.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_but_busy_ones_are_not() {
    let (up, gw) =
        gateway_for_run("[server]\nidle_timeout = \"300ms\"\nkeep_alive_timeout = \"5s\"\n").await;
    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    h1.write_all(format!("GET /v1/workflows/run/{RUN} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let start = Instant::now();
    let h1_cut = closed_after(h1, start, LIMIT).await;
    // HTTP/2: one request, then silence; the close comes with a GOAWAY.
    let mut h2 = h2_served(&gw).await;
    let start = Instant::now();
    let frames = frames_until_closed(&mut h2, true, LIMIT).await;
    let h2_cut = start.elapsed();
    let goaway = frames.iter().any(|f| f.kind == GOAWAY);
    println!("idle h1 closed after {h1_cut:?}, idle h2 after {h2_cut:?} (GOAWAY: {goaway})");
    assert!(
        h1_cut.is_some_and(|t| t < Duration::from_secs(3)),
        "{h1_cut:?}"
    );
    assert!(goaway, "the idle h2 client got no GOAWAY");
    assert!(h2_cut < Duration::from_secs(3), "{h2_cut:?}");
    // A request slower than the idle timeout is not cut.
    up.set_delay(Duration::from_millis(800));
    let id = new_run();
    up.set(&id, Reply::run(&id, "\"succeeded\""));
    assert_eq!(
        get(&client(), &gw.run_url(&id)).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_response_is_cut() {
    let up = spawn_upstream().await;
    let id = new_run();
    // Far more than the socket buffers of both ends hold.
    up.set(
        &id,
        Reply::run_sized(&id, "\"succeeded\"", 12 * 1024 * 1024),
    );
    let gw = spawn_gateway(config(
        &up,
        "[server]\nidle_timeout = \"300ms\"\nkeep_alive_timeout = \"300ms\"\n",
    ))
    .await;
    // A fixed receive buffer: the kernel does not grow it, so what the ends can hold stays far
    // below the body whatever this machine's TCP memory settings.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut s = socket.connect(gw.addr).await.unwrap();
    s.write_all(format!("GET /v1/workflows/run/{id} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Read nothing for a while: the server's writes block. The server's side is not observable
    // from here, so this waits on the wall clock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        LIMIT,
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got),
    )
    .await;
    assert!(
        read.is_ok(),
        "the stalled reader's connection is still open"
    );
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let body = got.len() - head_end;
    println!("stalled reader: {body} of {length} body bytes sent before the cut");
    assert!(body < length, "the whole response was sent");
}

/// HTTP/2 clients that leave their flow-control window at zero (and answer every PING, so they
/// look alive) hold a request in flight that can never finish: each is cut at
/// `max_response_time`, and a newcomer waiting for a slot of the full listener is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_opens_its_window_is_cut_at_max_response_time() {
    let (_up, gw) = gateway_for_run(
        "[server]\nmax_connections = 2\nidle_timeout = \"60s\"\nmax_response_time = \"500ms\"\nkeep_alive_interval = \"100ms\"\n",
    )
    .await;
    let start = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&h2_get_zero_window(&format!("/v1/workflows/run/{RUN}")))
            .await
            .unwrap();
        stalled.push(tokio::spawn(async move {
            let frames = frames_until_closed(&mut s, true, LIMIT).await;
            (start.elapsed(), frames)
        }));
    }
    // Both slots are held by requests in flight; the newcomer waits for one to be cut.
    let fresh = get(&client(), &gw.url("/healthz")).await;
    let served_after = start.elapsed();
    assert_eq!(fresh.status, StatusCode::OK);
    for s in stalled {
        let (cut, frames) = s.await.unwrap();
        let data = frames
            .iter()
            .filter(|f| f.kind == DATA)
            .map(|f| f.payload.len())
            .sum::<usize>();
        println!("zero-window h2 client: cut after {cut:?}, {data} body bytes sent");
        assert!(cut < Duration::from_secs(4), "{cut:?}");
        assert_eq!(data, 0, "a zero window let body bytes through");
    }
    println!("newcomer served after {served_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_does_not_answer_pings_is_cut() {
    let (_up, gw) = gateway_for_run("[server]\nidle_timeout = \"60s\"\nkeep_alive_interval = \"200ms\"\nkeep_alive_timeout = \"200ms\"\n").await;
    let mut h2 = h2_served(&gw).await;
    let start = Instant::now();
    let frames = frames_until_closed(&mut h2, false, LIMIT).await;
    let cut = start.elapsed();
    let pings = frames.iter().filter(|f| f.kind == PING).count();
    println!("silent h2 client: {pings} PING(s), closed after {cut:?}");
    assert!(pings >= 1);
    assert!(cut < Duration::from_secs(4), "{cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_to_idle_clients_and_does_not_wait_for_them() {
    let (_up, mut gw) =
        gateway_for_run("[server]\ndrain_timeout = \"30s\"\nkeep_alive_timeout = \"300ms\"\n")
            .await;
    // An idle HTTP/2 client.
    let mut h2 = h2_served(&gw).await;
    // An idle HTTP/1.1 keep-alive client, and one stalled in the protocol sniff.
    let c = client();
    assert_eq!(get(&c, &gw.run_url(RUN)).await.status, StatusCode::OK);
    let sniffing = stalled(gw.addr, Stall::OneByte).await;
    let start = Instant::now();
    gw.begin_shutdown();
    // It does not answer the PING that goes with the GOAWAY either.
    let frames = frames_until_closed(&mut h2, false, LIMIT).await;
    let goaway = frames.iter().any(|f| f.kind == GOAWAY);
    let drain = tokio::time::timeout(Duration::from_secs(10), gw.task)
        .await
        .expect("the drain ends well before drain_timeout")
        .unwrap();
    let took = start.elapsed();
    let sniff_cut = closed_after(sniffing, start, LIMIT).await;
    println!("shutdown with idle h1, idle h2 and a stalled client drained in {took:?} (GOAWAY: {goaway})");
    assert_eq!(drain, Drain::Complete);
    assert!(goaway, "the idle h2 client got no GOAWAY");
    assert!(sniff_cut.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_every_admin_slot_is_held() {
    // Deadlines far away: the slots are held for the whole test unless room is made.
    let (_up, gw) = gateway_for_run(
        "[server]\nheader_read_timeout = \"60s\"\nidle_timeout = \"60s\"\n[admin]\nmax_connections = 64\n",
    )
    .await;
    let start = Instant::now();
    // Half the slots stall in the sniff, half made one request and now idle.
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(stalled(gw.admin_addr, Stall::OneByte).await);
    }
    for _ in 0..32 {
        let mut s = tokio::net::TcpStream::connect(gw.admin_addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut b = [0u8; 512];
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut b).await.unwrap();
        assert!(b[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    for round in 0..3 {
        let t = Instant::now();
        let got = tokio::time::timeout(LIMIT, get(&client(), &gw.admin_url("/healthz")))
            .await
            .expect("/healthz answers while the admin slots are held");
        assert_eq!(got.status, StatusCode::OK);
        println!(
            "64 admin slots held; /healthz round {round} answered in {:?}",
            t.elapsed()
        );
    }
    println!("admin test took {:?}", start.elapsed());
    drop(held);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn accepted_sockets_have_tcp_keepalive() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(config(&up, "[server]\ntcp_keepalive = \"5s\"\n")).await;
    let s = stalled(gw.addr, Stall::OneByte).await;
    let client_port = s.local_addr().unwrap().port();
    // /proc/net/tcp lists the server's side of the connection with its timer: 2 is keepalive.
    let want_local = format!("0100007F:{:04X}", gw.addr.port());
    let want_remote = format!("0100007F:{client_port:04X}");
    let mut timer = None;
    for _ in 0..100 {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        timer = table.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 5 && f[1] == want_local && f[2] == want_remote)
                .then(|| f[5].split(':').next().unwrap_or("").to_owned())
        });
        if timer.as_deref() == Some("02") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        timer.as_deref(),
        Some("02"),
        "no keepalive timer on the accepted socket"
    );
}

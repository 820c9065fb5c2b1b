//! The request-driven connections against upstreams that keep, close, cut and multiplex them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::upstream::{Upstream, UpstreamError};

const KEY: &str = "app-inline-test-key";
const BODY: &str = r#"{"id":"r","status":"running"}"#;

fn upstream(base: &str, tweak: impl FnOnce(&mut Config)) -> Upstream {
    let mut cfg = Config::for_upstream(base, KEY).unwrap();
    tweak(&mut cfg);
    Upstream::new(&cfg.upstream, &cfg.apps[0]).unwrap()
}

fn idle_count(up: &Upstream) -> usize {
    let pool = up.inline.as_ref().expect("an http base has a pool");
    pool.inner.idle.lock().unwrap().len()
}

/// What a scripted connection does after reading request number `n` (0-based) on it.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// Answers `BODY` and keeps the connection.
    Answer,
    /// Answers `BODY`, then closes (without saying so in a header).
    AnswerAndClose,
    /// Closes without answering.
    Close,
    /// Sends a head promising 100 bytes, 10 of them, and closes.
    CutBody,
    /// Answers `204 No Content` and keeps the connection.
    NoContent,
    /// Resets the connection (`RST`) without answering.
    Reset,
}

/// A raw HTTP/1.1 upstream: every connection follows `script` request by request (the last
/// step repeats). Counts connections and keeps each request head it read.
struct Raw {
    base: String,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    /// Connections whose client end was closed (read EOF between requests).
    closed_by_client: Arc<AtomicUsize>,
}

async fn raw(script: Vec<Then>) -> Raw {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", l.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let closed_by_client = Arc::new(AtomicUsize::new(0));
    let (a, h, c) = (accepted.clone(), heads.clone(), closed_by_client.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s, script.clone(), h.clone(), c.clone()));
        }
    });
    Raw {
        base,
        accepted,
        heads,
        closed_by_client,
    }
}

async fn serve(
    mut s: TcpStream,
    script: Vec<Then>,
    heads: Arc<Mutex<Vec<String>>>,
    closed_by_client: Arc<AtomicUsize>,
) {
    let mut n = 0;
    loop {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => buf.push(byte[0]),
                _ => {
                    if buf.is_empty() {
                        closed_by_client.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
            }
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let length = head
            .to_ascii_lowercase()
            .split("\r\n")
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>())
            })
            .map_or(0, |v| v.unwrap());
        let mut body = vec![0u8; length];
        if s.read_exact(&mut body).await.is_err() {
            return;
        }
        heads.lock().unwrap().push(head);
        let step = script[n.min(script.len() - 1)];
        n += 1;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        match step {
            Then::Answer => s.write_all(answer.as_bytes()).await.unwrap(),
            Then::AnswerAndClose => {
                s.write_all(answer.as_bytes()).await.unwrap();
                return;
            }
            Then::Close => return,
            Then::Reset => {
                s.set_zero_linger().unwrap();
                return;
            }
            Then::NoContent => s
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap(),
            Then::CutBody => {
                let cut = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
                s.write_all(cut.as_bytes()).await.unwrap();
                return;
            }
        }
    }
}

async fn get(up: &Upstream) -> Result<crate::upstream::UpstreamAnswer, UpstreamError> {
    let uri = up.path_url("/workflows/run/r").unwrap();
    up.get(uri, None).await
}

#[tokio::test]
async fn sequential_gets_share_one_connection_in_origin_form_with_a_host() {
    let server = raw(vec![Then::Answer]).await;
    let up = upstream(&server.base, |_| {});
    for _ in 0..5 {
        let a = get(&up).await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, BODY.as_bytes());
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(idle_count(&up), 1);
    let heads = server.heads.lock().unwrap();
    assert_eq!(heads.len(), 5);
    let port = server
        .base
        .split(':')
        .nth(2)
        .unwrap()
        .trim_end_matches("/v1");
    for h in heads.iter() {
        assert!(h.starts_with("GET /v1/workflows/run/r HTTP/1.1\r\n"), "{h}");
        let lower = h.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
            "{h}"
        );
        assert!(
            lower.contains(&format!("\r\nauthorization: bearer {KEY}\r\n")),
            "{h}"
        );
    }
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
    let server = raw(vec![Then::AnswerAndClose]).await;
    let up = upstream(&server.base, |_| {});
    for i in 1..=3 {
        assert_eq!(get(&up).await.unwrap().status, StatusCode::OK);
        // The upstream's close reaches the idle connection before the next checkout.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), i);
    }
    assert_eq!(server.heads.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_reused_connection_closed_before_answering_is_sent_again_on_a_new_one() {
    // Each connection answers its first request and drops the second unanswered.
    let server = raw(vec![Then::Answer, Then::Close]).await;
    let up = upstream(&server.base, |_| {});
    assert_eq!(get(&up).await.unwrap().status, StatusCode::OK);
    // `get` is one exchange (no retry policy): the second try happens inside it.
    let a = get(&up).await.unwrap();
    assert_eq!((a.status, &a.body[..]), (StatusCode::OK, BODY.as_bytes()));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(server.heads.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_reused_connection_reset_before_answering_is_sent_again_on_a_new_one() {
    // Each connection answers its first request and resets on the second.
    let server = raw(vec![Then::Answer, Then::Reset]).await;
    let up = upstream(&server.base, |_| {});
    for _ in 0..3 {
        let a = get(&up).await.unwrap();
        assert_eq!((a.status, &a.body[..]), (StatusCode::OK, BODY.as_bytes()));
    }
    // The second and third GETs each met a reset and were answered on a new connection.
    assert_eq!(server.accepted.load(Ordering::SeqCst), 3);
    assert_eq!(server.heads.lock().unwrap().len(), 5);
}

#[tokio::test]
async fn a_body_cut_short_is_a_protocol_error_and_its_connection_is_not_reused() {
    let server = raw(vec![Then::CutBody]).await;
    let up = upstream(&server.base, |_| {});
    assert!(matches!(get(&up).await, Err(UpstreamError::Protocol)));
    assert_eq!(idle_count(&up), 0);
    assert!(matches!(get(&up).await, Err(UpstreamError::Protocol)));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_fresh_connection_closed_before_answering_is_not_sent_again() {
    let server = raw(vec![Then::Close]).await;
    let up = upstream(&server.base, |_| {});
    assert!(matches!(get(&up).await, Err(UpstreamError::Protocol)));
    assert_eq!(server.heads.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout_and_capped_in_number() {
    let server = raw(vec![Then::Answer]).await;
    let up = upstream(&server.base, |c| {
        c.upstream.pool_idle_timeout = Duration::from_millis(200);
        c.upstream.pool_max_idle_per_host = 2;
    });
    // Four at once need four connections; two are kept.
    let all = futures_util::future::join_all((0..4).map(|_| get(&up))).await;
    assert!(all
        .iter()
        .all(|a| a.as_ref().unwrap().status == StatusCode::OK));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 4);
    assert_eq!(server.closed_by_client.load(Ordering::SeqCst), 0, "not yet");
    assert_eq!(idle_count(&up), 2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.closed_by_client.load(Ordering::SeqCst), 2);
    // Nothing uses the pool; the idle time passes and the reaper closes the other two.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.closed_by_client.load(Ordering::SeqCst) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle connections still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(idle_count(&up), 0);
    // And the next request opens a new one.
    assert_eq!(get(&up).await.unwrap().status, StatusCode::OK);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_refused_connect_is_a_connect_failure() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", l.local_addr().unwrap());
    drop(l);
    let up = upstream(&base, |_| {});
    let e = get(&up).await.unwrap_err();
    assert!(
        matches!(
            e,
            UpstreamError::Connect {
                cause: crate::upstream::ConnectCause::Refused
            }
        ),
        "{e:?}"
    );
}

/// A TLS upstream that offers only HTTP/2 by ALPN, allowing `max_streams` concurrent streams
/// per connection: a GET is answered `BODY`; a POST's answer sends `BODY` and, when `hold`,
/// stays open (a stream in progress) until the test ends. Returns an app trusting it through
/// `ca_file`, the count of connections accepted and the CA file to remove.
async fn h2_upstream(
    max_streams: u32,
    hold: bool,
) -> (Upstream, Arc<AtomicUsize>, std::path::PathBuf) {
    use rustls::pki_types::pem::PemObject;

    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(ck.key_pair.serialize_pem().as_bytes())
            .unwrap();
    let mut server =
        rustls::ServerConfig::builder_with_provider(crate::upstream::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        assert_eq!(req.version(), http::Version::HTTP_2);
                        let (tx, rx) = tokio::sync::mpsc::channel::<
                            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                        >(1);
                        tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                            BODY.as_bytes(),
                        ))))
                        .await
                        .unwrap();
                        if req.method() == http::Method::POST && hold {
                            // The stream stays open as long as the server runs.
                            tokio::spawn(async move {
                                tx.closed().await;
                            });
                        }
                        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                            rx.recv().await.map(|f| (f, rx))
                        });
                        let body = http_body_util::StreamBody::new(frames);
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
            });
        }
    });
    let ca = std::env::temp_dir().join(format!(
        "dify-gateway-inline-{}-{port}.pem",
        std::process::id()
    ));
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let up = upstream(&format!("https://localhost:{port}/v1"), |c| {
        c.upstream.ca_file = Some(ca.clone());
    });
    (up, accepted, ca)
}

fn post() -> http::Request<crate::upstream::PassBody> {
    use http_body_util::BodyExt;

    let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{}"))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut post = http::Request::new(body);
    *post.method_mut() = http::Method::POST;
    post
}

/// An upstream that speaks only HTTP/2: the pool stands aside and the multiplexing clients
/// answer, one connection for the GETs and one for the passthroughs.
#[tokio::test]
async fn an_http2_upstream_is_served_by_the_multiplexing_client() {
    use http_body_util::BodyExt;

    let (up, accepted, ca) = h2_upstream(100, false).await;
    for _ in 0..3 {
        let a = get(&up).await.unwrap();
        assert_eq!((a.status, &a.body[..]), (StatusCode::OK, BODY.as_bytes()));
    }
    for _ in 0..2 {
        let resp = up.pass(post(), "/workflows/run").await.unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, BODY.as_bytes());
    }
    let _ = std::fs::remove_file(&ca);
    let pool = up.inline.as_ref().unwrap();
    assert!(pool.inner.multiplexed.load(Ordering::Relaxed));
    // The pool's one probe, then one connection for the GETs and one for the passthroughs.
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// Many first requests at once (a restart under load): one of them finds out that the upstream
/// speaks HTTP/2, the others wait for that rather than each shaking hands for nothing; against
/// an HTTP/1.1 upstream they then dial in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_probe_the_protocol_once() {
    let (up, accepted, ca) = h2_upstream(100, false).await;
    let gets: Vec<_> = (0..20)
        .map(|_| {
            let up = up.clone();
            tokio::spawn(async move { get(&up).await })
        })
        .collect();
    for g in gets {
        assert_eq!(g.await.unwrap().unwrap().status, StatusCode::OK);
    }
    let _ = std::fs::remove_file(&ca);
    // The probe, then the GETs' multiplexed connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    let server = raw(vec![Then::Answer]).await;
    let up = upstream(&server.base, |_| {});
    let gets: Vec<_> = (0..20)
        .map(|_| {
            let up = up.clone();
            tokio::spawn(async move { get(&up).await })
        })
        .collect();
    for g in gets {
        assert_eq!(g.await.unwrap().unwrap().body, BODY.as_bytes());
    }
    let n = server.accepted.load(Ordering::SeqCst);
    assert!((1..=20).contains(&n), "{n} connections");
}

/// Streams in progress fill their connection's concurrent-stream limit: the run-detail GETs,
/// on a connection of their own, are not queued behind them.
#[tokio::test]
async fn streams_filling_an_http2_connection_do_not_hold_up_the_gets() {
    use http_body_util::BodyExt;

    let (up, _accepted, ca) = h2_upstream(1, true).await;
    // The probe finds HTTP/2 first.
    get(&up).await.unwrap();
    let mut stream = up.pass(post(), "/workflows/run").await.unwrap().into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, BODY.as_bytes());
    for _ in 0..3 {
        let a = tokio::time::timeout(Duration::from_secs(5), get(&up))
            .await
            .expect("a GET queued behind an open stream")
            .unwrap();
        assert_eq!((a.status, &a.body[..]), (StatusCode::OK, BODY.as_bytes()));
    }
    let _ = std::fs::remove_file(&ca);
    drop(stream);
}

/// An exchange's future is moved whole into its deadline's timer on every miss: the handshake of
/// a new connection (a TLS session inside) is boxed so it does not size it (4,896 bytes with it
/// inline).
#[tokio::test]
async fn an_exchanges_future_stays_small() {
    let up = upstream("http://127.0.0.1:1/v1", |_| {});
    let uri = up.path_url("/workflows/run/r").unwrap();
    let creds = up.credentials();
    let size = std::mem::size_of_val(&up.exchange_until(uri, None, up.deadline(), &creds));
    assert!(
        size <= 3072,
        "Upstream::exchange_until's future is {size} bytes"
    );
}

/// A passed-through request (a body that streams up, an answer read by whoever holds it): the
/// answer's reader drives the connection, which goes back to the pool once the answer is read
/// to its end, and is closed if the answer is dropped before that.
#[tokio::test]
async fn a_passed_through_answer_returns_its_connection_only_when_read_to_its_end() {
    use http_body_util::BodyExt;

    let server = raw(vec![Then::Answer]).await;
    let up = upstream(&server.base, |_| {});
    let post = || {
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{\"inputs\":{}}"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut req = http::Request::new(body);
        *req.method_mut() = http::Method::POST;
        req
    };
    for _ in 0..3 {
        let resp = up.pass(post(), "/workflows/run").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, BODY.as_bytes());
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(idle_count(&up), 1);
    // An answer dropped unread: its connection cannot carry another request.
    drop(up.pass(post(), "/workflows/run").await.unwrap());
    assert_eq!(idle_count(&up), 0);
    let resp = up.pass(post(), "/workflows/run").await.unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    let heads = server.heads.lock().unwrap();
    assert!(
        heads[0].starts_with("POST /v1/workflows/run HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
}

/// An answer with no body (a `204`, like a stop or a delete) is never polled by whoever passes
/// it on: its connection goes back to the pool all the same.
#[tokio::test]
async fn a_passed_through_answer_without_a_body_returns_its_connection() {
    let server = raw(vec![Then::NoContent]).await;
    let up = upstream(&server.base, |_| {});
    for _ in 0..3 {
        let mut req = post();
        *req.method_mut() = http::Method::DELETE;
        let resp = up.pass(req, "/files/f").await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        drop(resp);
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(idle_count(&up), 1);
}

//! Raw clients for connection-level tests: sockets that stall at a chosen point, a minimal
//! HTTP/2 frame writer and reader, and a TLS client that trusts one certificate.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types this file looks at.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

/// Where a stalled client stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Connects and sends nothing.
    Silent,
    /// Sends `P`, the first byte of the HTTP/2 preface, which keeps the protocol sniff waiting.
    OneByte,
    /// Sends the whole HTTP/2 preface and an empty SETTINGS frame, then no request.
    H2Preface,
    /// Sends part of an HTTP/1.1 request head.
    PartialHead,
}

impl Stall {
    pub const ALL: [Stall; 4] = [
        Stall::Silent,
        Stall::OneByte,
        Stall::H2Preface,
        Stall::PartialHead,
    ];

    pub fn bytes(self) -> Vec<u8> {
        match self {
            Stall::Silent => Vec::new(),
            Stall::OneByte => b"P".to_vec(),
            Stall::H2Preface => {
                let mut b = H2_PREFACE.to_vec();
                b.extend(frame(SETTINGS, 0, 0, &[]));
                b
            }
            Stall::PartialHead => b"GET /v1/workflows/run/x HTTP/1.1\r\nHost: x\r\n".to_vec(),
        }
    }
}

/// Opens a connection and sends `stall`'s bytes.
pub async fn stalled(addr: SocketAddr, stall: Stall) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&stall.bytes()).await.expect("write");
    s
}

/// Reads (and discards) until the server closes the stream; the time since `from` at which it
/// did, or `None` when it was still open after `limit`.
pub async fn closed_after<S: AsyncRead + Unpin>(
    mut s: S,
    from: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::from_std(from + limit);
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(from.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut b = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    b.extend_from_slice(&stream.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The preface, SETTINGS and a complete `GET path` on stream 1, HPACK-encoded without Huffman.
pub fn h2_get(path: &str) -> Vec<u8> {
    // :method GET, :scheme http (static table), :path and :authority as literals without indexing.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 1, b'x']);
    let mut b = H2_PREFACE.to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[]));
    // END_STREAM | END_HEADERS
    b.extend(frame(HEADERS, 0x5, 1, &block));
    b
}

/// [`h2_get`], but the client's SETTINGS set SETTINGS_INITIAL_WINDOW_SIZE to zero: the server
/// may send the response's HEADERS and never a byte of its body.
pub fn h2_get_zero_window(path: &str) -> Vec<u8> {
    let get = h2_get(path);
    let rest = &get[H2_PREFACE.len() + 9..];
    let mut b = H2_PREFACE.to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0
    b.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]));
    b.extend_from_slice(rest);
    b
}

/// A frame as read: type, flags, stream id and payload.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads one frame; `None` at end of stream, on an error or after `limit`.
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<Frame> {
    let read = async {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    };
    tokio::time::timeout(limit, read).await.ok().flatten()
}

/// Reads frames until the response on stream 1 has ended.
pub async fn read_h2_response<S: AsyncRead + Unpin>(s: &mut S) -> Vec<Frame> {
    let mut seen = Vec::new();
    loop {
        let f = read_frame(s, Duration::from_secs(10))
            .await
            .expect("the response arrives");
        // END_STREAM on the response's HEADERS or DATA.
        let done = f.stream == 1 && (f.kind == HEADERS || f.kind == DATA) && f.flags & 0x1 != 0;
        seen.push(f);
        if done {
            return seen;
        }
    }
}

/// Reads frames until the server closes the connection (or `limit` passes), answering its PINGs
/// when `answer_pings`; returns the frames seen.
pub async fn frames_until_closed(
    s: &mut TcpStream,
    answer_pings: bool,
    limit: Duration,
) -> Vec<Frame> {
    let until = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    while let Some(f) = read_frame(s, until - tokio::time::Instant::now()).await {
        if answer_pings && f.kind == PING && f.flags & 0x1 == 0 {
            // Best effort: the server may be closing already.
            let _ = s.write_all(&frame(PING, 0x1, 0, &f.payload)).await;
        }
        seen.push(f);
    }
    seen
}

/// A self-signed certificate for `localhost`: PEM chain, PEM key and the DER to trust.
pub fn self_signed() -> (String, String, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = ck.cert.der().clone();
    (ck.cert.pem(), ck.key_pair.serialize_pem(), der)
}

/// Completes a TLS handshake with `addr`, trusting only `root`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(dify_gateway::upstream::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

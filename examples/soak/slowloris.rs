//! Slow clients beside the load: raw TCP connections that trickle a request head a byte at a
//! time, or send nothing at all, and how long the gateway lets them hold a connection.
//!
//! Invariant: each slow connection is given up by the soak after [`GIVE_UP`], so the phase ends
//! by itself; one still open then is reported as not cut.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A pair of slow connections (one trickling, one idle) is opened this often: 8 a minute.
const EVERY: Duration = Duration::from_secs(15);
/// Pause between trickled bytes.
const TRICKLE: Duration = Duration::from_millis(500);
/// The soak stops waiting for the gateway to cut a slow connection after this long (3× the
/// soak's `server.header_read_timeout`).
pub const GIVE_UP: Duration = Duration::from_secs(15);

/// How one slow connection ended.
#[derive(Debug, Clone)]
pub enum SlowEnd {
    /// The gateway closed it (read gave EOF or an error, or a write failed).
    Cut,
    /// The gateway answered; the status line.
    Answered(String),
    /// Still open when the soak gave up.
    StillOpen,
    /// The connection could not be opened.
    ConnectFailed,
}

/// One slow connection's story.
#[derive(Debug, Clone)]
pub struct SlowConn {
    pub trickle: bool,
    pub end: SlowEnd,
    pub held: Duration,
}

/// Opens slow connection pairs every [`EVERY`] until `stop` (none started in the last
/// [`GIVE_UP`] of `load`), then waits for the open ones to end.
pub async fn run(addr: SocketAddr, load: Duration, stop: Arc<AtomicBool>) -> Vec<SlowConn> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let mut next = t0 + Duration::from_secs(3);
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next && t0.elapsed() + GIVE_UP <= load {
            tasks.push(tokio::spawn(one(addr, true)));
            tasks.push(tokio::spawn(one(addr, false)));
            next += EVERY;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(c) = t.await {
            out.push(c);
        }
    }
    out
}

async fn one(addr: SocketAddr, trickle: bool) -> SlowConn {
    let t = Instant::now();
    let Ok(stream) = TcpStream::connect(addr).await else {
        return SlowConn {
            trickle,
            end: SlowEnd::ConnectFailed,
            held: t.elapsed(),
        };
    };
    let (mut r, mut w) = stream.into_split();
    let writer = async {
        if !trickle {
            return std::future::pending::<()>().await;
        }
        // The head never completes: a prefix, then header bytes forever.
        let prefix = b"GET /healthz HTTP/1.1\r\nHost: soak\r\nX-Slow: ";
        for b in prefix.iter().chain(std::iter::repeat(&b'a')) {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(TRICKLE).await;
        }
    };
    let reader = async {
        let mut buf = [0u8; 256];
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => SlowEnd::Cut,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                SlowEnd::Answered(text.lines().next().unwrap_or("").to_owned())
            }
        }
    };
    let end = tokio::select! {
        e = reader => e,
        _ = writer => SlowEnd::Cut,
        _ = tokio::time::sleep(GIVE_UP) => SlowEnd::StillOpen,
    };
    SlowConn {
        trickle,
        end,
        held: t.elapsed(),
    }
}

//! The body of every response the gateway sends: a buffer, a cache entry's bytes, an upstream
//! body passed through, or an event stream.
//!
//! Invariant: a body whose length is known says so exactly ([`Body::size_hint`]), so HTTP/1.1
//! answers carry `Content-Length`; a cache entry lends its bytes through its own reference count
//! (the hit path copies nothing and touches no other count), and only once the body is polled.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::cache::Stored;

/// Why a streamed body ended early.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A response body.
#[derive(Debug)]
pub enum Body {
    /// Bytes at hand (empty once sent).
    Full(Bytes),
    /// A cache entry's body, lent by the entry.
    Entry(Arc<Stored>),
    /// An upstream body, passed on as it arrives.
    Streamed(crate::upstream::UpstreamBody),
    /// An event stream: each message is sent as it is produced; the stream ends when every
    /// sender is gone.
    Events(mpsc::Receiver<Bytes>),
    /// A body with something held until the client's response is done with it (a client's
    /// open-stream place): dropped with the body, when the answer ends or the client leaves.
    Guarded(Box<Body>, Box<dyn std::any::Any + Send + Sync>),
}

impl Body {
    /// No bytes.
    pub fn empty() -> Body {
        Body::Full(Bytes::new())
    }

    /// Is this an event stream, which may stay open as long as the events last (bounded by
    /// the stream's own timeouts, not `server.max_response_time`)?
    pub fn is_stream(&self) -> bool {
        match self {
            Body::Events(_) => true,
            Body::Guarded(b, _) => b.is_stream(),
            _ => false,
        }
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body::Full(b)
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Body {
        Body::Full(Bytes::from_static(s.as_bytes()))
    }
}

/// An entry lending its body to a response: the body is reached through the entry's own
/// reference count, already touched by the lookup, rather than the body's: over many runs that
/// count is a cache miss per hit.
struct Lent(Arc<Stored>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match this {
            Body::Full(b) if b.is_empty() => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(data(std::mem::take(b))),
            // The entry is lent to the bytes (no count is touched) and the body left empty.
            Body::Entry(_) => match std::mem::replace(this, Body::empty()) {
                Body::Entry(s) => Poll::Ready(data(Bytes::from_owner(Lent(s)))),
                _ => Poll::Ready(None),
            },
            Body::Streamed(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Body::Events(rx) => rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b)))),
            Body::Guarded(b, _) => Pin::new(b.as_mut()).poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_empty(),
            Body::Entry(s) => s.body.is_empty(),
            Body::Streamed(b) => b.is_end_stream(),
            Body::Events(rx) => rx.is_closed() && rx.is_empty(),
            Body::Guarded(b, _) => b.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.len() as u64),
            Body::Entry(s) => SizeHint::with_exact(s.body.len() as u64),
            Body::Streamed(b) => b.size_hint(),
            Body::Events(_) => SizeHint::default(),
            Body::Guarded(b, _) => b.size_hint(),
        }
    }
}

/// A data frame of `b`; none for no bytes (an empty frame would end nothing and say nothing).
#[inline]
fn data(b: Bytes) -> Option<Result<Frame<Bytes>, BodyError>> {
    (!b.is_empty()).then(|| Ok(Frame::data(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use http::StatusCode;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    use crate::cache::KeptHeaders;

    async fn collect(b: Body) -> Bytes {
        b.collect().await.expect("body completes").to_bytes()
    }

    #[tokio::test]
    async fn a_full_body_says_its_length_and_is_sent_once() {
        let b = Body::from(Bytes::from_static(b"{\"status\":\"ok\"}"));
        assert_eq!(b.size_hint().exact(), Some(15));
        assert!(!b.is_end_stream());
        assert_eq!(collect(b).await, "{\"status\":\"ok\"}");
        let empty = Body::empty();
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn an_entry_lends_its_own_bytes_and_says_their_length() {
        let stored = Arc::new(Stored {
            status: StatusCode::OK,
            headers: Arc::new(KeptHeaders::default()),
            body: Bytes::from(vec![b'x'; 1000]),
            etag: crate::cache::etag_of(&[b'x'; 1000]),
            class: None,
            ttl: None,
            fetched_at: Instant::now(),
        });
        let mut b = Body::Entry(Arc::clone(&stored));
        assert_eq!(b.size_hint().exact(), Some(1000));
        assert!(!b.is_end_stream());
        let frame = b.frame().await.unwrap().unwrap().into_data().unwrap();
        // The very bytes of the entry, kept alive by the entry's count, not copied.
        assert_eq!(frame.as_ptr(), stored.body.as_ptr());
        assert_eq!(frame.len(), 1000);
        assert_eq!(Arc::strong_count(&stored), 2);
        assert!(b.is_end_stream());
        assert!(b.frame().await.is_none());
        drop(frame);
        assert_eq!(Arc::strong_count(&stored), 1);
    }

    #[tokio::test]
    async fn an_upstream_body_streams_through_with_its_length() {
        let (client, mut server) = tokio::io::duplex(4096);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        let answer = tokio::spawn(async move {
            // Read the request head, then answer with a body in two writes.
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut server, &mut buf).await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                .await
                .unwrap();
            server.write_all(b"world").await.unwrap();
            server
        });
        let req = http::Request::get("/v1/workflows/run/x")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let b = Body::Streamed(resp.into_body().into());
        assert_eq!(b.size_hint().exact(), Some(10));
        assert_eq!(collect(b).await, "helloworld");
        drop(answer.await.unwrap());
    }

    #[tokio::test]
    async fn events_are_sent_as_produced_and_end_with_their_senders() {
        let (tx, rx) = mpsc::channel(4);
        let mut b = Body::Events(rx);
        assert_eq!(b.size_hint().exact(), None);
        tx.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
        let first = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: one\n\n");
        assert!(!b.is_end_stream(), "a sender is left");
        tx.send(Bytes::new()).await.unwrap();
        tx.send(Bytes::from_static(b"data: two\n\n")).await.unwrap();
        drop(tx);
        // An empty message does not end the stream; the last sender's going does.
        assert_eq!(collect(b).await, "data: two\n\n");
    }
}

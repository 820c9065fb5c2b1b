//! What of a request is settled before it is served or let in: its framing, and the small body
//! some clients send with a GET (its path is the router's, [`crate::routes`]).
//!
//! Invariant: a request body is read only to be dropped — it never reaches the upstream — and
//! never past [`MAX_BODY_BYTES`] or its deadline; a request announcing `Transfer-Encoding` is
//! refused without reading any of it, since hyper hides a `Content-Length` sent beside it and
//! the two shapes cannot be told apart.

use std::time::Duration;

use bytes::Buf;
use http::header::TRANSFER_ENCODING;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::error::GatewayError;
use crate::metrics::RejectReason;

/// Largest request body read (and dropped): SDKs that send `{}` with every GET fit many times
/// over; anything larger is not a run-detail request and gets 413.
pub const MAX_BODY_BYTES: u64 = 64 << 10;

/// Why a request was refused at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `Transfer-Encoding` was sent: alone or beside a `Content-Length` (the smuggling shape),
    /// which the gateway cannot tell apart.
    #[error("request framing is ambiguous")]
    Framing,
    /// The body ended before its announced length, or the stream failed.
    #[error("request body is incomplete")]
    Broken,
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("request body is too large")]
    TooLarge,
    /// The body did not arrive within its deadline.
    #[error("request body was not received in time")]
    TooSlow,
}

impl Refusal {
    /// The metric label of the refusal.
    pub fn reason(self) -> RejectReason {
        match self {
            Refusal::Framing | Refusal::Broken => RejectReason::BadFraming,
            Refusal::TooLarge => RejectReason::BodyTooLarge,
            Refusal::TooSlow => RejectReason::BodyTimeout,
        }
    }
}

impl From<Refusal> for GatewayError {
    fn from(r: Refusal) -> GatewayError {
        match r {
            Refusal::Framing | Refusal::Broken => GatewayError::BadFraming,
            Refusal::TooLarge => GatewayError::RequestTooLarge,
            Refusal::TooSlow => GatewayError::RequestTimeout,
        }
    }
}

/// Refuses the framings the gateway will not read: any `Transfer-Encoding` on a route that takes
/// no body, and anything but a single `chunked` on one that does (uploads from clients that do
/// not know their body's length). Conflicting `Content-Length` values never get here (hyper
/// answers them 400 itself), and hyper reads a chunked body by its chunks, never by a
/// `Content-Length` beside it.
pub fn check_framing(headers: &HeaderMap, takes_body: bool) -> Result<(), Refusal> {
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(te), None) if takes_body && te.as_bytes().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(Refusal::Framing),
    }
}

/// Reads `body` to its end and drops it, refusing it once it passes [`MAX_BODY_BYTES`] or
/// `deadline` passes first. A body announced larger than the cap is refused unread.
pub async fn discard_body<B>(mut body: B, deadline: Duration) -> Result<(), Refusal>
where
    B: Body + Unpin,
{
    if body.is_end_stream() {
        return Ok(());
    }
    if body.size_hint().lower() > MAX_BODY_BYTES {
        return Err(Refusal::TooLarge);
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| Refusal::Broken)?;
            if let Some(data) = frame.data_ref() {
                seen += data.remaining() as u64;
                if seen > MAX_BODY_BYTES {
                    return Err(Refusal::TooLarge);
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or(Err(Refusal::TooSlow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;

    #[test]
    fn transfer_encoding_is_refused_content_length_is_not() {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_LENGTH, "2".parse().unwrap());
        assert_eq!(check_framing(&h, false), Ok(()));
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert_eq!(check_framing(&h, false), Err(Refusal::Framing));
        // A route that takes a body reads a chunked one, and nothing else.
        assert_eq!(check_framing(&h, true), Ok(()));
        h.insert(TRANSFER_ENCODING, "gzip, chunked".parse().unwrap());
        assert_eq!(check_framing(&h, true), Err(Refusal::Framing));
        h.append(TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert_eq!(check_framing(&h, true), Err(Refusal::Framing));
    }

    fn chunks(n: usize, size: usize) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames = (0..n).map(move |_| Ok(Frame::data(Bytes::from(vec![b'x'; size]))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn small_bodies_are_dropped_large_ones_refused() {
        let d = Duration::from_secs(1);
        assert_eq!(discard_body(Full::new(Bytes::new()), d).await, Ok(()));
        assert_eq!(discard_body(Full::new(Bytes::from("{}")), d).await, Ok(()));
        assert_eq!(discard_body(chunks(64, 1024), d).await, Ok(()));
        // Announced too large: refused unread; streamed too large: refused at the cap.
        let big = Full::new(Bytes::from(vec![0; MAX_BODY_BYTES as usize + 1]));
        assert_eq!(discard_body(big, d).await, Err(Refusal::TooLarge));
        assert_eq!(
            discard_body(chunks(65, 1024), d).await,
            Err(Refusal::TooLarge)
        );
        let broken = StreamBody::new(futures_util::stream::iter([Err::<Frame<Bytes>, _>(
            std::io::Error::other("reset"),
        )]));
        assert_eq!(discard_body(broken, d).await, Err(Refusal::Broken));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_cut_at_its_deadline() {
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::io::Error>,
        >());
        let t = tokio::time::Instant::now();
        let got = discard_body(stalled, Duration::from_secs(10)).await;
        assert_eq!(got, Err(Refusal::TooSlow));
        assert_eq!(t.elapsed(), Duration::from_secs(10));
    }
}

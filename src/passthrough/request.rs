//! The body of a passed-through request, as the upstream gets it.
//!
//! Invariant: a JSON body is read whole only up to `passthrough.max_json_bytes`, and checked
//! (and its `user` prefixed) before any byte goes upstream; any other body streams through
//! frame by frame, counted against `passthrough.max_upload_bytes` (and a multipart one has its
//! `user` fields prefixed as it passes), and past the cap the stream fails, so the upstream
//! never receives more than the cap and the gateway never holds more than a frame.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::body::BodyError;
use crate::rewrite::multipart::Rewriter;
use crate::rewrite::{json, UserPrefix};
use crate::upstream::PassBody;

use super::Refusal;

/// Longest multipart part header block accepted when rewriting.
const PART_HEADER_CAP: usize = 16 * 1024;

/// How a route's request body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (read and dropped at the door).
    None,
    /// JSON: buffered, capped, checked, `user` prefixed.
    Json,
    /// `multipart/form-data`: streamed, capped, `user` fields prefixed.
    Multipart,
    /// Anything else (unlisted paths): streamed and capped, untouched.
    Raw,
}

/// Why a streamed body stopped; set once, read after the upstream exchange fails.
pub type Fault = Arc<OnceLock<Refusal>>;

/// Reads a JSON body whole (at most `cap` bytes, within `deadline`), checks it and prefixes
/// its `user`.
pub async fn json_bytes<B>(
    body: B,
    cap: u64,
    deadline: Duration,
    prefix: Option<&UserPrefix>,
) -> Result<Bytes, Refusal>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BodyError>,
{
    if body.size_hint().lower() > cap {
        return Err(Refusal::TooLarge);
    }
    let read = Limited::new(body, cap as usize).collect();
    let bytes = match tokio::time::timeout(deadline, read).await {
        Err(_) => return Err(Refusal::TooSlow),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(Refusal::TooLarge),
        Ok(Err(_)) => return Err(Refusal::Broken),
        Ok(Ok(c)) => c.to_bytes(),
    };
    let bytes = match prefix {
        Some(p) => match json::prefix_user(&bytes, p) {
            Ok(std::borrow::Cow::Borrowed(_)) => bytes,
            Ok(std::borrow::Cow::Owned(v)) => Bytes::from(v),
            Err(json::JsonError::UserNotString) => return Err(Refusal::UserNotString),
            Err(json::JsonError::Invalid(_)) => return Err(Refusal::NotJson),
        },
        None => {
            serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
                .map_err(|_| Refusal::NotJson)?;
            bytes
        }
    };
    Ok(bytes)
}

/// Bytes at hand as a request body.
pub fn full(bytes: Bytes) -> PassBody {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// How a run start asks to be answered (its `response_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `blocking`, or anything Dify reads as it (absent, unknown): the answer when it ends.
    Blocking,
    /// `streaming`: its events as they happen.
    Streaming,
    /// `async` (the gateway's own): `202 Accepted` once the run has started; the gateway
    /// follows it upstream as a stream.
    Async,
}

impl Mode {
    /// A run start's mode, read from its JSON body.
    pub fn of(json: &[u8]) -> Mode {
        #[derive(serde::Deserialize)]
        struct Body<'a> {
            #[serde(borrow)]
            response_mode: Option<std::borrow::Cow<'a, str>>,
        }
        let mode = serde_json::from_slice::<Body<'_>>(json)
            .ok()
            .and_then(|m| m.response_mode);
        match mode.as_deref() {
            Some("streaming") => Mode::Streaming,
            Some("async") => Mode::Async,
            _ => Mode::Blocking,
        }
    }

    /// Label for logs and tests.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Blocking => "blocking",
            Mode::Streaming => "streaming",
            Mode::Async => "async",
        }
    }
}

/// No body.
pub fn empty() -> PassBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// A streamed body: counted against `cap`, multipart `user` fields prefixed when `rewriter` is
/// given. A body announced larger than `cap` is refused unread.
pub fn streamed<B>(
    body: B,
    cap: u64,
    rewriter: Option<Rewriter>,
    fault: Fault,
) -> Result<PassBody, Refusal>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BodyError>,
{
    if body.size_hint().lower() > cap {
        return Err(Refusal::TooLarge);
    }
    Ok(Capped {
        inner: body,
        seen: 0,
        cap,
        rewriter,
        queued: VecDeque::new(),
        fault,
        done: false,
    }
    .boxed_unsync())
}

/// A multipart rewriter for `content_type`, or the refusal of a content type that is not
/// `multipart/form-data` with a boundary.
pub fn rewriter(content_type: &str, prefix: &UserPrefix) -> Result<Rewriter, Refusal> {
    Rewriter::new(content_type, prefix, PART_HEADER_CAP).map_err(|_| Refusal::BadMultipart)
}

/// A client body passed on frame by frame under a byte cap.
struct Capped<B> {
    inner: B,
    /// Client bytes read so far.
    seen: u64,
    cap: u64,
    rewriter: Option<Rewriter>,
    /// Rewritten bytes not yet handed on.
    queued: VecDeque<Bytes>,
    /// Where a refusal is recorded for the handler.
    fault: Fault,
    done: bool,
}

impl<B> Capped<B> {
    fn fail(&mut self, why: Refusal) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let _ = self.fault.set(why);
        self.done = true;
        Poll::Ready(Some(Err(BodyError::from(why))))
    }
}

impl<B> HttpBody for Capped<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.queued.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    if let Some(r) = this.rewriter.take() {
                        if r.finish().is_err() {
                            return this.fail(Refusal::BadMultipart);
                        }
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(_))) => return this.fail(Refusal::Broken),
                Poll::Ready(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            this.seen += data.len() as u64;
            if this.seen > this.cap {
                return this.fail(Refusal::TooLarge);
            }
            match &mut this.rewriter {
                None => {
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Some(r) => match r.push(data) {
                    Ok(out) => this
                        .queued
                        .extend(out.into_iter().filter(|b| !b.is_empty())),
                    Err(_) => return this.fail(Refusal::BadMultipart),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queued.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // A rewritten body grows by the prefixes; a passed one is as long as the client's.
        match self.rewriter {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use http_body_util::StreamBody;

    fn chunks(
        n: usize,
        size: usize,
    ) -> impl HttpBody<Data = Bytes, Error = std::io::Error> + Send + Unpin {
        let frames = (0..n).map(move |_| Ok(Frame::data(Bytes::from(vec![b'x'; size]))));
        StreamBody::new(stream::iter(frames))
    }

    #[tokio::test]
    async fn a_streamed_body_fails_past_its_cap() {
        let fault = Fault::default();
        let b = streamed(chunks(4, 10), 35, None, fault.clone()).unwrap();
        assert!(b.collect().await.is_err());
        assert_eq!(fault.get(), Some(&Refusal::TooLarge));
        let fault = Fault::default();
        let b = streamed(chunks(4, 10), 40, None, fault.clone()).unwrap();
        assert_eq!(b.collect().await.unwrap().to_bytes().len(), 40);
        assert_eq!(fault.get(), None);
    }

    #[tokio::test]
    async fn json_is_capped_and_checked() {
        let d = Duration::from_secs(5);
        let body = |s: &'static str| Full::new(Bytes::from_static(s.as_bytes()));
        assert!(json_bytes(body("{\"a\":1}"), 100, d, None).await.is_ok());
        assert_eq!(
            json_bytes(body("{\"a\":"), 100, d, None).await.err(),
            Some(Refusal::NotJson)
        );
        assert_eq!(
            json_bytes(body("{\"a\":1}"), 3, d, None).await.err(),
            Some(Refusal::TooLarge)
        );
        let p = UserPrefix::new("t:").unwrap();
        let out = json_bytes(body("{\"user\": \"u\", \"x\":1}"), 100, d, Some(&p))
            .await
            .unwrap();
        assert_eq!(out, "{\"user\": \"t:u\", \"x\":1}");
        let mode = |b: &[u8]| Mode::of(b);
        assert_eq!(
            mode(br#"{"inputs":{},"response_mode":"streaming"}"#),
            Mode::Streaming
        );
        assert_eq!(mode(br#"{"response_mode":"async"}"#), Mode::Async);
        assert_eq!(
            mode(br#"{"inputs":{},"response_mode":"blocking"}"#),
            Mode::Blocking
        );
        assert_eq!(mode(br#"{"response_mode":1}"#), Mode::Blocking);
    }
}

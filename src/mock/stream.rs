//! The event streams the mock serves, and whether each was read to its end.
//!
//! Invariant: a stream is `Delivered` once the server has taken its last frame (the reader read
//! on to the end) and `Abandoned` if its body was dropped before that (the reader went away);
//! a stream is never both, and never changes again once it has ended.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Channel};
use hyper::body::{Frame, SizeHint};
use tokio::sync::watch;

use super::reply::{self, Reply};
use super::{lock, Body, MockDify};

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Still being served.
    Open,
    /// The reader read it to its end.
    Delivered,
    /// The reader went away before its end.
    Abandoned,
}

/// Which route served a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `POST /workflows/run` (or a workflow's `run`) in streaming mode.
    Run,
    /// `GET /workflow/{id}/events`.
    Resume,
}

/// One stream served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub kind: StreamKind,
    pub workflow_run_id: String,
    pub end: StreamEnd,
}

/// A stream's identity and its end, shared by the body and the tests.
pub(super) struct Slot {
    kind: StreamKind,
    run_id: String,
    end: watch::Sender<StreamEnd>,
}

/// Streams kept for tests to look at; the oldest go first.
const STREAMS_MAX: usize = 10_000;

/// The streams served, in order.
#[derive(Default)]
pub(super) struct Streams(Mutex<Vec<Arc<Slot>>>);

impl Streams {
    pub(super) fn open(&self, kind: StreamKind, run_id: &str) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            kind,
            run_id: run_id.to_owned(),
            end: watch::channel(StreamEnd::Open).0,
        });
        let mut all = lock(&self.0);
        if all.len() == STREAMS_MAX {
            all.remove(0);
        }
        all.push(Arc::clone(&slot));
        slot
    }
}

impl MockDify {
    /// The streams served so far, oldest first.
    pub fn streams(&self) -> Vec<StreamRecord> {
        lock(&self.state.streams.0)
            .iter()
            .map(|s| StreamRecord {
                kind: s.kind,
                workflow_run_id: s.run_id.clone(),
                end: *s.end.borrow(),
            })
            .collect()
    }

    /// Waits until the run stream of run `run_id` has ended, and says how (`None` if the mock
    /// served no run stream for it). Bound it with a timeout: a held or endless run never ends.
    pub async fn stream_end(&self, run_id: &str) -> Option<StreamEnd> {
        let slot = lock(&self.state.streams.0)
            .iter()
            .find(|s| s.kind == StreamKind::Run && s.run_id == run_id)
            .cloned()?;
        let mut rx = slot.end.subscribe();
        let end = rx.wait_for(|e| *e != StreamEnd::Open).await.ok()?;
        Some(*end)
    }
}

/// A stream's body: the frames sent into its channel, watched to its end.
pub(super) struct Tracked {
    inner: Channel<Bytes, std::io::Error>,
    slot: Arc<Slot>,
}

impl Tracked {
    fn end(&self, end: StreamEnd) {
        self.slot.end.send_if_modified(|e| {
            let open = *e == StreamEnd::Open;
            if open {
                *e = end;
            }
            open
        });
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.end(StreamEnd::Delivered);
        }
        polled
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.end(StreamEnd::Abandoned);
    }
}

/// An event-stream answer fed by `body`, recorded as a stream of `kind` for `run_id`.
pub(super) fn sse(
    streams: &Streams,
    kind: StreamKind,
    run_id: &str,
    body: Channel<Bytes, std::io::Error>,
) -> Response<Body> {
    let slot = streams.open(kind, run_id);
    let tracked = Tracked { inner: body, slot };
    let resp = reply::reply_response(Reply::with_type(
        StatusCode::OK,
        "text/event-stream; charset=utf-8",
        Bytes::new(),
    ));
    let (parts, _) = resp.into_parts();
    // Dify sets no anti-buffering header (its bundled nginx turns buffering off instead).
    Response::from_parts(parts, tracked.boxed())
}

//! What reached the mock: every request's method, path, query and headers, and the exact bytes
//! of its JSON body.
//!
//! Invariant: the log holds the last [`RECORDED_MAX`] requests in arrival order, so a long
//! benchmark cannot grow it without bound; credentials in it are marked sensitive, so a `{:?}`
//! of a record never shows them.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
use http::{HeaderMap, Method, Request};

use super::{lock, MockDify};

/// How many requests the log keeps (the oldest go first).
pub const RECORDED_MAX: usize = 1024;

/// One request as it reached the mock.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// The path as received (no query).
    pub path: String,
    /// The raw query string, if the target had one.
    pub query: Option<String>,
    /// Every header as received (`Authorization`, `Cookie` and `Proxy-Authorization` marked
    /// sensitive).
    pub headers: HeaderMap,
    /// The exact bytes of a JSON body (`Content-Type: application/json`); `None` for other
    /// bodies, which routes read as streams.
    pub body: Option<Bytes>,
}

impl Recorded {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The JSON body as text.
    pub fn body_text(&self) -> Option<&str> {
        self.body.as_ref().and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// One multipart file the mock received (`/files/upload` or `/audio-to-text`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// The path it was sent to.
    pub path: String,
    /// The `user` form field, as received.
    pub user: Option<String>,
    /// The file part's file name.
    pub name: String,
    /// The file part's content type.
    pub mime_type: String,
    /// Bytes of the file part, counted as they streamed past (never held whole).
    pub size: u64,
    /// The id it was stored under (uploads that succeeded).
    pub file_id: Option<String>,
}

/// The request log.
#[derive(Default)]
pub(super) struct Log {
    /// Sequence number and record of the latest requests.
    entries: Mutex<(u64, VecDeque<(u64, Recorded)>)>,
}

impl Log {
    /// Records a request's head; returns its sequence number, for [`Log::body`].
    pub(super) fn head<B>(&self, req: &Request<B>) -> u64 {
        let mut headers = req.headers().clone();
        for name in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION] {
            if let http::header::Entry::Occupied(mut e) = headers.entry(name) {
                for v in e.iter_mut() {
                    v.set_sensitive(true);
                }
            }
        }
        let rec = Recorded {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            headers,
            body: None,
        };
        let mut g = lock(&self.entries);
        let (next, entries) = &mut *g;
        *next += 1;
        if entries.len() == RECORDED_MAX {
            entries.pop_front();
        }
        entries.push_back((*next, rec));
        *next
    }

    /// Adds the JSON body to request `seq` (if it is still in the log).
    pub(super) fn body(&self, seq: u64, body: Bytes) {
        let mut g = lock(&self.entries);
        if let Some((_, rec)) = g.1.iter_mut().rev().find(|(s, _)| *s == seq) {
            rec.body = Some(body);
        }
    }

    fn all(&self) -> Vec<Recorded> {
        lock(&self.entries)
            .1
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl MockDify {
    /// The requests received (the last [`RECORDED_MAX`]), oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.record.all()
    }

    /// The requests received for `path` (exact path text), oldest first.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        let mut all = self.requests();
        all.retain(|r| r.path == path);
        all
    }

    /// The last request received.
    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.state.record.entries)
            .1
            .back()
            .map(|(_, r)| r.clone())
    }

    /// The query strings received for `path`, oldest first (`""` for none).
    pub fn queries(&self, path: &str) -> Vec<String> {
        self.requests_to(path)
            .into_iter()
            .map(|r| r.query.unwrap_or_default())
            .collect()
    }
}

//! What the soak's clients saw, counted per task and merged at the end.
//!
//! Invariant: every client request is counted exactly once, as a response (status, `X-Cache`)
//! or as a client-side error of one kind; a 200 whose body is not one of the target's good
//! bodies is recorded as a violation with an example.

use std::collections::BTreeMap;
use std::error::Error as StdError;

use bytes::Bytes;

/// How many violation examples are kept for the report.
const MAX_EXAMPLES: usize = 12;

/// Faults the mock injects for a run id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// A permanent 500 in Dify's error shape (not retried).
    Http500,
    /// 502, then 503, then the run: recovers within the gateway's retries.
    Flap502503,
    /// Cloudflare's HTML 429 with `Retry-After: 1`, then the run.
    Cf429Short,
    /// Cloudflare's HTML 429 with `Retry-After: 60` (beyond the cap: goes to the client).
    Cf429Long,
    /// A 200 whose JSON is cut in half (complete HTTP message).
    TruncatedJson,
    /// A 200 whose body is not JSON at all.
    InvalidJson,
    /// A 200 whose body exceeds `upstream.max_body_bytes`.
    Oversize,
    /// Head and half the body, then the connection breaks.
    ResetMidBody,
    /// Never answers.
    Hang,
    /// A 200 head, then body chunks forever.
    StreamForever,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::Http500,
        Fault::Flap502503,
        Fault::Cf429Short,
        Fault::Cf429Long,
        Fault::TruncatedJson,
        Fault::InvalidJson,
        Fault::Oversize,
        Fault::ResetMidBody,
        Fault::Hang,
        Fault::StreamForever,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Http500 => "fault:500",
            Fault::Flap502503 => "fault:502-503-recover",
            Fault::Cf429Short => "fault:cf429-retry-after-1",
            Fault::Cf429Long => "fault:cf429-retry-after-60",
            Fault::TruncatedJson => "fault:truncated-json-200",
            Fault::InvalidJson => "fault:invalid-json-200",
            Fault::Oversize => "fault:oversize-body",
            Fault::ResetMidBody => "fault:reset-mid-body",
            Fault::Hang => "fault:hang",
            Fault::StreamForever => "fault:stream-forever",
        }
    }

    /// Recovering faults need fresh ids: once recovered, the run is cached for good.
    pub fn recovers(self) -> bool {
        matches!(self, Fault::Flap502503 | Fault::Cf429Short)
    }
}

/// What a client asked for, as the report groups it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// A terminal run fetched during warm-up: every later request should be a hit.
    Hot,
    /// A never-seen id the mock does not know (404).
    Fresh404,
    /// A never-seen id the mock answers with a terminal run.
    FreshTerminal,
    /// A running run that turns terminal a few seconds after it was created.
    Poll,
    /// A running run that is switched to 503 during outage windows.
    Outage,
    /// A run whose upstream answer is a fault.
    Fault(Fault),
    /// A path id that is not a UUID (answered 400 locally).
    BadId,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Hot => "hot terminal",
            Category::Fresh404 => "fresh id (404)",
            Category::FreshTerminal => "fresh id (terminal)",
            Category::Poll => "poll (running→terminal)",
            Category::Outage => "outage set (running)",
            Category::Fault(f) => f.as_str(),
            Category::BadId => "malformed id",
        }
    }
}

/// A client-side failure, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientError {
    /// The TCP connection could not be opened (refused, unreachable).
    Connect,
    /// No complete answer within the client's deadline.
    Timeout,
    /// The connection broke mid-exchange (reset, closed before the message completed).
    Reset,
    /// Anything else.
    Other,
}

impl ClientError {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientError::Connect => "connect error",
            ClientError::Timeout => "timeout",
            ClientError::Reset => "reset / closed mid-exchange",
            ClientError::Other => "other",
        }
    }

    /// Classifies a hyper-util client error by walking its source chain.
    pub fn classify(e: &hyper_util::client::legacy::Error) -> ClientError {
        if e.is_connect() {
            return ClientError::Connect;
        }
        Self::classify_chain(e.source())
    }

    /// Classifies an error from reading a response body (or any error chain).
    pub fn classify_chain(mut src: Option<&(dyn StdError + 'static)>) -> ClientError {
        while let Some(s) = src {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as K;
                return match io.kind() {
                    K::ConnectionRefused => ClientError::Connect,
                    K::TimedOut => ClientError::Timeout,
                    K::ConnectionReset
                    | K::ConnectionAborted
                    | K::BrokenPipe
                    | K::UnexpectedEof => ClientError::Reset,
                    _ => ClientError::Other,
                };
            }
            if let Some(h) = s.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    return ClientError::Reset;
                }
                if h.is_timeout() {
                    return ClientError::Timeout;
                }
            }
            src = s.source();
        }
        ClientError::Other
    }
}

/// Counts of one group of requests.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub sent: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// Status with the body's Dify error `code` (or `html`, `other`) for non-200 answers:
    /// tells the gateway's own 503s (`upstream_circuit_open`) from the upstream's.
    pub by_answer: BTreeMap<String, u64>,
    /// `X-Cache` values; `-` when the header was absent.
    pub by_cache: BTreeMap<String, u64>,
    pub errors: BTreeMap<ClientError, u64>,
}

impl Counts {
    fn merge(&mut self, o: &Counts) {
        self.sent += o.sent;
        for (k, v) in &o.by_status {
            *self.by_status.entry(*k).or_default() += v;
        }
        for (k, v) in &o.by_answer {
            *self.by_answer.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.by_cache {
            *self.by_cache.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.errors {
            *self.errors.entry(*k).or_default() += v;
        }
    }
}

/// Breaches of the body and status invariants.
#[derive(Debug, Default, Clone)]
pub struct Violations {
    /// 5xx answers for hot terminal runs.
    pub hot_5xx: u64,
    /// 200s whose body is neither a good body nor the upstream's own malformed 200 body
    /// (a fault body, another run's body, or a malformed body served from the cache).
    pub bad_200: u64,
    /// 200s carrying the upstream's own malformed 200 body, passed through uncached.
    pub passthrough_200: u64,
    /// `X-Cache` of those pass-throughs.
    pub passthrough_cache: BTreeMap<String, u64>,
    /// A few examples of real violations, for the report.
    pub examples: Vec<String>,
    /// A few examples of pass-throughs, kept apart so they cannot crowd out the others.
    pub passthrough_examples: Vec<String>,
}

/// Everything one client task saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub all: Counts,
    pub per_category: BTreeMap<Category, Counts>,
    pub violations: Violations,
}

/// One target as the tally needs it.
pub struct Seen<'a> {
    pub category: Category,
    pub id: &'a str,
    /// Acceptable 200 bodies.
    pub good: &'a [Bytes],
    /// The malformed 200 body the upstream itself sends for this id, if any.
    pub injected: Option<&'a Bytes>,
}

impl Tally {
    /// Counts one answered request and checks its body.
    pub fn response(&mut self, t: &Seen<'_>, status: u16, x_cache: Option<&str>, body: &Bytes) {
        let cache = x_cache.unwrap_or("-").to_owned();
        let answer = answer_key(status, body);
        for c in [
            &mut self.all,
            self.per_category.entry(t.category).or_default(),
        ] {
            c.sent += 1;
            *c.by_status.entry(status).or_default() += 1;
            *c.by_answer.entry(answer.clone()).or_default() += 1;
            *c.by_cache.entry(cache.clone()).or_default() += 1;
        }
        if t.category == Category::Hot && status >= 500 {
            self.violations.hot_5xx += 1;
            let e = example(t, status, &cache, body, "hot run answered 5xx");
            push_bounded(&mut self.violations.examples, e, MAX_EXAMPLES);
        }
        if status == 200 && !t.good.iter().any(|g| g == body) {
            let from_cache = matches!(cache.as_str(), "HIT" | "STALE");
            if t.injected == Some(body) && !from_cache {
                self.violations.passthrough_200 += 1;
                *self
                    .violations
                    .passthrough_cache
                    .entry(cache.clone())
                    .or_default() += 1;
                let e = example(
                    t,
                    status,
                    &cache,
                    body,
                    "upstream's malformed 200 passed through",
                );
                push_bounded(&mut self.violations.passthrough_examples, e, 3);
            } else {
                self.violations.bad_200 += 1;
                let e = example(
                    t,
                    status,
                    &cache,
                    body,
                    "200 with a body that is not the run's",
                );
                push_bounded(&mut self.violations.examples, e, MAX_EXAMPLES);
            }
        }
    }

    /// Counts one request that ended in a client-side error.
    pub fn error(&mut self, category: Category, kind: ClientError) {
        for c in [
            &mut self.all,
            self.per_category.entry(category).or_default(),
        ] {
            c.sent += 1;
            *c.errors.entry(kind).or_default() += 1;
        }
    }

    /// Adds another task's tally to this one.
    pub fn merge(&mut self, o: &Tally) {
        self.all.merge(&o.all);
        for (k, v) in &o.per_category {
            self.per_category.entry(*k).or_default().merge(v);
        }
        let (a, b) = (&mut self.violations, &o.violations);
        a.hot_5xx += b.hot_5xx;
        a.bad_200 += b.bad_200;
        a.passthrough_200 += b.passthrough_200;
        for (k, v) in &b.passthrough_cache {
            *a.passthrough_cache.entry(k.clone()).or_default() += v;
        }
        for e in &b.examples {
            push_bounded(&mut a.examples, e.clone(), MAX_EXAMPLES);
        }
        for e in &b.passthrough_examples {
            push_bounded(&mut a.passthrough_examples, e.clone(), 3);
        }
    }
}

/// `200`, or the status with the error body's kind: `503 upstream_circuit_open`, `429 html`.
fn answer_key(status: u16, body: &[u8]) -> String {
    if status == 200 {
        return "200".into();
    }
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("code")?.as_str().map(str::to_owned));
    match code {
        Some(c) => format!("{status} {c}"),
        None if body.starts_with(b"<") => format!("{status} html"),
        None => format!("{status} other"),
    }
}

fn push_bounded(v: &mut Vec<String>, e: String, max: usize) {
    if v.len() < max {
        v.push(e);
    }
}

/// One line describing an offending answer.
fn example(t: &Seen<'_>, status: u16, cache: &str, body: &Bytes, what: &str) -> String {
    let head = String::from_utf8_lossy(&body[..body.len().min(72)]).replace('|', "\\|");
    format!(
        "{what}: {} `{}` status {status}, X-Cache {cache}, {} bytes, starts `{head}`",
        t.category.as_str(),
        t.id,
        body.len()
    )
}

//! Run starts made idempotent by an `Idempotency-Key` header: the same key from the same client
//! (for the same app) within `idempotency.ttl` gets the first start's answer and starts nothing.
//!
//! Invariant: a key is claimed before its start reaches the upstream, and only one claim of a
//! key is held at a time — in Redis with the shared tier (so across the fleet), else in this
//! replica's memory; while Redis cannot be asked the claim falls back to memory (a start is
//! never refused for the tier's sake; a retry on another replica could then start a second
//! run, logged). A claim ends in exactly one of two ways: the start made a run, and its answer
//! (or, where the answer cannot be replayed, the run's ids) is kept for `ttl`; or it made none
//! (refused, failed before the upstream answered 2xx, or the claim was dropped), and the key is
//! free again. A key sent with another request (method, path or body differ) is refused, never
//! replayed. Kept answers in memory weigh at most `idempotency.max_bytes`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::body::Body;
use crate::clients::hex;
use crate::config::IdempotencyConfig;
use crate::error::GatewayError;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::shared::{Claim, SharedTier};

/// The request header.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Set on an answer replayed from a kept record.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;

/// Extra weight of a record in memory beyond its body.
const RECORD_OVERHEAD: u32 = 256;

/// The checked `Idempotency-Key` of a request: `None` when absent.
pub fn key_of(headers: &HeaderMap) -> Result<Option<&str>, GatewayError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    let bad = GatewayError::InvalidParam(
        "Idempotency-Key must be one value of 1 to 255 visible ASCII characters",
    );
    if values.next().is_some() {
        return Err(bad);
    }
    let b = v.as_bytes();
    if b.is_empty() || b.len() > MAX_KEY_LEN || !b.iter().all(|c| (0x21..=0x7e).contains(c)) {
        return Err(bad);
    }
    Ok(std::str::from_utf8(b).ok())
}

/// What a start that made a run answered, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The whole answer: replayed as it was.
    Full {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        location: Option<HeaderValue>,
        body: Bytes,
    },
    /// A run whose answer cannot be replayed (an event stream, or an answer past the cap): its
    /// ids, so a retry can follow it.
    Started { run: String, task: String },
}

impl Answer {
    /// The answer a retry gets.
    pub fn replay(&self) -> Response<Body> {
        match self {
            Answer::Full {
                status,
                content_type,
                location,
                body,
            } => {
                let mut r = Response::new(Body::Full(body.clone()));
                *r.status_mut() = *status;
                let h = r.headers_mut();
                if let Some(v) = content_type {
                    h.insert(CONTENT_TYPE, v.clone());
                }
                if let Some(v) = location {
                    h.insert(LOCATION, v.clone());
                }
                h.insert(
                    IDEMPOTENT_REPLAYED.clone(),
                    HeaderValue::from_static("true"),
                );
                r
            }
            Answer::Started { run, task } => {
                let e = GatewayError::IdempotentRunStarted {
                    run: run.as_str().into(),
                    task: task.as_str().into(),
                };
                let mut r = e.to_response().map(Body::Full);
                if let Ok(v) = HeaderValue::try_from(format!("/v1/workflows/run/{run}")) {
                    r.headers_mut().insert(LOCATION, v);
                }
                r
            }
        }
    }

    fn weight(&self) -> u32 {
        let n = match self {
            Answer::Full { body, .. } => body.len(),
            Answer::Started { run, task } => run.len() + task.len(),
        };
        u32::try_from(n)
            .unwrap_or(u32::MAX)
            .saturating_add(RECORD_OVERHEAD)
    }
}

/// What [`Idempotency::begin`] decided.
#[derive(Debug)]
pub enum Begin {
    /// This request holds the key: start the run, then [`Claimed::made`] or drop the claim.
    Fresh(Claimed),
    /// The key's run was started: this is its answer.
    Replay(Answer),
    /// The key's first start is still being answered.
    InFlight,
    /// The key came with another request.
    Mismatch,
}

impl Begin {
    /// Label for logs and tests.
    pub fn as_str(&self) -> &'static str {
        match self {
            Begin::Fresh(_) => "fresh",
            Begin::Replay(_) => "replay",
            Begin::InFlight => "in_flight",
            Begin::Mismatch => "mismatch",
        }
    }
}

/// A kept record, as stored in memory or (encoded) in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    /// A start in progress; `since` is when this replica learnt of it (a pending record in
    /// memory lapses after the lease, as Redis's does).
    Pending {
        fingerprint: String,
        token: u64,
        since: Instant,
    },
    Done {
        fingerprint: String,
        answer: Answer,
    },
}

impl Record {
    fn fingerprint(&self) -> &str {
        match self {
            Record::Pending { fingerprint, .. } | Record::Done { fingerprint, .. } => fingerprint,
        }
    }

    fn weight(&self) -> u32 {
        match self {
            Record::Pending { .. } => RECORD_OVERHEAD,
            Record::Done { answer, .. } => answer.weight(),
        }
    }

    /// `begin`'s answer to a request with `fingerprint` finding this record.
    fn meets(&self, fingerprint: &str) -> Begin {
        if self.fingerprint() != fingerprint {
            return Begin::Mismatch;
        }
        match self {
            Record::Pending { .. } => Begin::InFlight,
            Record::Done { answer, .. } => Begin::Replay(answer.clone()),
        }
    }

    /// One JSON line (the record's head) and, for a full answer, the body's bytes after it.
    fn encode(&self) -> Vec<u8> {
        let mut head = Head {
            fp: self.fingerprint(),
            ..Head::default()
        };
        let mut body: &[u8] = &[];
        match self {
            Record::Pending { token, .. } => head.token = Some(*token),
            Record::Done { answer, .. } => match answer {
                Answer::Full {
                    status,
                    content_type,
                    location,
                    body: b,
                } => {
                    head.status = Some(status.as_u16());
                    head.content_type = content_type.as_ref().and_then(|v| v.to_str().ok());
                    head.location = location.as_ref().and_then(|v| v.to_str().ok());
                    body = b;
                }
                Answer::Started { run, task } => {
                    head.run = Some(run);
                    head.task = Some(task);
                }
            },
        }
        let mut out = serde_json::to_vec(&head).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let nl = memchr::memchr(b'\n', bytes)?;
        let head: Head<'_> = serde_json::from_slice(&bytes[..nl]).ok()?;
        let fingerprint = head.fp.to_owned();
        if let Some(token) = head.token {
            return Some(Record::Pending {
                fingerprint,
                token,
                since: Instant::now(),
            });
        }
        let answer = match (head.status, head.run, head.task) {
            (Some(s), _, _) => Answer::Full {
                status: StatusCode::from_u16(s).ok()?,
                content_type: head
                    .content_type
                    .and_then(|v| HeaderValue::try_from(v).ok()),
                location: head.location.and_then(|v| HeaderValue::try_from(v).ok()),
                body: Bytes::copy_from_slice(&bytes[nl + 1..]),
            },
            (None, Some(run), Some(task)) => Answer::Started {
                run: run.to_owned(),
                task: task.to_owned(),
            },
            _ => return None,
        };
        Some(Record::Done {
            fingerprint,
            answer,
        })
    }
}

/// The encoded head of a record.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Head<'a> {
    fp: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    location: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<&'a str>,
}

/// The keys and the answers they got.
pub struct Idempotency {
    ttl: Duration,
    /// How long a claim whose claimant vanished blocks its key (`upstream.run_timeout` and a
    /// minute): a start is answered within the run timeout.
    lease: Duration,
    /// This replica's records (all of them without the shared tier; the fallback with it).
    local: moka::sync::Cache<String, Arc<Record>>,
    shared: Option<SharedTier>,
    tokens: AtomicU64,
    metrics: Option<Arc<Metrics>>,
}

/// A held key: say what the start made with [`Claimed::made`]; dropped, the key is freed.
#[must_use = "a claim dropped frees its key"]
pub struct Claimed {
    owner: Arc<Idempotency>,
    id: String,
    fingerprint: String,
    /// The pending record as written (compared before it is deleted).
    pending: Vec<u8>,
    /// Where the claim is held.
    in_shared: bool,
    done: bool,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("in_shared", &self.in_shared)
            .finish_non_exhaustive()
    }
}

impl Idempotency {
    /// The store; every key's outcome is counted in `metrics`
    /// (`dify_gateway_idempotency_keys_total`) when given.
    pub fn new(
        config: &IdempotencyConfig,
        run_timeout: Duration,
        shared: Option<SharedTier>,
        metrics: Option<Arc<Metrics>>,
    ) -> Arc<Idempotency> {
        let local = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_: &String, r: &Arc<Record>| r.weight())
            .time_to_live(config.ttl)
            .build();
        Arc::new(Idempotency {
            ttl: config.ttl,
            lease: run_timeout + Duration::from_secs(60),
            local,
            shared,
            tokens: AtomicU64::new(random_u64()),
            metrics,
        })
    }

    /// Claims `key` of `client` for `app`, for a request whose method, upstream path and body
    /// `request` hashes; or answers what the key already made.
    pub async fn begin(
        self: &Arc<Self>,
        client: &str,
        app: &str,
        key: &str,
        request: &[&[u8]],
    ) -> Begin {
        let begin = self.decide(client, app, key, request).await;
        if let Some(m) = &self.metrics {
            m.idempotency
                .get_or_create(&OutcomeLabel {
                    outcome: begin.as_str(),
                })
                .inc();
        }
        begin
    }

    async fn decide(
        self: &Arc<Self>,
        client: &str,
        app: &str,
        key: &str,
        request: &[&[u8]],
    ) -> Begin {
        let id = scoped_id(client, app, key);
        let fingerprint = {
            let mut h = Sha256::new();
            for part in request {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part);
            }
            hex(&h.finalize())
        };
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        let pending = Record::Pending {
            fingerprint: fingerprint.clone(),
            token,
            since: Instant::now(),
        };
        let encoded = pending.encode();
        let claimed = |in_shared: bool| {
            Begin::Fresh(Claimed {
                owner: Arc::clone(self),
                id: id.clone(),
                fingerprint: fingerprint.clone(),
                pending: encoded.clone(),
                in_shared,
                done: false,
            })
        };
        if let Some(shared) = &self.shared {
            match shared.claim_idempotency(&id, &encoded, self.lease).await {
                Ok(Claim::Claimed) => return claimed(true),
                Ok(Claim::Held(bytes)) => {
                    return match Record::decode(&bytes) {
                        Some(r) => r.meets(&fingerprint),
                        // Unreadable (another format): treated as in use, never overwritten.
                        None => Begin::InFlight,
                    };
                }
                Ok(Claim::Vanished) => return Begin::InFlight,
                Err(_) => {
                    tracing::warn!(
                        "shared tier unavailable: an Idempotency-Key is held on this replica only"
                    );
                }
            }
        }
        let pending = Arc::new(pending);
        for _ in 0..2 {
            let entry = self
                .local
                .entry(id.clone())
                .or_insert_with(|| Arc::clone(&pending));
            if entry.is_fresh() {
                return claimed(false);
            }
            match &**entry.value() {
                // A claimant that never settled (its answer was lost): the key is free again.
                Record::Pending { since, .. } if since.elapsed() > self.lease => {
                    self.local.invalidate(&id);
                }
                r => return r.meets(&fingerprint),
            }
        }
        Begin::InFlight
    }
}

impl Claimed {
    /// The start made a run, which answered `answer`: kept for `idempotency.ttl`.
    pub async fn made(mut self, answer: Answer) {
        self.done = true;
        let record = Record::Done {
            fingerprint: std::mem::take(&mut self.fingerprint),
            answer,
        };
        let owner = &self.owner;
        if self.in_shared {
            if let Some(shared) = &owner.shared {
                if shared
                    .store_idempotency(&self.id, &record.encode(), owner.ttl)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        }
        owner.local.insert(self.id.clone(), Arc::new(record));
    }
}

impl Claimed {
    /// The start made a run whose answer cannot be kept: the key stays in use until the
    /// claim's lease ends (`upstream.run_timeout` and a minute), so a retry starts no second
    /// run.
    pub fn hold(mut self) {
        self.done = true;
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // No run was made: the key is free again.
        self.owner.local.invalidate(&self.id);
        if !self.in_shared {
            return;
        }
        let (owner, id, pending) = (
            Arc::clone(&self.owner),
            std::mem::take(&mut self.id),
            std::mem::take(&mut self.pending),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some(shared) = &owner.shared {
                    let _ = shared.release_idempotency(&id, &pending).await;
                }
            });
        }
    }
}

/// A random start for claim tokens, so two replicas' claims never look alike.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

/// The record's name: a hash of client, app and key, so neither a key's bytes nor its length
/// reach the store's key space.
fn scoped_id(client: &str, app: &str, key: &str) -> String {
    let mut h = Sha256::new();
    for part in [client, app, key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<Idempotency> {
        Idempotency::new(
            &IdempotencyConfig::default(),
            Duration::from_secs(60),
            None,
            None,
        )
    }

    fn full(body: &'static str) -> Answer {
        Answer::Full {
            status: StatusCode::OK,
            content_type: Some(HeaderValue::from_static("application/json")),
            location: None,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[tokio::test]
    async fn a_key_is_claimed_once_and_replays_what_its_start_made() {
        let s = store();
        let req: &[&[u8]] = &[b"POST", b"/workflows/run", b"{}"];
        let Begin::Fresh(claim) = s.begin("a", "app", "k1", req).await else {
            panic!("first use claims");
        };
        assert!(matches!(
            s.begin("a", "app", "k1", req).await,
            Begin::InFlight
        ));
        let other: &[&[u8]] = &[b"POST", b"/workflows/run", b"{\"x\":1}"];
        assert!(matches!(
            s.begin("a", "app", "k1", other).await,
            Begin::Mismatch
        ));
        // Another client's (or app's) same key is another key.
        assert!(matches!(
            s.begin("b", "app", "k1", req).await,
            Begin::Fresh(_)
        ));
        assert!(matches!(
            s.begin("a", "app2", "k1", req).await,
            Begin::Fresh(_)
        ));
        claim.made(full("{\"ok\":1}")).await;
        match s.begin("a", "app", "k1", req).await {
            Begin::Replay(a) => {
                let r = a.replay();
                assert_eq!(r.status(), 200);
                assert_eq!(r.headers()[&IDEMPOTENT_REPLAYED], "true");
            }
            b => panic!("{}", b.as_str()),
        }
    }

    #[tokio::test]
    async fn a_claim_dropped_frees_its_key() {
        let s = store();
        let req: &[&[u8]] = &[b"POST"];
        let Begin::Fresh(claim) = s.begin("a", "app", "k", req).await else {
            panic!()
        };
        drop(claim);
        assert!(matches!(
            s.begin("a", "app", "k", req).await,
            Begin::Fresh(_)
        ));
    }

    #[test]
    fn records_survive_their_encoding() {
        let pending = Record::Pending {
            fingerprint: "ab".into(),
            token: 7,
            since: Instant::now(),
        };
        match Record::decode(&pending.encode()) {
            Some(Record::Pending {
                fingerprint, token, ..
            }) => {
                assert_eq!((fingerprint.as_str(), token), ("ab", 7))
            }
            r => panic!("{r:?}"),
        }
        for r in [
            Record::Done {
                fingerprint: "cd".into(),
                answer: full("line\n{\"a\":\"\u{e9}\"}\n"),
            },
            Record::Done {
                fingerprint: "ef".into(),
                answer: Answer::Started {
                    run: "r".into(),
                    task: "t".into(),
                },
            },
        ] {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
        assert_eq!(Record::decode(b"garbage"), None);
    }

    #[test]
    fn keys_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(key_of(&h), Ok(None));
        h.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("order-42"));
        assert_eq!(key_of(&h), Ok(Some("order-42")));
        h.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("a b"));
        assert!(key_of(&h).is_err());
        h.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static(""));
        assert!(key_of(&h).is_err());
        let long = "k".repeat(MAX_KEY_LEN + 1);
        h.insert(&IDEMPOTENCY_KEY, HeaderValue::try_from(long).unwrap());
        assert!(key_of(&h).is_err());
    }
}

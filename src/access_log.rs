//! The access log: one line per public request, in the same text or JSON shape as the other
//! log lines (`target` `access`, level INFO).
//!
//! Invariant: a request formats its line into a buffer of its own thread and appends it to the
//! pending batch under a lock held only for the copy; it never waits on stdout and never queues
//! more than [`MAX_PENDING`] bytes — past that, lines are dropped and counted. The log thread
//! ([`crate::telemetry`]) takes the batch with [`AccessLog::take`] and writes it out.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use crate::config::LogFormat;

/// Bytes waiting for the log thread beyond which new lines are dropped: about 20,000 lines,
/// a second of a saturated gateway, so only a stalled stdout loses lines.
pub const MAX_PENDING: usize = 4 << 20;

/// Pending bytes at which the log thread is woken before its next tick, so a busy gateway
/// writes in batches of this size instead of letting [`MAX_PENDING`] fill up between ticks.
const WAKE_AT: usize = 256 << 10;

/// A thread's line buffer is shrunk back to this when a huge line grew it.
const LINE_CAPACITY: usize = 1024;

thread_local! {
    /// Where a request thread formats its line, reused so a warm thread does not allocate.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(LINE_CAPACITY));
}

/// What one access line says about a request.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    /// The request id (validated or generated, see [`crate::request_id`]).
    pub request_id: &'a str,
    /// The client's name, `-` without one.
    pub client: &'a str,
    /// The app's name, `-` when refused before an app was chosen.
    pub app: &'a str,
    /// The method as received.
    pub method: &'a str,
    /// The path as received (no query string).
    pub path: &'a str,
    /// The answer's status.
    pub status: u16,
    /// [`crate::routes::Route::label`].
    pub route: &'static str,
    /// [`crate::outcome::CacheOutcome::as_str`], `none` outside the cache.
    pub cache: &'static str,
    /// [`crate::error::GatewayError::as_str`] when the gateway answered with its own error:
    /// the same word as the answer's JSON `code`.
    pub error: Option<&'a str>,
    /// The upstream's status, when the answer came from a fetch.
    pub upstream_status: Option<u16>,
    /// On the request that started a fetch: the whole fetch, in milliseconds.
    pub upstream_ms: Option<f64>,
    /// Time to answer.
    pub latency_us: u64,
}

/// The access log's pending batch, shared by request threads and the log thread.
pub struct AccessLog {
    /// Text or JSON, as the other log lines.
    format: LogFormat,
    /// Whole lines not yet taken by the log thread, at most [`MAX_PENDING`] bytes.
    pending: Mutex<Vec<u8>>,
    /// Wakes the log thread when the batch passes [`WAKE_AT`] or the log is closing.
    ready: Condvar,
    /// Lines dropped because the batch was full, not yet reported.
    dropped: AtomicU64,
    /// Set once at exit: the log thread takes its last batch without waiting.
    closing: AtomicBool,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    pub fn new(format: LogFormat) -> AccessLog {
        AccessLog {
            format,
            pending: Mutex::new(Vec::with_capacity(WAKE_AT * 2)),
            ready: Condvar::new(),
            dropped: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Formats `line` and queues it for the log thread.
    pub fn record(&self, line: &AccessLine<'_>) {
        LINE.with_borrow_mut(|buf| {
            buf.clear();
            self.format_into(line, SystemTime::now(), buf);
            self.append(buf);
            if buf.capacity() > 64 * LINE_CAPACITY {
                buf.shrink_to(LINE_CAPACITY);
            }
        });
    }

    fn append(&self, line: &[u8]) {
        let mut pending = self.lock();
        let before = pending.len();
        if before + line.len() > MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.extend_from_slice(line);
        let crossed = before < WAKE_AT && pending.len() >= WAKE_AT;
        drop(pending);
        if crossed {
            self.ready.notify_one();
        }
    }

    /// Waits up to `timeout` for a full batch (or [`close`](Self::close)), then moves whatever
    /// is pending to the end of `out`.
    pub fn take(&self, out: &mut Vec<u8>, timeout: Duration) {
        let pending = self.lock();
        let (mut pending, _) = self
            .ready
            .wait_timeout_while(pending, timeout, |p| {
                p.len() < WAKE_AT && !self.closing.load(Ordering::Relaxed)
            })
            .unwrap_or_else(PoisonError::into_inner);
        if out.is_empty() {
            // Swap rather than copy: the caller's emptied buffer becomes the next batch.
            std::mem::swap(&mut *pending, out);
        } else {
            out.extend_from_slice(&pending);
            pending.clear();
        }
    }

    /// Lines dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Wakes the log thread for its last batch.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        // Taken so the flag cannot be set between the waiter's check and its wait.
        drop(self.lock());
        self.ready.notify_all();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Appends the line for `l`, stamped `now`, to `buf`, newline included.
    pub fn format_into(&self, l: &AccessLine<'_>, now: SystemTime, buf: &mut Vec<u8>) {
        let mut line = Line {
            json: self.format == LogFormat::Json,
            buf,
        };
        line.start(now);
        line.quoted("request_id", l.request_id);
        line.quoted("client", l.client);
        line.quoted("app", l.app);
        line.token("method", l.method);
        line.token("path", l.path);
        line.number("status", l.status);
        line.quoted("route", l.route);
        line.quoted("cache", l.cache);
        if let Some(code) = l.error {
            line.quoted("error", code);
        }
        if let Some(s) = l.upstream_status {
            line.number("upstream_status", s);
        }
        if let Some(ms) = l.upstream_ms.filter(|ms| ms.is_finite()) {
            line.key("upstream_ms");
            let _ = write!(line.buf, "{ms:.3}");
        }
        line.number("latency_us", l.latency_us);
        line.end();
    }
}

thread_local! {
    /// The RFC 3339 text of the current second, up to and including the `.`, and that second:
    /// lines within one second only append their microseconds.
    static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
}

/// Appends `now` as tracing writes it: `2026-11-28T20:17:26.715016Z`.
fn timestamp(now: SystemTime, buf: &mut Vec<u8>) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != secs {
            // From `secs`, not `now`: a clock before 1970 reads as 1970 instead of panicking.
            let second = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(second).to_string();
            // `YYYY-MM-DDTHH:MM:SSZ`: keep the first 19 bytes, then the decimal point.
            if let Some(head) = text.as_bytes().get(..19) {
                prefix[..19].copy_from_slice(head);
                prefix[19] = b'.';
                *cached = secs;
            }
        }
        buf.extend_from_slice(&prefix[..]);
    });
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.extend_from_slice(&digits);
    buf.push(b'Z');
}

fn number(n: impl itoa::Integer, buf: &mut Vec<u8>) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Whether `s` reads the same quoted as `Debug` and JSON quote it: printable ASCII without `"`
/// or `\` (ids, names and paths nearly always are).
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Appends `s` quoted: as is when [`plain`], else through `escaped` (which adds the quotes).
fn quoted(s: &str, buf: &mut Vec<u8>, escaped: fn(&str, &mut Vec<u8>)) {
    if plain(s) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        escaped(s, buf);
    }
}

/// Appends `s` quoted and escaped as `Debug` does (tracing's text shape).
fn debug_quoted(s: &str, buf: &mut Vec<u8>) {
    // Writes to a Vec cannot fail.
    quoted(s, buf, |s, buf| drop(write!(buf, "{s:?}")));
}

/// Appends `s` as a JSON string.
fn json_quoted(s: &str, buf: &mut Vec<u8>) {
    quoted(s, buf, |s, buf| drop(serde_json::to_writer(&mut *buf, s)));
}

/// One access line being written, in tracing's text shape (`TS  INFO access: key=value ...`,
/// strings quoted and escaped as `Debug` does) or its flattened JSON shape.
struct Line<'b> {
    json: bool,
    buf: &'b mut Vec<u8>,
}

impl Line<'_> {
    fn start(&mut self, now: SystemTime) {
        if self.json {
            self.buf.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(now, self.buf);
            self.buf.extend_from_slice(b"\",\"level\":\"INFO\"");
        } else {
            timestamp(now, self.buf);
            self.buf.extend_from_slice(b"  INFO access:");
        }
    }

    fn key(&mut self, key: &str) {
        if self.json {
            self.buf.extend_from_slice(b",\"");
            self.buf.extend_from_slice(key.as_bytes());
            self.buf.extend_from_slice(b"\":");
        } else {
            self.buf.push(b' ');
            self.buf.extend_from_slice(key.as_bytes());
            self.buf.push(b'=');
        }
    }

    /// A string field, quoted in both shapes.
    fn quoted(&mut self, key: &str, value: &str) {
        self.key(key);
        if self.json {
            json_quoted(value, self.buf);
        } else {
            debug_quoted(value, self.buf);
        }
    }

    /// A method or path: bare in the text shape, as tracing shows them (hyper admits no space
    /// or control byte in them), quoted in JSON.
    fn token(&mut self, key: &str, value: &str) {
        if self.json {
            self.quoted(key, value);
        } else {
            self.key(key);
            self.buf.extend_from_slice(value.as_bytes());
        }
    }

    fn number(&mut self, key: &str, n: impl itoa::Integer) {
        self.key(key);
        number(n, self.buf);
    }

    fn end(&mut self) {
        if self.json {
            self.buf.extend_from_slice(b",\"target\":\"access\"}");
        }
        self.buf.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLine<'static> {
        AccessLine {
            request_id: "rid-1",
            client: "alpha",
            app: "default",
            method: "GET",
            path: "/v1/workflows/run/3b1e9c0d-7a2b-4c5d-8e9f-0a1b2c3d4e5f",
            status: 200,
            route: "run_detail",
            cache: "miss",
            error: None,
            upstream_status: Some(200),
            upstream_ms: Some(12.34567),
            latency_us: 12_500,
        }
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456)
    }

    fn formatted(format: LogFormat, l: &AccessLine<'_>) -> String {
        let mut buf = Vec::new();
        AccessLog::new(format).format_into(l, at(), &mut buf);
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn text_lines_have_the_tracing_shape() {
        assert_eq!(
            formatted(LogFormat::Text, &line()),
            "2026-11-18T11:06:40.123456Z  INFO access: request_id=\"rid-1\" client=\"alpha\" \
             app=\"default\" method=GET path=/v1/workflows/run/3b1e9c0d-7a2b-4c5d-8e9f-0a1b2c3d4e5f \
             status=200 route=\"run_detail\" cache=\"miss\" upstream_status=200 \
             upstream_ms=12.346 latency_us=12500\n"
        );
        let hit = AccessLine {
            upstream_status: None,
            upstream_ms: None,
            cache: "hit",
            ..line()
        };
        let text = formatted(LogFormat::Text, &hit);
        assert!(text.ends_with("cache=\"hit\" latency_us=12500\n"), "{text}");
    }

    #[test]
    fn a_refused_request_carries_its_error_code_in_both_shapes() {
        let refused = AccessLine {
            client: "-",
            app: "-",
            status: 400,
            cache: "none",
            error: Some("bad_framing"),
            upstream_status: None,
            upstream_ms: None,
            ..line()
        };
        let text = formatted(LogFormat::Text, &refused);
        assert!(
            text.ends_with("cache=\"none\" error=\"bad_framing\" latency_us=12500\n"),
            "{text}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&formatted(LogFormat::Json, &refused)).expect("JSON");
        assert_eq!(v["error"], "bad_framing");
        let ok: serde_json::Value =
            serde_json::from_str(&formatted(LogFormat::Json, &line())).expect("JSON");
        assert!(ok.get("error").is_none());
    }

    #[test]
    fn timestamps_follow_the_clock_across_seconds() {
        let stamp = |t: SystemTime| {
            let mut buf = Vec::new();
            timestamp(t, &mut buf);
            String::from_utf8(buf).expect("utf-8")
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(stamp(t), "2026-11-18T11:06:40.000000Z");
        assert_eq!(
            stamp(t + Duration::from_micros(42)),
            "2026-11-18T11:06:40.000042Z"
        );
        assert_eq!(
            stamp(t + Duration::from_micros(1_999_999)),
            "2026-11-18T11:06:41.999999Z"
        );
        assert_eq!(
            stamp(t + Duration::from_secs(86_400)),
            "2026-11-19T11:06:40.000000Z"
        );
        assert_eq!(stamp(t), "2026-11-18T11:06:40.000000Z");
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let text = formatted(LogFormat::Json, &line());
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
        assert_eq!(v["timestamp"], "2026-11-18T11:06:40.123456Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        assert_eq!(v["client"], "alpha");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_status"], 200);
        assert_eq!(v["upstream_ms"], 12.346);
        assert_eq!(v["latency_us"], 12500);
        let hit = AccessLine {
            upstream_status: None,
            upstream_ms: None,
            ..line()
        };
        let v: serde_json::Value =
            serde_json::from_str(&formatted(LogFormat::Json, &hit)).expect("JSON");
        assert!(v.get("upstream_status").is_none() && v.get("upstream_ms").is_none());
    }

    #[test]
    fn strings_cannot_break_a_line_or_the_json() {
        let nasty = AccessLine {
            client: "a\"b\nc",
            path: "/x\"y\\z",
            ..line()
        };
        let json = formatted(LogFormat::Json, &nasty);
        assert_eq!(json.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&json).expect("still JSON");
        assert_eq!(v["client"], "a\"b\nc");
        assert_eq!(v["path"], "/x\"y\\z");
        let text = formatted(LogFormat::Text, &nasty);
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.contains("client=\"a\\\"b\\nc\""), "{text}");
    }

    #[test]
    fn take_moves_the_batch_and_a_full_batch_drops_lines() {
        let log = AccessLog::new(LogFormat::Text);
        log.record(&line());
        log.record(&line());
        let mut out = Vec::new();
        log.take(&mut out, Duration::ZERO);
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.lines().count(), 2);
        assert_eq!(log.take_dropped(), 0);

        let mut one = Vec::new();
        log.format_into(&line(), at(), &mut one);
        let fits = MAX_PENDING / one.len();
        for _ in 0..fits + 10 {
            log.record(&line());
        }
        assert_eq!(log.take_dropped(), 10);
        let mut out = Vec::new();
        log.take(&mut out, Duration::ZERO);
        assert!(out.len() <= MAX_PENDING);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), fits);
    }

    #[test]
    fn a_full_batch_or_close_wakes_the_log_thread() {
        let log = std::sync::Arc::new(AccessLog::new(LogFormat::Text));
        let l2 = std::sync::Arc::clone(&log);
        let taker = std::thread::spawn(move || {
            let mut out = Vec::new();
            l2.take(&mut out, Duration::from_secs(30));
            out.len()
        });
        while log.lock().len() < WAKE_AT {
            log.record(&line());
        }
        assert!(taker.join().expect("taker") >= WAKE_AT);

        // An almost empty batch: only close wakes the taker before its 30 s.
        let mut rest = Vec::new();
        log.take(&mut rest, Duration::ZERO);
        log.record(&line());
        let l2 = std::sync::Arc::clone(&log);
        let taker = std::thread::spawn(move || {
            let mut out = Vec::new();
            l2.take(&mut out, Duration::from_secs(30));
            out.len()
        });
        let started = std::time::Instant::now();
        log.close();
        assert!(taker.join().expect("woken by close") > 0);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(log.is_closing());
    }
}

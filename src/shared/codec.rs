//! The byte format of a value in the shared tier.
//!
//! Invariant: [`decode`] returns an entry only for a value this format wrote for exactly the
//! requested (app tag, run id), whole and unaltered (length fields agree with the buffer and the
//! CRC-32 over everything matches); anything else — a foreign key's value, another format
//! version, a flipped byte, a truncation — is a [`DecodeError`], found without panicking and
//! without allocating: the body and header values are slices of the buffer that was read.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! off  len  field
//!   0    4  magic D1 F7 'G' 'W'
//!   4    1  format version (1)
//!   5    1  flags: 1 = has ttl, 2 = content-type, 4 = x-version, 8 = x-env present
//!   6    1  entry class: 1 terminal, 2 running, 3 not found
//!   7    1  app tag length T
//!   8    2  HTTP status
//!  10    8  stored at, unix milliseconds (when the upstream answered)
//!  18    8  ttl, milliseconds (0 without the has-ttl flag)
//!  26   16  run id (UUID bytes)
//!  42    2  content-type length C
//!  44    2  x-version length V
//!  46    2  x-env length E
//!  48    4  body length B
//!  52    T  app tag
//!       C+V+E  header values
//!        B  body
//!        4  CRC-32 (IEEE) of every byte before it
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::cache::{KeptHeaders, Stored};
use crate::policy::EntryClass;
use crate::run_id::RunId;

/// First bytes of every value: not valid UTF-8, so no text value is mistaken for one.
pub const MAGIC: [u8; 4] = [0xD1, 0xF7, b'G', b'W'];
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Bytes before the variable part.
const FIXED_LEN: usize = 52;
/// Bytes of the trailing checksum.
const CRC_LEN: usize = 4;

const HAS_TTL: u8 = 1;
const HAS_CONTENT_TYPE: u8 = 2;
const HAS_X_VERSION: u8 = 4;
const HAS_X_ENV: u8 = 8;
const KNOWN_FLAGS: u8 = HAS_TTL | HAS_CONTENT_TYPE | HAS_X_VERSION | HAS_X_ENV;

/// Why an entry cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The policy did not keep it (no class).
    #[error("the entry has no class: it is not kept")]
    NotKept,
    /// The app tag is longer than 255 bytes.
    #[error("app tag too long")]
    TagTooLong,
    /// A header value is longer than 65535 bytes.
    #[error("header value too long")]
    HeaderTooLong,
    /// The body is larger than 4 GiB - 1.
    #[error("body too large")]
    BodyTooLarge,
}

/// Why a value is not a usable entry for the requested key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("value shorter than the fixed header")]
    TooShort,
    #[error("not a dify-gateway value (magic)")]
    Magic,
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("length fields disagree with the value's size")]
    Length,
    #[error("checksum mismatch")]
    Checksum,
    #[error("unknown or inconsistent flags")]
    Flags,
    #[error("value belongs to another app")]
    ForeignApp,
    #[error("value belongs to another run")]
    ForeignRun,
    #[error("unknown entry class")]
    Class,
    #[error("invalid HTTP status")]
    Status,
    #[error("invalid header value")]
    Header,
}

impl DecodeError {
    /// Label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeError::TooShort => "too_short",
            DecodeError::Magic => "magic",
            DecodeError::Version(_) => "version",
            DecodeError::Length => "length",
            DecodeError::Checksum => "checksum",
            DecodeError::Flags => "flags",
            DecodeError::ForeignApp => "foreign_app",
            DecodeError::ForeignRun => "foreign_run",
            DecodeError::Class => "class",
            DecodeError::Status => "status",
            DecodeError::Header => "header",
        }
    }
}

fn class_code(c: EntryClass) -> u8 {
    match c {
        EntryClass::Terminal => 1,
        EntryClass::Running => 2,
        EntryClass::NotFound => 3,
    }
}

fn class_from(code: u8) -> Option<EntryClass> {
    match code {
        1 => Some(EntryClass::Terminal),
        2 => Some(EntryClass::Running),
        3 => Some(EntryClass::NotFound),
        _ => None,
    }
}

/// Milliseconds since the Unix epoch now (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whole milliseconds, rounded up so a sub-millisecond TTL is not zero.
pub(crate) fn ceil_ms(d: Duration) -> u64 {
    let ms = d.as_millis();
    let ms = if !d.subsec_nanos().is_multiple_of(1_000_000) {
        ms + 1
    } else {
        ms
    };
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Writes `s` for (`app_tag`, `run`), stamped as answered at `stored_unix_ms`. The TTL is kept
/// in whole milliseconds (rounded up); `Retry-After` is not kept (kept answers never carry it).
pub fn encode(
    app_tag: &str,
    run: RunId,
    s: &Stored,
    stored_unix_ms: u64,
) -> Result<Vec<u8>, EncodeError> {
    let class = s.class.ok_or(EncodeError::NotKept)?;
    let tag_len = u8::try_from(app_tag.len()).map_err(|_| EncodeError::TagTooLong)?;
    let h = &s.headers;
    let hdr = [&h.content_type, &h.x_version, &h.x_env];
    let mut hdr_lens = [0u16; 3];
    let mut flags = 0u8;
    for (i, (v, bit)) in hdr
        .iter()
        .zip([HAS_CONTENT_TYPE, HAS_X_VERSION, HAS_X_ENV])
        .enumerate()
    {
        if let Some(v) = v {
            hdr_lens[i] = u16::try_from(v.len()).map_err(|_| EncodeError::HeaderTooLong)?;
            flags |= bit;
        }
    }
    let body_len = u32::try_from(s.body.len()).map_err(|_| EncodeError::BodyTooLarge)?;
    let ttl_ms = match s.ttl {
        Some(t) => {
            flags |= HAS_TTL;
            ceil_ms(t)
        }
        None => 0,
    };
    let total = FIXED_LEN
        + app_tag.len()
        + hdr_lens.iter().map(|l| *l as usize).sum::<usize>()
        + s.body.len()
        + CRC_LEN;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(flags);
    out.push(class_code(class));
    out.push(tag_len);
    out.extend_from_slice(&s.status.as_u16().to_be_bytes());
    out.extend_from_slice(&stored_unix_ms.to_be_bytes());
    out.extend_from_slice(&ttl_ms.to_be_bytes());
    out.extend_from_slice(run.uuid().as_bytes());
    for l in hdr_lens {
        out.extend_from_slice(&l.to_be_bytes());
    }
    out.extend_from_slice(&body_len.to_be_bytes());
    debug_assert_eq!(out.len(), FIXED_LEN);
    out.extend_from_slice(app_tag.as_bytes());
    for v in hdr.into_iter().flatten() {
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(&s.body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    debug_assert_eq!(out.len(), total);
    Ok(out)
}

/// An entry decoded for (`app_tag`, `run`), with `fetched_at` placed as far in the past as the
/// value's stored time is (so `Age` counts from the upstream answer, whichever gateway got it).
pub fn decode(value: Bytes, app_tag: &str, run: RunId) -> Result<Stored, DecodeError> {
    decode_at(value, app_tag, run, unix_ms_now(), Instant::now())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// [`decode`] with the clocks given: `now_unix_ms` is the wall clock, `now` the monotonic one.
pub fn decode_at(
    value: Bytes,
    app_tag: &str,
    run: RunId,
    now_unix_ms: u64,
    now: Instant,
) -> Result<Stored, DecodeError> {
    let b = &value[..];
    // Every fixed-offset read below is within FIXED_LEN, checked here first.
    if b.len() < FIXED_LEN + CRC_LEN {
        return Err(if b.len() >= 4 && b[..4] != MAGIC {
            DecodeError::Magic
        } else {
            DecodeError::TooShort
        });
    }
    if b[..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if b[4] != VERSION {
        return Err(DecodeError::Version(b[4]));
    }
    let flags = b[5];
    let tag_len = b[7] as usize;
    let hdr_lens = [
        be16(b, 42) as usize,
        be16(b, 44) as usize,
        be16(b, 46) as usize,
    ];
    let body_len = be32(b, 48) as usize;
    let expected = [
        tag_len,
        hdr_lens[0],
        hdr_lens[1],
        hdr_lens[2],
        body_len,
        CRC_LEN,
    ]
    .iter()
    .try_fold(FIXED_LEN, |acc, l| acc.checked_add(*l));
    if expected != Some(b.len()) {
        return Err(DecodeError::Length);
    }
    let (data, crc) = b.split_at(b.len() - CRC_LEN);
    if crc32fast::hash(data) != be32(crc, 0) {
        return Err(DecodeError::Checksum);
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::Flags);
    }
    let ttl_ms = be64(b, 18);
    if flags & HAS_TTL == 0 && ttl_ms != 0 {
        return Err(DecodeError::Flags);
    }
    let mut at = FIXED_LEN;
    if &b[at..at + tag_len] != app_tag.as_bytes() {
        return Err(DecodeError::ForeignApp);
    }
    at += tag_len;
    if &b[26..42] != run.uuid().as_bytes() {
        return Err(DecodeError::ForeignRun);
    }
    let class = class_from(b[6]).ok_or(DecodeError::Class)?;
    let status = StatusCode::from_u16(be16(b, 8)).map_err(|_| DecodeError::Status)?;
    let mut headers = [None, None, None];
    for (i, bit) in [HAS_CONTENT_TYPE, HAS_X_VERSION, HAS_X_ENV]
        .into_iter()
        .enumerate()
    {
        let len = hdr_lens[i];
        if flags & bit != 0 {
            let v = HeaderValue::from_maybe_shared(value.slice(at..at + len))
                .map_err(|_| DecodeError::Header)?;
            headers[i] = Some(v);
        } else if len != 0 {
            return Err(DecodeError::Flags);
        }
        at += len;
    }
    let body = value.slice(at..at + body_len);
    let [content_type, x_version, x_env] = headers;
    let stored_unix_ms = be64(b, 10);
    let age = Duration::from_millis(now_unix_ms.saturating_sub(stored_unix_ms));
    Ok(Stored {
        status,
        headers: Arc::new(KeptHeaders {
            content_type,
            x_version,
            x_env,
            retry_after: None,
        }),
        etag: crate::cache::etag_of(&body),
        body,
        class: Some(class),
        ttl: (flags & HAS_TTL != 0).then(|| Duration::from_millis(ttl_ms)),
        fetched_at: instant_before(now, age),
    })
}

/// `now - age`, saturating at the earliest instant the monotonic clock can represent (a value
/// older than this host's uptime gets the largest `Age` the clock allows).
fn instant_before(now: Instant, age: Duration) -> Instant {
    let mut a = age;
    loop {
        if let Some(t) = now.checked_sub(a) {
            return t;
        }
        a /= 2;
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;

//! The words the gateway uses for what happened to a request.
//!
//! Invariant: the `X-Cache` header, the access log and metric labels all take their values from
//! these enums' `as_str()`, so the three always agree.

use http::HeaderValue;

/// How a run-detail request was answered with respect to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheOutcome {
    /// Answered from the cache, no upstream request.
    Hit,
    /// This request's miss started an upstream fetch.
    Miss,
    /// Joined an upstream fetch another request had started.
    Coalesced,
    /// A refresh failed; the last known answer was served past its TTL.
    Stale,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Stale => "stale",
        }
    }

    /// The `X-Cache` header value.
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheOutcome::Hit => "HIT",
            CacheOutcome::Miss => "MISS",
            CacheOutcome::Coalesced => "COALESCED",
            CacheOutcome::Stale => "STALE",
        })
    }
}

/// What one upstream exchange came to (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamOutcome {
    Ok,
    NotFound,
    Unauthorized,
    Forbidden,
    RateLimited,
    ClientError,
    ServerError,
    Timeout,
    ConnectError,
    BodyTooLarge,
    BadResponse,
    CircuitOpen,
}

impl UpstreamOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamOutcome::Ok => "ok",
            UpstreamOutcome::NotFound => "not_found",
            UpstreamOutcome::Unauthorized => "unauthorized",
            UpstreamOutcome::Forbidden => "forbidden",
            UpstreamOutcome::RateLimited => "rate_limited",
            UpstreamOutcome::ClientError => "client_error",
            UpstreamOutcome::ServerError => "server_error",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::ConnectError => "connect_error",
            UpstreamOutcome::BodyTooLarge => "body_too_large",
            UpstreamOutcome::BadResponse => "bad_response",
            UpstreamOutcome::CircuitOpen => "circuit_open",
        }
    }

    pub fn from_status(s: http::StatusCode) -> Self {
        match s.as_u16() {
            200..=399 => UpstreamOutcome::Ok,
            404 => UpstreamOutcome::NotFound,
            401 => UpstreamOutcome::Unauthorized,
            403 => UpstreamOutcome::Forbidden,
            429 => UpstreamOutcome::RateLimited,
            400..=499 => UpstreamOutcome::ClientError,
            _ => UpstreamOutcome::ServerError,
        }
    }
}

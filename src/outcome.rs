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
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
        }
    }

    /// The `X-Cache` header value.
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheOutcome::Hit => "HIT",
            CacheOutcome::Miss => "MISS",
            CacheOutcome::Coalesced => "COALESCED",
        })
    }
}

/// Which route a request took (a bounded label for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    RunDetail,
    Health,
    Unknown,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::RunDetail => "run_detail",
            Route::Health => "healthz",
            Route::Unknown => "unknown",
        }
    }
}

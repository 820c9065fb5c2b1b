//! What each shared-tier call tells its caller.
//!
//! Invariant: every request-path call ends in one of these outcomes, never in an error; their
//! `as_str()` labels are the words logs and metrics use. `Unavailable` always means "carry on
//! without the shared tier".

use std::sync::Arc;

use crate::cache::Stored;

/// The answer to [`SharedTier::get`].
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A value that passed every check, with `ttl` cut to what Redis has left of it and
    /// `fetched_at` set back by its age.
    Hit(Arc<Stored>),
    /// No value (or one that failed the checks, which is counted as `corrupt`).
    Miss,
    /// Redis could not be asked in time.
    Unavailable,
}

impl Lookup {
    /// Label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Lookup::Hit(_) => "hit",
            Lookup::Miss => "miss",
            Lookup::Unavailable => "unavailable",
        }
    }
}

/// The answer to [`SharedTier::put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written, with the entry's remaining TTL.
    Written,
    /// Not written: the policy did not keep the answer, or its TTL has already run out.
    NotKept,
    /// Redis could not be asked in time.
    Unavailable,
}

impl PutOutcome {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PutOutcome::Written => "written",
            PutOutcome::NotKept => "not_kept",
            PutOutcome::Unavailable => "unavailable",
        }
    }
}

/// The answer to [`SharedTier::notify_done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyOutcome {
    /// Published (received by however many gateways wait).
    Published,
    /// Redis could not be asked; waiters time out and fetch themselves.
    Unavailable,
}

impl NotifyOutcome {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyOutcome::Published => "published",
            NotifyOutcome::Unavailable => "unavailable",
        }
    }
}

/// The answer to [`SharedTier::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The other fetch is over: its notification arrived, or the re-check after registering
    /// found the value (`stored: true`) or found the lock gone without a value (`false`).
    Notified { stored: bool },
    /// Nothing within the wait: the holder is slow or dead; fetch yourself.
    TimedOut,
    /// The notification subscription or Redis is down; fetch yourself.
    Unavailable,
}

impl WaitOutcome {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitOutcome::Notified { .. } => "notified",
            WaitOutcome::TimedOut => "timed_out",
            WaitOutcome::Unavailable => "unavailable",
        }
    }
}

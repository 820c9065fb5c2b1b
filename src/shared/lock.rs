//! The fleet-wide fetch lock: at most one gateway fetches a run from Dify at a time.
//!
//! Contract: `try_lock` takes the lock with `SET NX PX lock_ttl` and a random token; only the
//! token's holder can release it (compare-and-delete in one Lua call), so a holder whose lock
//! expired cannot free someone else's. A holder that crashes blocks others for at most
//! `lock_ttl`: waiters give up after `wait_timeout` and fetch themselves. When Redis is
//! unavailable the answer is [`LockResult::Unavailable`] and the caller fetches on its own —
//! the lock narrows duplicate fetches, it never gates correctness.

use std::fmt;
use std::sync::LazyLock;

use redis::{Script, Value};

use super::codec::ceil_ms;
use super::errors::SharedError;
use super::keys::{done_payload, RunKeys};
use super::{NotifyOutcome, SharedTier, Unavailable};
use crate::run_id::RunId;

/// Deletes a key (a lock, a pending claim) only if it still holds our token.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// Ends a fetch: publishes `ARGV[3]` on channel `ARGV[2]` (the completion every gateway hears),
/// then deletes the lock `KEYS[1]` only if it still holds our token `ARGV[1]`; 1 when it did.
/// Publishing first keeps the order waiters rely on: told, then free to lock.
pub(super) static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"redis.call('PUBLISH', ARGV[2], ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// A run's value (`KEYS[1]`) if there is one — `{1, value, pttl}` — else its fetch lock
/// (`KEYS[2]`) taken with token `ARGV[1]` for `ARGV[2]` ms — `{2, false, 0}` — or found held —
/// `{3, false, 0}`. Both keys share the run's hash tag.
pub(super) static GET_OR_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local v = redis.call('GET', KEYS[1])
if v then
    return {1, v, redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {2, false, 0}
end
return {3, false, 0}",
    )
});

/// Proof of holding a run's lock; give it back with [`SharedTier::finish`]. Dropping it
/// without finishing leaves the lock to expire after `lock_ttl`.
#[must_use = "finish the fetch when it is done, or others wait for lock_ttl"]
pub struct LockToken {
    /// The lock key.
    key: String,
    /// The random value stored in it; only this holder knows it.
    token: String,
}

impl fmt::Debug for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockToken").finish_non_exhaustive()
    }
}

/// The answer to [`SharedTier::try_lock`].
#[derive(Debug)]
pub enum LockResult {
    /// This caller holds the lock: fetch, `put`, then `finish`.
    Acquired(LockToken),
    /// Another gateway (or request) holds it: `wait`, then look again.
    Held,
    /// Redis could not be asked: fetch without the lock.
    Unavailable,
}

impl LockResult {
    pub(super) fn acquired(key: String, token: String) -> LockResult {
        LockResult::Acquired(LockToken { key, token })
    }

    /// Label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            LockResult::Acquired(_) => "acquired",
            LockResult::Held => "held",
            LockResult::Unavailable => "unavailable",
        }
    }
}

/// The answer to [`SharedTier::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The lock was ours and is gone.
    Released,
    /// The lock had expired (and may belong to someone else now); nothing was deleted.
    Expired,
    /// Redis could not be asked; the lock expires by itself after `lock_ttl`.
    Unavailable,
}

impl ReleaseOutcome {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseOutcome::Released => "released",
            ReleaseOutcome::Expired => "expired",
            ReleaseOutcome::Unavailable => "unavailable",
        }
    }
}

impl SharedTier {
    /// Tries to take the fetch lock of (`app_tag`, `run`) for `lock_ttl`.
    pub async fn try_lock(&self, app_tag: &str, run: RunId) -> LockResult {
        let Ok(keys) = self.keys("try_lock", app_tag, run) else {
            return LockResult::Unavailable;
        };
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut cmd = redis::cmd("SET");
        cmd.arg(&keys.lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ceil_ms(self.config().lock_ttl));
        match self
            .call("try_lock", cmd.query_async::<Value>(&mut self.conn()))
            .await
        {
            Ok(Value::Okay) => LockResult::Acquired(LockToken {
                key: keys.lock,
                token,
            }),
            Ok(Value::SimpleString(s)) if s == "OK" => LockResult::Acquired(LockToken {
                key: keys.lock,
                token,
            }),
            Ok(Value::Nil) => LockResult::Held,
            Ok(_) => {
                self.fail(
                    "try_lock",
                    SharedError::Server,
                    &"unexpected reply to SET NX",
                );
                LockResult::Unavailable
            }
            Err(Unavailable) => LockResult::Unavailable,
        }
    }

    /// Gives the lock back, if it is still ours (without telling anyone; see [`Self::finish`]).
    pub async fn release(&self, token: LockToken) -> ReleaseOutcome {
        let mut inv = RELEASE.key(&token.key);
        inv.arg(&token.token);
        match self
            .call("release", inv.invoke_async::<i64>(&mut self.conn()))
            .await
        {
            Ok(1) => ReleaseOutcome::Released,
            Ok(_) => ReleaseOutcome::Expired,
            Err(Unavailable) => ReleaseOutcome::Unavailable,
        }
    }

    /// Ends the fetch of (`app_tag`, `run`) this caller holds the lock for, in one round trip:
    /// tells every gateway it is over (`stored` says whether it left a value to read), then
    /// gives the lock back if it is still ours.
    pub async fn finish(
        &self,
        token: LockToken,
        app_tag: &str,
        run: RunId,
        stored: bool,
    ) -> (NotifyOutcome, ReleaseOutcome) {
        let Ok(keys) = self.keys("finish", app_tag, run) else {
            // The lock is left to expire: without keys nothing can be published either.
            return (NotifyOutcome::Unavailable, ReleaseOutcome::Unavailable);
        };
        let mut inv = FINISH.key(&token.key);
        inv.arg(&token.token)
            .arg(&self.inner.channel)
            .arg(done_payload(&keys, stored));
        match self
            .call("finish", inv.invoke_async::<i64>(&mut self.conn()))
            .await
        {
            Ok(1) => (NotifyOutcome::Published, ReleaseOutcome::Released),
            Ok(_) => (NotifyOutcome::Published, ReleaseOutcome::Expired),
            Err(Unavailable) => (NotifyOutcome::Unavailable, ReleaseOutcome::Unavailable),
        }
    }

    /// Keys for a run, counting an unusable tag as a failure.
    pub(crate) fn keys(
        &self,
        op: &'static str,
        app_tag: &str,
        run: RunId,
    ) -> Result<RunKeys, Unavailable> {
        RunKeys::new(&self.config().key_prefix, app_tag, run).ok_or_else(|| {
            self.fail(op, SharedError::BadTag, &"app tag unusable in a key");
            Unavailable
        })
    }
}

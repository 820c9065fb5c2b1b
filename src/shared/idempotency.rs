//! Idempotency records in the shared tier: which run start a client's `Idempotency-Key` made,
//! for every replica.
//!
//! Invariant: a key is claimed once (`SET NX`, with the lease its caller gives) and the claim
//! answers with whatever was there before, in the same call, so two replicas never both start
//! the run; a record is replaced only by its claimant (the answer, for the record's lifetime)
//! and deleted only while it still holds that claimant's value (compare-and-delete). A failed
//! call is counted and answered as [`Unavailable`], never guessed.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use super::codec::ceil_ms;
use super::lock::RELEASE;
use super::{keys, SharedTier, Unavailable};

/// Claims `KEYS[1]` with `ARGV[1]` for `ARGV[2]` ms; answers 1 when claimed, else the value
/// held (nil if it expired in between).
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return redis.call('GET', KEYS[1])",
    )
});

/// What [`SharedTier::claim_idempotency`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// This call holds the key now.
    Claimed,
    /// The key holds this record (pending or done).
    Held(Vec<u8>),
    /// The key was held and expired between the two steps: ask again later.
    Vanished,
}

impl SharedTier {
    /// Claims `id` (the hash of client, app and key) with `pending` for `lease`.
    pub(crate) async fn claim_idempotency(
        &self,
        id: &str,
        pending: &[u8],
        lease: Duration,
    ) -> Result<Claim, Unavailable> {
        let key = keys::idempotency_key(&self.config().key_prefix, id);
        let mut inv = CLAIM.prepare_invoke();
        inv.key(&key).arg(pending).arg(ceil_ms(lease));
        let reply = self
            .call(
                "claim_idempotency",
                inv.invoke_async::<Value>(&mut self.conn()),
            )
            .await?;
        Ok(match reply {
            Value::Int(1) => Claim::Claimed,
            Value::BulkString(b) => Claim::Held(b),
            _ => Claim::Vanished,
        })
    }

    /// Replaces the claim of `id` with the finished `record`, kept for `ttl`.
    pub(crate) async fn store_idempotency(
        &self,
        id: &str,
        record: &[u8],
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let key = keys::idempotency_key(&self.config().key_prefix, id);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(record).arg("PX").arg(ceil_ms(ttl));
        self.call("store_idempotency", cmd.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Deletes the claim of `id` if it still holds `pending` (a start that made no run).
    pub(crate) async fn release_idempotency(
        &self,
        id: &str,
        pending: &[u8],
    ) -> Result<(), Unavailable> {
        let key = keys::idempotency_key(&self.config().key_prefix, id);
        let mut inv = RELEASE.prepare_invoke();
        inv.key(&key).arg(pending);
        self.call(
            "release_idempotency",
            inv.invoke_async::<Value>(&mut self.conn()),
        )
        .await
        .map(|_| ())
    }
}

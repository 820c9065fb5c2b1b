//! Ownership records in the shared tier: which client created an id, so every replica refuses
//! the same foreign clients.
//!
//! Invariant: a record is written once (`SET NX`), with the expiry its caller gives, and never
//! overwritten, so the first creator stays the owner fleet-wide; a failed call is counted and
//! answered as [`Unavailable`], never guessed.

use std::time::Duration;

use redis::Value;
use uuid::Uuid;

use super::{codec, keys, SharedTier, Unavailable};

impl SharedTier {
    /// Records `owner` as the creator of `id` (a `kind` of `app`) for `ttl`, unless a record is
    /// already there. `Ok(true)` when this call wrote it.
    pub(crate) async fn claim_owner(
        &self,
        app: &str,
        kind: &str,
        id: &Uuid,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, Unavailable> {
        let key = keys::owner_key(&self.config().key_prefix, app, kind, id);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key)
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(codec::ceil_ms(ttl));
        let reply = self
            .call("claim_owner", cmd.query_async::<Value>(&mut self.conn()))
            .await?;
        Ok(!matches!(reply, Value::Nil))
    }

    /// The recorded creator of `id` (a `kind` of `app`) and what Redis has left of its expiry;
    /// `None` when there is no record.
    pub(crate) async fn owner(
        &self,
        app: &str,
        kind: &str,
        id: &Uuid,
    ) -> Result<Option<(String, Duration)>, Unavailable> {
        let key = keys::owner_key(&self.config().key_prefix, app, kind, id);
        let mut p = redis::pipe();
        p.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let (value, pttl) = self
            .call("owner", p.query_async::<(Value, i64)>(&mut self.conn()))
            .await?;
        let owner = match value {
            Value::Nil => return Ok(None),
            Value::BulkString(b) => String::from_utf8(b).map_err(|_| {
                self.fail("owner", super::SharedError::Corrupt, &"owner is not UTF-8");
                Unavailable
            })?,
            _ => {
                self.fail(
                    "owner",
                    super::SharedError::Server,
                    &"GET answered a non-string",
                );
                return Err(Unavailable);
            }
        };
        // -2: gone since the GET; -1: no expiry (not written by this code, kept as read).
        let left = match u64::try_from(pttl) {
            Ok(ms) => Duration::from_millis(ms),
            Err(_) if pttl == -2 => return Ok(None),
            Err(_) => Duration::MAX,
        };
        Ok(Some((owner, left)))
    }
}

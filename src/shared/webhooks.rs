//! Webhook state in the shared tier: who wants a run's end announced, which announcements were
//! made, and the deliveries still to make, for every replica.
//!
//! Invariant: an announcement (run, client) is claimed once (`SET NX`), so one replica queues
//! it; a queued delivery is an item key (its record) and a member of one sorted set scored by
//! when it is due. Taking due deliveries moves their score past a lease in the same call, so a
//! delivery is tried by one replica at a time, and one whose replica vanished is due again once
//! the lease passes (at least once). A failed call is counted and answered as [`Unavailable`].

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use super::codec::ceil_ms;
use super::{keys, SharedTier, Unavailable};
use crate::run_id::RunId;

/// Takes up to `ARGV[3]` members of `KEYS[1]` due by `ARGV[1]` (ms), re-scoring them to
/// `ARGV[2]` (the lease's end); answers their ids.
static TAKE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
    redis.call('ZADD', KEYS[1], ARGV[2], id)
end
return ids",
    )
});

impl SharedTier {
    /// Records that `client` wants `run`'s end announced, for `ttl`.
    pub(crate) async fn want_webhook(
        &self,
        app_tag: &str,
        run: RunId,
        client: &str,
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let key = keys::webhook_want_key(&self.config().key_prefix, app_tag, run);
        let mut p = redis::pipe();
        p.cmd("SADD").arg(&key).arg(client).ignore();
        p.cmd("PEXPIRE").arg(&key).arg(ceil_ms(ttl)).ignore();
        self.call("want_webhook", p.query_async::<()>(&mut self.conn()))
            .await
    }

    /// The clients that want `run`'s end announced.
    pub(crate) async fn webhook_wanted(
        &self,
        app_tag: &str,
        run: RunId,
    ) -> Result<Vec<String>, Unavailable> {
        let key = keys::webhook_want_key(&self.config().key_prefix, app_tag, run);
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(&key);
        self.call(
            "webhook_wanted",
            cmd.query_async::<Vec<String>>(&mut self.conn()),
        )
        .await
    }

    /// Claims the announcement of `run`'s end to `client`; true when this call claimed it.
    pub(crate) async fn claim_webhook(
        &self,
        app_tag: &str,
        run: RunId,
        client: &str,
        ttl: Duration,
    ) -> Result<bool, Unavailable> {
        let key = keys::webhook_sent_key(&self.config().key_prefix, app_tag, run, client);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(1).arg("NX").arg("PX").arg(ceil_ms(ttl));
        let reply = self
            .call("claim_webhook", cmd.query_async::<Value>(&mut self.conn()))
            .await?;
        Ok(!matches!(reply, Value::Nil))
    }

    /// Queues (or re-queues) delivery `id` with its `record`, due at `due_ms` (Unix ms); the
    /// record is kept `keep`.
    pub(crate) async fn queue_webhook(
        &self,
        id: &str,
        record: &[u8],
        due_ms: u64,
        keep: Duration,
    ) -> Result<(), Unavailable> {
        let prefix = &self.config().key_prefix;
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(keys::webhook_item_key(prefix, id))
            .arg(record)
            .arg("PX")
            .arg(ceil_ms(keep))
            .ignore();
        p.cmd("ZADD")
            .arg(keys::webhook_queue_key(prefix))
            .arg(due_ms)
            .arg(id)
            .ignore();
        self.call("queue_webhook", p.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Takes up to `limit` deliveries due by `now_ms`, leased until `lease_ms`; each with its
    /// record (`None` when the record is gone).
    pub(crate) async fn take_due_webhooks(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, Unavailable> {
        let prefix = &self.config().key_prefix;
        let mut inv = TAKE_DUE.prepare_invoke();
        inv.key(keys::webhook_queue_key(prefix))
            .arg(now_ms)
            .arg(lease_ms)
            .arg(limit);
        let ids = self
            .call(
                "take_due_webhooks",
                inv.invoke_async::<Vec<String>>(&mut self.conn()),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for id in &ids {
            p.cmd("GET").arg(keys::webhook_item_key(prefix, id));
        }
        let records = self
            .call(
                "webhook_items",
                p.query_async::<Vec<Option<Vec<u8>>>>(&mut self.conn()),
            )
            .await?;
        Ok(ids.into_iter().zip(records).collect())
    }

    /// Removes delivery `id` (delivered, or given up).
    pub(crate) async fn drop_webhook(&self, id: &str) -> Result<(), Unavailable> {
        let prefix = &self.config().key_prefix;
        let mut p = redis::pipe();
        p.cmd("ZREM")
            .arg(keys::webhook_queue_key(prefix))
            .arg(id)
            .ignore();
        p.cmd("DEL")
            .arg(keys::webhook_item_key(prefix, id))
            .ignore();
        self.call("drop_webhook", p.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Deliveries queued, fleet-wide.
    pub(crate) async fn webhook_queue_len(&self) -> Result<u64, Unavailable> {
        let mut cmd = redis::cmd("ZCARD");
        cmd.arg(keys::webhook_queue_key(&self.config().key_prefix));
        self.call(
            "webhook_queue_len",
            cmd.query_async::<u64>(&mut self.conn()),
        )
        .await
    }
}

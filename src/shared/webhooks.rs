//! Webhook state in the shared tier: who wants a run's end announced, which replica follows
//! each wanted run, which announcements were made, and the deliveries still to make, for every
//! replica.
//!
//! Invariant: an announcement (run, client) is claimed and queued in one script (`SET NX`, then
//! the record and its place in the queue), so one replica queues it and a crash between the two
//! steps cannot lose it; a new one is refused while `max` deliveries are queued. Queued
//! deliveries and followed runs are members of sorted sets scored by when they are due (or when
//! their follower's lease ends); taking due members moves their score past a lease in the same
//! call, so one replica at a time has each, and one whose replica vanished is due again once
//! the lease passes (at least once). A failed call is counted and answered as [`Unavailable`].

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use super::codec::ceil_ms;
use super::{keys, SharedTier, Unavailable};
use crate::run_id::RunId;

/// Takes up to `ARGV[3]` members of `KEYS[1]` due by `ARGV[1]` (ms), re-scoring them to
/// `ARGV[2]` (the lease's end); answers them.
static TAKE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
    redis.call('ZADD', KEYS[1], ARGV[2], id)
end
return ids",
    )
});

/// Claims `KEYS[1]` (the announcement) for `ARGV[1]` ms and queues delivery `ARGV[6]`: its
/// record `ARGV[2]` in `KEYS[2]` (kept `ARGV[4]` ms), due at `ARGV[3]` in `KEYS[3]`. Answers 1
/// when queued, 0 when already claimed, 2 when `ARGV[5]` deliveries are queued already.
static CLAIM_AND_QUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
    return 2
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
    return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[6])
return 1",
    )
});

/// What [`SharedTier::claim_and_queue_webhook`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Announced {
    /// Claimed and queued by this call.
    Queued,
    /// Another call (on any replica) claimed it first.
    Claimed,
    /// The queue is full: nothing claimed, nothing queued.
    Full,
}

/// One delivery taken from the queue: its id and record (`None` when the record is gone).
pub(crate) type Taken = (String, Option<Vec<u8>>);

/// One announcement to claim and queue.
pub(crate) struct NewDelivery<'a> {
    pub app_tag: &'a str,
    pub run: RunId,
    pub client: &'a str,
    pub id: &'a str,
    pub record: &'a [u8],
    /// How long the claim and the record are kept.
    pub keep: Duration,
    /// Deliveries queued at most.
    pub max: usize,
}

impl SharedTier {
    /// Records that `client` wants `run`'s end announced, for `ttl`, and that this replica
    /// follows the run until `lease_ms` (Unix ms).
    pub(crate) async fn want_webhook(
        &self,
        app_tag: &str,
        run: RunId,
        client: &str,
        ttl: Duration,
        lease_ms: u64,
    ) -> Result<(), Unavailable> {
        let prefix = &self.config().key_prefix;
        let key = keys::webhook_want_key(prefix, app_tag, run);
        let mut p = redis::pipe();
        p.cmd("SADD").arg(&key).arg(client).ignore();
        p.cmd("PEXPIRE").arg(&key).arg(ceil_ms(ttl)).ignore();
        p.cmd("ZADD")
            .arg(keys::webhook_follow_key(prefix))
            .arg(lease_ms)
            .arg(follow_member(app_tag, run))
            .ignore();
        self.call("want_webhook", p.query_async::<()>(&mut self.conn()))
            .await
    }

    /// The clients that want `run`'s end announced, and how long that wish lasts.
    pub(crate) async fn webhook_wanted(
        &self,
        app_tag: &str,
        run: RunId,
    ) -> Result<(Vec<String>, Duration), Unavailable> {
        let key = keys::webhook_want_key(&self.config().key_prefix, app_tag, run);
        let mut p = redis::pipe();
        p.cmd("SMEMBERS").arg(&key);
        p.cmd("PTTL").arg(&key);
        let (clients, ttl) = self
            .call(
                "webhook_wanted",
                p.query_async::<(Vec<String>, i64)>(&mut self.conn()),
            )
            .await?;
        Ok((clients, Duration::from_millis(ttl.max(0) as u64)))
    }

    /// Sets the score of those of `members` still in `set` to `score_ms`: a lease renewed, or
    /// released (a score in the past).
    async fn rescore(
        &self,
        op: &'static str,
        set: String,
        members: &[String],
        score_ms: u64,
    ) -> Result<(), Unavailable> {
        if members.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(set).arg("XX");
        for m in members {
            cmd.arg(score_ms).arg(m);
        }
        self.call(op, cmd.query_async::<()>(&mut self.conn())).await
    }

    /// Renews (or, with a past time, releases) this replica's lease on the runs it follows.
    pub(crate) async fn lease_follows(
        &self,
        members: &[String],
        until_ms: u64,
    ) -> Result<(), Unavailable> {
        let set = keys::webhook_follow_key(&self.config().key_prefix);
        self.rescore("lease_follows", set, members, until_ms).await
    }

    /// Takes up to `limit` followed runs whose lease ended by `now_ms` (their follower is
    /// gone), leased to the caller until `lease_ms`.
    pub(crate) async fn take_orphan_follows(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, RunId)>, Unavailable> {
        let set = keys::webhook_follow_key(&self.config().key_prefix);
        let members = self
            .take_due("take_orphan_follows", set.clone(), now_ms, lease_ms, limit)
            .await?;
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            match parse_follow_member(&m) {
                Some(parsed) => out.push(parsed),
                None => self.end_follow(&m).await?,
            }
        }
        Ok(out)
    }

    /// The run of follow-set `member` is followed no more (it ended, or the wish expired).
    pub(crate) async fn end_follow(&self, member: &str) -> Result<(), Unavailable> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(keys::webhook_follow_key(&self.config().key_prefix))
            .arg(member);
        self.call("end_follow", cmd.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Claims the announcement `d` and queues its delivery, due now.
    pub(crate) async fn claim_and_queue_webhook(
        &self,
        d: &NewDelivery<'_>,
        due_ms: u64,
    ) -> Result<Announced, Unavailable> {
        let prefix = &self.config().key_prefix;
        let mut inv = CLAIM_AND_QUEUE.prepare_invoke();
        inv.key(keys::webhook_sent_key(prefix, d.app_tag, d.run, d.client))
            .key(keys::webhook_item_key(prefix, d.id))
            .key(keys::webhook_queue_key(prefix))
            .arg(ceil_ms(d.keep))
            .arg(d.record)
            .arg(due_ms)
            .arg(ceil_ms(d.keep))
            .arg(d.max)
            .arg(d.id);
        let reply = self
            .call("claim_webhook", inv.invoke_async::<Value>(&mut self.conn()))
            .await?;
        Ok(match reply {
            Value::Int(1) => Announced::Queued,
            Value::Int(2) => Announced::Full,
            _ => Announced::Claimed,
        })
    }

    /// Re-queues delivery `id` with its `record`, due at `due_ms` (Unix ms); the record is kept
    /// `keep`.
    pub(crate) async fn requeue_webhook(
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
        self.call("requeue_webhook", p.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Hands deliveries this replica holds back to the queue, due at `due_ms` (shutdown).
    pub(crate) async fn release_webhooks(
        &self,
        ids: &[String],
        due_ms: u64,
    ) -> Result<(), Unavailable> {
        let set = keys::webhook_queue_key(&self.config().key_prefix);
        self.rescore("release_webhooks", set, ids, due_ms).await
    }

    /// Takes up to `limit` deliveries due by `now_ms`, leased until `lease_ms`; each with its
    /// record.
    pub(crate) async fn take_due_webhooks(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<Taken>, Unavailable> {
        let prefix = &self.config().key_prefix;
        let ids = self
            .take_due(
                "take_due_webhooks",
                keys::webhook_queue_key(prefix),
                now_ms,
                lease_ms,
                limit,
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

    async fn take_due(
        &self,
        op: &'static str,
        set: String,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>, Unavailable> {
        let mut inv = TAKE_DUE.prepare_invoke();
        inv.key(set).arg(now_ms).arg(lease_ms).arg(limit);
        self.call(op, inv.invoke_async::<Vec<String>>(&mut self.conn()))
            .await
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

/// A followed run's member in the follow set.
pub(crate) fn follow_member(app_tag: &str, run: RunId) -> String {
    format!("{app_tag}:{run}")
}

/// The app tag and run of a member of the follow set (the run id holds no `:`).
fn parse_follow_member(member: &str) -> Option<(String, RunId)> {
    let (tag, run) = member.rsplit_once(':')?;
    let run = uuid::Uuid::try_parse(run).ok()?;
    Some((tag.to_owned(), RunId::from(run)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_members_read_back() {
        let run = RunId::from(uuid::Uuid::from_u128(7));
        let m = follow_member("a1:b2", run);
        assert_eq!(parse_follow_member(&m), Some(("a1:b2".to_owned(), run)));
        assert_eq!(parse_follow_member("no-run"), None);
        assert_eq!(parse_follow_member("tag:not-a-uuid"), None);
    }
}

//! Usage figures in the shared tier: which runs the fleet has counted, and the daily figures
//! per (UTC day, client, app) every replica adds to and reads.
//!
//! Invariant: a run is claimed for counting once (`SET NX`, with the expiry its caller gives),
//! so exactly one replica counts it while the claim lasts; daily figures are only ever added to
//! (`HINCRBY`/`HINCRBYFLOAT`) in one hash per day that expires after its caller's retention, so
//! a replica's restart loses nothing and any replica reads the fleet's totals. A failed call is
//! counted and answered as [`Unavailable`], never guessed.

use std::time::Duration;

use super::{codec, keys, SharedTier, Unavailable};

/// One addition to a day's figures: `(field, amount)`, integers and floats apart.
#[derive(Debug, Default)]
pub(crate) struct Increments {
    pub ints: Vec<(String, u64)>,
    pub floats: Vec<(String, f64)>,
}

impl SharedTier {
    /// Claims the counting of `run` of `app` for `ttl`. `Ok(true)` when this call claimed it
    /// (count it), `Ok(false)` when another call did.
    pub(crate) async fn claim_usage(
        &self,
        app: &str,
        run: &str,
        ttl: Duration,
    ) -> Result<bool, Unavailable> {
        let key = keys::usage_claim_key(&self.config().key_prefix, app, run);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(codec::ceil_ms(ttl));
        let reply = self
            .call(
                "claim_usage",
                cmd.query_async::<redis::Value>(&mut self.conn()),
            )
            .await?;
        Ok(!matches!(reply, redis::Value::Nil))
    }

    /// Adds to the figures of `day` (`YYYY-MM-DD`), whose hash then expires after `keep`.
    pub(crate) async fn add_usage(
        &self,
        day: &str,
        add: &Increments,
        keep: Duration,
    ) -> Result<(), Unavailable> {
        let key = keys::usage_day_key(&self.config().key_prefix, day);
        let mut p = redis::pipe();
        for (field, n) in &add.ints {
            p.cmd("HINCRBY").arg(&key).arg(field).arg(*n).ignore();
        }
        for (field, x) in &add.floats {
            p.cmd("HINCRBYFLOAT").arg(&key).arg(field).arg(*x).ignore();
        }
        p.cmd("PEXPIRE")
            .arg(&key)
            .arg(codec::ceil_ms(keep))
            .ignore();
        self.call("add_usage", p.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Every field of each of `days`' figures, in the order given.
    pub(crate) async fn usage_days(
        &self,
        days: &[String],
    ) -> Result<Vec<Vec<(String, String)>>, Unavailable> {
        let prefix = &self.config().key_prefix;
        let mut p = redis::pipe();
        for day in days {
            p.cmd("HGETALL").arg(keys::usage_day_key(prefix, day));
        }
        self.call(
            "usage_days",
            p.query_async::<Vec<Vec<(String, String)>>>(&mut self.conn()),
        )
        .await
    }

    /// The values of `fields` in `day`'s figures (`None` where absent).
    pub(crate) async fn usage_fields(
        &self,
        day: &str,
        fields: &[String],
    ) -> Result<Vec<Option<String>>, Unavailable> {
        let key = keys::usage_day_key(&self.config().key_prefix, day);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key).arg(fields);
        self.call(
            "usage_fields",
            cmd.query_async::<Vec<Option<String>>>(&mut self.conn()),
        )
        .await
    }
}

//! Runs seen starting, for every replica: a run's row may reach Dify's database a moment after
//! its id is handed out, and a replica that did not pass the start must not take the upstream's
//! 404 for it as final (see `cache.not_found_grace` in [`crate::cache::fetch`]).
//!
//! Invariant: a mark lives exactly the grace (`SET … PX`), so what Redis has left of it is what
//! is left of the grace; a failed call is counted and answered as [`Unavailable`] (the caller
//! then goes by what it saw itself).

use std::time::Duration;

use redis::Value;

use super::codec::ceil_ms;
use super::{keys, SharedTier, Unavailable};
use crate::run_id::RunId;

impl SharedTier {
    /// Marks `run` of the app tagged `app_tag` as just started, for `grace`.
    pub(crate) async fn mark_started(
        &self,
        app_tag: &str,
        run: RunId,
        grace: Duration,
    ) -> Result<(), Unavailable> {
        let key = keys::started_key(&self.config().key_prefix, app_tag, run);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(1).arg("PX").arg(ceil_ms(grace));
        self.call("mark_started", cmd.query_async::<()>(&mut self.conn()))
            .await
    }

    /// What is left of `run`'s grace, when some replica marked it started.
    pub(crate) async fn started_left(
        &self,
        app_tag: &str,
        run: RunId,
    ) -> Result<Option<Duration>, Unavailable> {
        let key = keys::started_key(&self.config().key_prefix, app_tag, run);
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(&key);
        let left = self
            .call("started_left", cmd.query_async::<Value>(&mut self.conn()))
            .await?;
        Ok(match left {
            Value::Int(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            _ => None,
        })
    }
}

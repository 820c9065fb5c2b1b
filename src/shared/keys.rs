//! Where the shared tier keeps things: key names, the notification channel and app tags.
//!
//! Invariant: every key starts with the configured prefix and the format version (`v1:`), so
//! `purge_all` touches nothing else and a future format never reads this one; a run's value and
//! lock keys carry the same cluster hash tag `{app_tag:run_id}`, so they share a slot. The app
//! tag is the caller's opaque app fingerprint (`App::tag`: a hash of upstream URL and key), so
//! two apps never share a key and the API key never enters the key space.

use crate::run_id::RunId;

/// Longest accepted app tag.
pub const MAX_APP_TAG: usize = 64;

/// The names one (app, run) pair uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunKeys {
    /// `{prefix}v1:run:{app_tag:run_id}`: the encoded answer.
    pub value: String,
    /// `{prefix}v1:lock:{app_tag:run_id}`: the fleet-wide fetch lock.
    pub lock: String,
    /// `app_tag:run_id`: names the run in notifications and in the local waiter table.
    pub run: String,
}

impl RunKeys {
    /// The names for (`app_tag`, `run`), or `None` when the tag is unusable.
    pub(crate) fn new(prefix: &str, app_tag: &str, run: RunId) -> Option<RunKeys> {
        if !valid_app_tag(app_tag) {
            return None;
        }
        let run = format!("{app_tag}:{run}");
        Some(RunKeys {
            value: format!("{prefix}v1:run:{{{run}}}"),
            lock: format!("{prefix}v1:lock:{{{run}}}"),
            run,
        })
    }
}

/// The channel every gateway of the deployment publishes fetch completions on.
pub(crate) fn done_channel(prefix: &str) -> String {
    format!("{prefix}v1:done")
}

/// `{prefix}v1:own:{app}:{kind}:{id}`: which client created this id of this app (see
/// `crate::ownership`). Outside the value pattern, so purging the cache keeps it. App names
/// are plain (`[A-Za-z0-9._-]`, config validation), so the key holds no hash tag.
pub(crate) fn owner_key(prefix: &str, app: &str, kind: &str, id: &uuid::Uuid) -> String {
    format!("{prefix}v1:own:{app}:{kind}:{}", id.hyphenated())
}

/// `{prefix}v1:usage:counted:{app}:{run}`: this run's usage was counted (see `crate::usage`).
pub(crate) fn usage_claim_key(prefix: &str, app: &str, run: &str) -> String {
    format!("{prefix}v1:usage:counted:{app}:{run}")
}

/// `{prefix}v1:idem:{id}`: what a run start with an `Idempotency-Key` made (see
/// `crate::idempotency`); `id` is the hex hash of client, app and key, so no client bytes enter
/// the key space.
pub(crate) fn idempotency_key(prefix: &str, id: &str) -> String {
    format!("{prefix}v1:idem:{id}")
}

/// `{prefix}v1:started:{app_tag}:{run}`: a replica saw this run start within
/// `cache.not_found_grace` (see `crate::shared::starts`). The app tag is the opaque fingerprint
/// of [`RunKeys`], so the key space holds no app key.
pub(crate) fn started_key(prefix: &str, app_tag: &str, run: RunId) -> String {
    format!("{prefix}v1:started:{app_tag}:{run}")
}

/// `{prefix}v1:hook:want:{app_tag}:{run}`: the clients that want this run's end announced
/// (see `crate::webhooks`).
pub(crate) fn webhook_want_key(prefix: &str, app_tag: &str, run: RunId) -> String {
    format!("{prefix}v1:hook:want:{app_tag}:{run}")
}

/// `{prefix}v1:{hook}:sent:{app_tag}:{run}:{client}`: this run's end was queued for this
/// client. The webhook keys a script touches together share the hash tag `{hook}`, so they
/// share a cluster slot.
pub(crate) fn webhook_sent_key(prefix: &str, app_tag: &str, run: RunId, client: &str) -> String {
    format!("{prefix}v1:{{hook}}:sent:{app_tag}:{run}:{client}")
}

/// `{prefix}v1:{hook}:queue`: the deliveries to make, scored by when each is due (Unix ms).
pub(crate) fn webhook_queue_key(prefix: &str) -> String {
    format!("{prefix}v1:{{hook}}:queue")
}

/// `{prefix}v1:{hook}:item:{id}`: one queued delivery's record.
pub(crate) fn webhook_item_key(prefix: &str, id: &str) -> String {
    format!("{prefix}v1:{{hook}}:item:{id}")
}

/// `{prefix}v1:{hook}:follow`: the runs wanted for webhooks (`{app_tag}:{run}`), scored by when
/// the lease of the replica following each ends (Unix ms).
pub(crate) fn webhook_follow_key(prefix: &str) -> String {
    format!("{prefix}v1:{{hook}}:follow")
}

/// `{prefix}v1:usage:day:{day}`: the hash of one UTC day's usage figures.
pub(crate) fn usage_day_key(prefix: &str, day: &str) -> String {
    format!("{prefix}v1:usage:day:{day}")
}

/// The SCAN pattern that matches every value (not locks) of the deployment. The prefix holds no
/// glob characters (config validation refuses them).
pub(crate) fn value_pattern(prefix: &str) -> String {
    format!("{prefix}v1:run:*")
}

/// A notification payload: `app_tag:run_id` then `:1` when the fetch stored a value, `:0` when it
/// did not.
pub(crate) fn done_payload(run: &RunKeys, stored: bool) -> String {
    format!("{}:{}", run.run, u8::from(stored))
}

/// Splits a notification payload into the run name and the stored flag; `None` if malformed.
pub(crate) fn parse_done_payload(payload: &[u8]) -> Option<(&str, bool)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (run, flag) = text.rsplit_once(':')?;
    let stored = match flag {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    Some((run, stored))
}

/// Is `tag` usable inside a key: 1 to [`MAX_APP_TAG`] printable ASCII bytes, no braces (they
/// would move the cluster hash tag)?
pub fn valid_app_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_APP_TAG
        && tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunId {
        RunId::parse("0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10").unwrap()
    }

    /// The slot-deciding part of a key, as Redis Cluster computes it.
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn value_and_lock_share_a_hash_tag() {
        let k = RunKeys::new("gw:", "abc123", run()).unwrap();
        assert_eq!(
            k.value,
            "gw:v1:run:{abc123:0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10}"
        );
        assert_eq!(
            k.lock,
            "gw:v1:lock:{abc123:0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10}"
        );
        assert_eq!(hash_tag(&k.value), hash_tag(&k.lock));
        assert_eq!(hash_tag(&k.value), k.run);
    }

    #[test]
    fn bad_tags_are_refused() {
        for bad in ["", "a{b", "a}b", "a b", "a\nb", &"x".repeat(65), "é"] {
            assert!(RunKeys::new("gw:", bad, run()).is_none(), "{bad:?}");
        }
        assert!(RunKeys::new("gw:", &"x".repeat(64), run()).is_some());
    }

    #[test]
    fn payloads_round_trip() {
        let k = RunKeys::new("gw:", "t:with:colons", run()).unwrap();
        for stored in [true, false] {
            let p = done_payload(&k, stored);
            assert_eq!(parse_done_payload(p.as_bytes()), Some((&*k.run, stored)));
        }
        for bad in [&b""[..], b"x", b"x:2", b"\xff:1"] {
            assert_eq!(parse_done_payload(bad), None);
        }
    }
}

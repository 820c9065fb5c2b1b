//! Ownership: which client created a run, task or file of an app through the gateway.
//!
//! Invariant: once an id is recorded for a client, and for as long as its record lasts
//! (`ownership.ttl`), [`Ownership::check`] answers [`Access::Foreign`] to every other client of
//! that app while the app isolates clients; a record held in memory is answered from memory,
//! so no shared-tier failure can let a foreign client in for it. An id never recorded is
//! [`Access::Unknown`]: readable by any client of the app. When the shared tier cannot be asked
//! about an id this replica does not hold, the answer is [`Access::Unverified`], which is let in
//! (fail open; the reasoning is in the README: Dify's ids are random UUIDs a foreign client
//! cannot guess, so the record is defence in depth, not the only lock).
//!
//! Records live in memory, bounded by `ownership.max_records` (least recently used first out, so
//! a new record always gets in) and, when the shared tier is configured, in Redis too
//! (`{prefix}v1:own:{app}:{kind}:{id}`, written once with the same expiry), so every replica
//! enforces them and a record evicted from memory is still found. A replica remembers the shared
//! tier's "no record" for `ownership.unknown_ttl`, so a much-read run the gateway never saw
//! start costs one Redis lookup per that time, not one per read. That is sound because handlers
//! record an id before it reaches any client: no one can ask about an id before its record
//! exists.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::policy::EvictionPolicy;
use tokio::time::Instant;
use uuid::Uuid;

use crate::cache::AppId;
use crate::config::{AppConfig, OwnershipConfig};
use crate::shared::SharedTier;

/// What kind of id a record is about; part of the record's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A workflow run id (`workflow_run_id`).
    Run,
    /// A task id (`task_id`), which stops its run.
    Task,
    /// An uploaded file id.
    File,
}

impl Kind {
    /// Label for keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Run => "run",
            Kind::Task => "task",
            Kind::File => "file",
        }
    }
}

/// What [`Ownership::check`] found for a client asking about an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The client created it.
    Owner,
    /// Another client created it: answer Dify's 404, as if it did not exist.
    Foreign,
    /// No record: the gateway never saw it created (or its record expired). Let in.
    Unknown,
    /// Not held here and the shared tier could not be asked. Let in (see the module doc).
    Unverified,
    /// The app does not isolate clients, or the gateway runs without clients. Let in.
    NotIsolated,
}

impl Access {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Owner => "owner",
            Access::Foreign => "foreign",
            Access::Unknown => "unknown",
            Access::Unverified => "unverified",
            Access::NotIsolated => "not_isolated",
        }
    }

    /// May the client go on? Only a foreign client is refused.
    pub fn allowed(self) -> bool {
        self != Access::Foreign
    }
}

/// Where [`Ownership::record`] kept a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// In memory; there is no shared tier.
    Local,
    /// In memory and in the shared tier.
    Shared,
    /// In memory only: the shared tier could not be written, so other replicas do not know it.
    LocalOnly,
    /// Nothing: there is no client to own it (the gateway runs open).
    Nobody,
}

impl Recorded {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Recorded::Local => "local",
            Recorded::Shared => "shared",
            Recorded::LocalOnly => "local_only",
            Recorded::Nobody => "nobody",
        }
    }
}

/// One record in memory.
#[derive(Debug, Clone)]
struct Record {
    /// The creating client's configured name; `None` when the shared tier said it holds no
    /// record (remembered for `ownership.unknown_ttl`).
    client: Option<Arc<str>>,
    /// When it stops counting (tokio's clock, so tests can move it).
    until: Instant,
}

/// An app as ownership sees it.
#[derive(Debug)]
struct OwnedApp {
    /// Its configured name: the app's part of a shared-tier key, stable across key rotations
    /// and replicas.
    name: String,
    /// `apps.isolate_clients`, changed by a reload.
    isolate: AtomicBool,
}

/// The ownership records of every app. Cheap to share behind the [`crate::Gateway`].
pub struct Ownership {
    /// Records held here, by (app, kind, id).
    local: moka::sync::Cache<(AppId, Kind, Uuid), Record>,
    /// How long a record lasts.
    ttl: Duration,
    /// How long the shared tier's "no record" is remembered.
    unknown_ttl: Duration,
    /// Indexed by [`AppId`].
    apps: Vec<OwnedApp>,
    /// Where records are shared with other replicas, when configured.
    shared: Option<SharedTier>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("records", &self.local.entry_count())
            .field("ttl", &self.ttl)
            .field("apps", &self.apps)
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

impl Ownership {
    /// Records for `apps` (in their configured order, so index = [`AppId`]), bounded by
    /// `config`, kept in `shared` too when given.
    pub fn new(
        config: &OwnershipConfig,
        apps: &[AppConfig],
        shared: Option<SharedTier>,
    ) -> Ownership {
        let local = moka::sync::Cache::builder()
            .max_capacity(config.max_records)
            // LRU, not moka's default TinyLFU: its admission filter could turn a new record
            // away when memory is full of old ones, and new runs are the ones being watched.
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(config.ttl)
            .build();
        Ownership {
            local,
            ttl: config.ttl,
            unknown_ttl: config.unknown_ttl,
            apps: apps
                .iter()
                .map(|a| OwnedApp {
                    name: a.name.clone(),
                    isolate: AtomicBool::new(a.isolate_clients),
                })
                .collect(),
            shared,
        }
    }

    /// Follows a reloaded configuration's `isolate_clients` (the apps are the same ones: a
    /// reload that changes them is refused before this).
    pub fn set_isolation(&self, apps: &[AppConfig]) {
        for (a, c) in self.apps.iter().zip(apps) {
            a.isolate.store(c.isolate_clients, Ordering::Relaxed);
        }
    }

    /// Does `app` hide its clients' ids from each other?
    pub fn isolates(&self, app: AppId) -> bool {
        self.app(app)
            .is_some_and(|a| a.isolate.load(Ordering::Relaxed))
    }

    /// Records that `client` created `id`, a `kind` of `app`. The first record of an id wins; a
    /// later one for another client changes nothing. Recorded whether or not the app isolates
    /// clients, so turning isolation on protects what was created before. Awaits the shared
    /// tier (at most `shared.timeout`): call it before the id reaches the client, so no replica
    /// can be asked about an id it cannot know yet.
    pub async fn record(&self, app: AppId, kind: Kind, id: Uuid, client: Option<&str>) -> Recorded {
        let (Some(client), Some(a)) = (client, self.app(app)) else {
            return Recorded::Nobody;
        };
        let key = (app, kind, id);
        let now = Instant::now();
        match self.local.get(&key) {
            Some(r) if r.until > now && r.client.is_some() => {}
            _ => self.local.insert(
                key,
                Record {
                    client: Some(Arc::from(client)),
                    until: now + self.ttl,
                },
            ),
        }
        let Some(shared) = &self.shared else {
            return Recorded::Local;
        };
        match shared
            .claim_owner(&a.name, kind.as_str(), &id, client, self.ttl)
            .await
        {
            Ok(_) => Recorded::Shared,
            Err(_) => {
                tracing::debug!(kind = kind.as_str(), %id, "ownership kept on this replica only");
                Recorded::LocalOnly
            }
        }
    }

    /// Records a started run: its id and, when given, its task id (the handle that stops it),
    /// both for `client`. Dify's `workflow_started` event carries both.
    pub async fn record_run(
        &self,
        app: AppId,
        run: Uuid,
        task: Option<Uuid>,
        client: Option<&str>,
    ) -> Recorded {
        let recorded = self.record(app, Kind::Run, run, client).await;
        match task {
            Some(task) => worst(recorded, self.record(app, Kind::Task, task, client).await),
            None => recorded,
        }
    }

    /// [`Ownership::check`] when this replica's memory answers it: `None` when the shared tier
    /// must be asked (no record held here, or a held one has run out).
    pub fn check_now(
        &self,
        app: AppId,
        kind: Kind,
        id: Uuid,
        client: Option<&str>,
    ) -> Option<Access> {
        let Some(client) = client else {
            return Some(Access::NotIsolated);
        };
        if !self.isolates(app) {
            return Some(Access::NotIsolated);
        }
        match self.local.get(&(app, kind, id)) {
            Some(r) if r.until > Instant::now() => Some(
                r.client
                    .map_or(Access::Unknown, |owner| judge(&owner, client)),
            ),
            Some(_) => None,
            None => (self.shared.is_none() || self.app(app).is_none()).then_some(Access::Unknown),
        }
    }

    /// May `client` (its configured name; `None` when the gateway runs open) use `id`, a `kind`
    /// of `app`? Answered from memory when the record is held here, else from the shared tier
    /// (and then held here for what is left of it; a "no record" for `ownership.unknown_ttl`).
    pub async fn check(&self, app: AppId, kind: Kind, id: Uuid, client: Option<&str>) -> Access {
        if let Some(access) = self.check_now(app, kind, id, client) {
            return access;
        }
        let Some(client) = client else {
            return Access::NotIsolated;
        };
        let key = (app, kind, id);
        let now = Instant::now();
        // A record held here has run out: asked again below.
        if self.local.get(&key).is_some_and(|r| r.until <= now) {
            self.local.invalidate(&key);
        }
        let (Some(shared), Some(a)) = (&self.shared, self.app(app)) else {
            return Access::Unknown;
        };
        match shared.owner(&a.name, kind.as_str(), &id).await {
            Ok(Some((owner, left))) => {
                let access = judge(&owner, client);
                self.local.insert(
                    key,
                    Record {
                        client: Some(Arc::from(owner)),
                        until: now + left.min(self.ttl),
                    },
                );
                access
            }
            Ok(None) => {
                if !self.unknown_ttl.is_zero() {
                    let until = now + self.unknown_ttl;
                    self.local.insert(
                        key,
                        Record {
                            client: None,
                            until,
                        },
                    );
                }
                Access::Unknown
            }
            Err(_) => {
                tracing::debug!(
                    kind = kind.as_str(),
                    %id,
                    access = Access::Unverified.as_str(),
                    "ownership not verifiable without the shared tier; let in"
                );
                Access::Unverified
            }
        }
    }

    /// The client that created `id`, a `kind` of `app`, when a record says so: from memory when
    /// held here, else from the shared tier (not kept here; a failed lookup is `None`). Unlike
    /// [`Ownership::check`] it answers whether or not the app isolates clients (usage is counted
    /// to a run's creator either way).
    pub async fn owner_of(&self, app: AppId, kind: Kind, id: Uuid) -> Option<Arc<str>> {
        if let Some(r) = self.local.get(&(app, kind, id)) {
            if r.until > Instant::now() {
                return r.client;
            }
        }
        let (shared, a) = (self.shared.as_ref()?, self.app(app)?);
        match shared.owner(&a.name, kind.as_str(), &id).await {
            Ok(Some((owner, _))) => Some(Arc::from(owner)),
            _ => None,
        }
    }

    /// Records held in memory (after moka's pending maintenance; for operations and tests).
    pub fn held(&self) -> u64 {
        self.local.run_pending_tasks();
        self.local.entry_count()
    }

    fn app(&self, app: AppId) -> Option<&OwnedApp> {
        self.apps.get(app.0 as usize)
    }
}

/// Owner or foreign, by name.
fn judge(owner: &str, client: &str) -> Access {
    if owner == client {
        Access::Owner
    } else {
        Access::Foreign
    }
}

/// The less complete of two records' fates.
fn worst(a: Recorded, b: Recorded) -> Recorded {
    if a == Recorded::LocalOnly || b == Recorded::LocalOnly {
        Recorded::LocalOnly
    } else {
        a
    }
}

#[cfg(test)]
#[path = "ownership_tests.rs"]
mod tests;

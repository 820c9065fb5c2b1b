//! Usage metering and daily quotas: who ran what, per UTC day, client and app.
//!
//! Invariant: a finished run is counted once per run id — on a replica by its bounded memory of
//! counted runs (kept [`CLAIM_TTL`]), and fleet-wide, with the shared tier, by a claim written
//! once in Redis (`SET NX`, same expiry) — so exactly one replica adds it to the daily figures
//! and to the `dify_gateway_usage_*` counters. A run is counted to the client that started it
//! through the gateway, else to the client that first read it ([`OPEN_CLIENT`] when the gateway
//! runs open). Daily figures (runs by final status, `total_tokens`, `total_steps`,
//! `elapsed_time`) live in Redis with the shared tier, one hash per day kept [`KEEP`], so they
//! survive restarts and every replica reads the fleet's totals; without it they live in this
//! replica's memory and are lost on restart. Quotas read today's figures: fleet-wide with the
//! shared tier, this replica's without; when Redis cannot be asked, a start is let in (fail
//! open, as for rate limits: the meter must never become the outage).
//!
//! When the shared tier cannot be asked whether a run was counted, this replica counts it
//! (a run may then be counted twice in the fleet, never lost) and tries to add it to Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::{ClientConfig, Quota};
use crate::metrics::{Metrics, UsageLabels, UsageRunLabels};
use crate::shared::{Increments, SharedTier};

/// The client name runs are counted to when the gateway runs open (no `[[clients]]`).
pub const OPEN_CLIENT: &str = "-";
/// How long a run is remembered as counted (in memory and in Redis).
pub const CLAIM_TTL: Duration = Duration::from_secs(48 * 3600);
/// How long a day's figures are kept in Redis.
pub const KEEP: Duration = Duration::from_secs(400 * 86_400);
/// Most days one usage query may span.
pub const MAX_DAYS: u64 = 366;
/// Runs remembered as counted on one replica (the least used make room first).
const MAX_CLAIMS: usize = 1_000_000;
const DAY: u64 = 86_400;

/// What [`Usage::finished`] did with a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Counted, by this replica.
    Counted,
    /// Already counted (by this replica or, per the shared tier, by another).
    Duplicate,
    /// Counted here; the shared tier could not be asked or written, so the fleet may count it
    /// again or miss it in Redis's figures (logged).
    Unshared,
}

impl Counted {
    /// Label for logs and tests.
    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Counted => "counted",
            Counted::Duplicate => "duplicate",
            Counted::Unshared => "unshared",
        }
    }
}

/// Why usage could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    /// A date is not `YYYY-MM-DD`, or `from` is after `to`, or the range is too long.
    #[error("{0}")]
    BadRange(String),
    /// The shared tier holds the figures and could not be read.
    #[error("usage figures are in the shared tier, which is unavailable")]
    Unavailable,
}

/// One day's figures of a client and app.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Finished runs by final status.
    pub runs: BTreeMap<String, u64>,
    pub tokens: u64,
    pub steps: u64,
    pub run_seconds: f64,
}

impl Figures {
    /// Runs of every status.
    pub fn total_runs(&self) -> u64 {
        self.runs.values().sum()
    }
}

/// A row of `/admin/usage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub day: String,
    pub client: String,
    pub app: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// One finished run's figures, as Dify reports them.
#[derive(Debug, Clone, Copy)]
pub struct RunFigures<'a> {
    pub status: &'a str,
    pub total_tokens: u64,
    pub total_steps: u64,
    pub elapsed_time: f64,
}

/// The figures of a finished run as Dify reports them, with its field names: a run detail's
/// body, a blocking run's `data`, a `workflow_finished` event's `data` all carry them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FinishedRun {
    /// The run's id, when the object names it (`id`).
    pub id: Option<String>,
    pub status: String,
    pub total_tokens: Option<u64>,
    pub total_steps: Option<u64>,
    pub elapsed_time: Option<f64>,
}

impl FinishedRun {
    /// The figures of a JSON object with Dify's fields; `None` when it is not one, or when its
    /// status is not final (a run still going is not counted).
    pub fn parse(json: &[u8]) -> Option<FinishedRun> {
        let run: FinishedRun = serde_json::from_slice(json).ok()?;
        is_final(&run.status).then_some(run)
    }
}

/// Usage figures and quotas. Cheap to share behind the [`crate::Gateway`].
pub struct Usage {
    /// Runs counted by this replica, by (app, run id), with when: an entry older than
    /// [`CLAIM_TTL`] counts as absent when read, so no expiry bookkeeping runs on the path of
    /// every finished run.
    claims: quick_cache::sync::Cache<(String, String), Instant>,
    /// Daily figures by (day, client, app), when there is no shared tier.
    local: Mutex<BTreeMap<(String, String, String), Figures>>,
    shared: Option<SharedTier>,
    /// Each client's quotas, following reloads.
    quotas: ArcSwap<HashMap<String, (String, Quota)>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage")
            .field("claims", &self.claims.len())
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl Usage {
    /// Usage for `clients` (whose apps are named by `app_names`, in configured order), kept
    /// in `shared` when given, counted in `metrics`.
    pub fn new(
        clients: &[ClientConfig],
        app_names: &[String],
        shared: Option<SharedTier>,
        metrics: Arc<Metrics>,
    ) -> Usage {
        let usage = Usage {
            claims: quick_cache::sync::Cache::new(MAX_CLAIMS),
            local: Mutex::new(BTreeMap::new()),
            shared,
            quotas: ArcSwap::from_pointee(HashMap::new()),
            metrics,
        };
        usage.reload(clients, app_names);
        usage
    }

    /// Follows a reloaded client list's quotas.
    pub fn reload(&self, clients: &[ClientConfig], app_names: &[String]) {
        let table = clients
            .iter()
            .map(|c| {
                let app = app_names.get(c.app).cloned().unwrap_or_default();
                (c.name.clone(), (app, c.quota))
            })
            .collect();
        self.quotas.store(Arc::new(table));
    }

    /// Does the fleet share the figures (Redis), or does this replica hold them?
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Counts run `run_id` of `app`, finished with `status` after `total_tokens`,
    /// `total_steps` and `elapsed_time` seconds, to `client` — once per run id (see the module
    /// doc). Call it with every finished run the gateway sees (a terminal run detail, a
    /// blocking run's answer, a `workflow_finished` event); repeats are cheap.
    #[allow(clippy::too_many_arguments)]
    pub async fn finished(
        &self,
        app: &str,
        client: &str,
        run_id: &str,
        status: &str,
        total_tokens: u64,
        total_steps: u64,
        elapsed_time: f64,
    ) -> Counted {
        let figures = RunFigures {
            status,
            total_tokens,
            total_steps,
            elapsed_time,
        };
        self.count(day_of(SystemTime::now()), app, client, run_id, figures)
            .await
    }

    /// [`Usage::finished`] with the figures of `run` (see [`FinishedRun::parse`]).
    pub async fn finished_run(
        &self,
        app: &str,
        client: &str,
        run_id: &str,
        run: &FinishedRun,
    ) -> Counted {
        self.finished(
            app,
            client,
            run_id,
            &run.status,
            run.total_tokens.unwrap_or(0),
            run.total_steps.unwrap_or(0),
            run.elapsed_time.unwrap_or(0.0),
        )
        .await
    }

    /// Marks run `run_id` of `app` counted on this replica at `now`: `false` when it was
    /// already, less than [`CLAIM_TTL`] before. One lock of the entry's shard decides, so of
    /// two concurrent calls for one run exactly one gets `true`.
    fn claim(&self, app: &str, run_id: &str, now: Instant) -> bool {
        use quick_cache::sync::{EntryAction, EntryResult};
        let key = (app.to_owned(), run_id.to_owned());
        let renewed = |_: &(String, String), at: &mut Instant| {
            let expired = now.saturating_duration_since(*at) >= CLAIM_TTL;
            if expired {
                *at = now;
            }
            EntryAction::Retain(expired)
        };
        // No waiting (this runs on the runtime's threads): a claim being made elsewhere at this
        // instant is that caller's.
        match self.claims.entry(&key, Some(Duration::ZERO), renewed) {
            EntryResult::Retained(fresh) => fresh,
            EntryResult::Vacant(slot) => {
                let _ = slot.insert(now);
                true
            }
            EntryResult::Timeout => false,
            // Not returned for `Retain`.
            EntryResult::Removed(..) | EntryResult::Replaced(..) => true,
        }
    }

    /// [`Usage::finished`] on a given day (`YYYY-MM-DD`).
    async fn count(
        &self,
        day: String,
        app: &str,
        client: &str,
        run_id: &str,
        run: RunFigures<'_>,
    ) -> Counted {
        if !self.claim(app, run_id, Instant::now()) {
            return Counted::Duplicate;
        }
        let status = status_label(run.status);
        let seconds = if run.elapsed_time.is_finite() && run.elapsed_time > 0.0 {
            run.elapsed_time
        } else {
            0.0
        };
        let counted = match &self.shared {
            None => {
                self.add_local(day, client, app, status, &run, seconds);
                Counted::Counted
            }
            Some(shared) => match shared.claim_usage(app, run_id, CLAIM_TTL).await {
                Ok(false) => return Counted::Duplicate,
                Ok(true) => {
                    let add = increments(client, app, status, &run, seconds);
                    match shared.add_usage(&day, &add, KEEP).await {
                        Ok(()) => Counted::Counted,
                        Err(_) => {
                            tracing::warn!(
                                app,
                                client,
                                "a finished run's usage could not be added to the shared tier"
                            );
                            Counted::Unshared
                        }
                    }
                }
                Err(_) => {
                    let add = increments(client, app, status, &run, seconds);
                    if shared.add_usage(&day, &add, KEEP).await.is_err() {
                        tracing::warn!(
                            app,
                            client,
                            "a finished run's usage could not be added to the shared tier"
                        );
                    }
                    Counted::Unshared
                }
            },
        };
        let labels = UsageLabels {
            client: client.to_owned(),
            app: app.to_owned(),
        };
        self.metrics
            .usage
            .runs
            .get_or_create(&UsageRunLabels {
                client: labels.client.clone(),
                app: labels.app.clone(),
                status,
            })
            .inc();
        self.metrics
            .usage
            .tokens
            .get_or_create(&labels)
            .inc_by(run.total_tokens);
        self.metrics
            .usage
            .run_seconds
            .get_or_create(&labels)
            .inc_by(seconds);
        counted
    }

    fn add_local(
        &self,
        day: String,
        client: &str,
        app: &str,
        status: &'static str,
        run: &RunFigures<'_>,
        seconds: f64,
    ) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let key = (day, client.to_owned(), app.to_owned());
        if !local.contains_key(&key) {
            // A new row: drop the days past retention, so memory stays bounded.
            let oldest = day_name(
                day_number(&key.0)
                    .unwrap_or(0)
                    .saturating_sub(KEEP.as_secs() / DAY),
            );
            local.retain(|(d, _, _), _| *d >= oldest);
        }
        let f = local.entry(key).or_default();
        *f.runs.entry(status.to_owned()).or_default() += 1;
        f.tokens += run.total_tokens;
        f.steps += run.total_steps;
        f.run_seconds += seconds;
    }

    /// The figures of every client and app from `from` to `to` (`YYYY-MM-DD`, UTC, inclusive),
    /// by day, client and app.
    pub async fn read(&self, from: &str, to: &str) -> Result<Vec<Row>, UsageError> {
        let days = day_range(from, to)?;
        let Some(shared) = &self.shared else {
            let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            let first = days.first().cloned().unwrap_or_default();
            let last = days.last().cloned().unwrap_or_default();
            return Ok(local
                .iter()
                .filter(|((d, _, _), _)| *d >= first && *d <= last)
                .map(|((day, client, app), f)| Row {
                    day: day.clone(),
                    client: client.clone(),
                    app: app.clone(),
                    figures: f.clone(),
                })
                .collect());
        };
        let hashes = shared
            .usage_days(&days)
            .await
            .map_err(|_| UsageError::Unavailable)?;
        let mut rows = Vec::new();
        for (day, fields) in days.iter().zip(hashes) {
            let mut by: BTreeMap<(String, String), Figures> = BTreeMap::new();
            for (field, value) in fields {
                let mut parts = field.splitn(3, '|');
                let (Some(client), Some(app), Some(what)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let f = by.entry((client.to_owned(), app.to_owned())).or_default();
                match what {
                    "tokens" => f.tokens = value.parse().unwrap_or(0),
                    "steps" => f.steps = value.parse().unwrap_or(0),
                    "run_seconds" => f.run_seconds = value.parse().unwrap_or(0.0),
                    w => {
                        if let Some(status) = w.strip_prefix("runs:") {
                            f.runs.insert(status.to_owned(), value.parse().unwrap_or(0));
                        }
                    }
                }
            }
            rows.extend(by.into_iter().map(|((client, app), figures)| Row {
                day: day.clone(),
                client,
                app,
                figures,
            }));
        }
        Ok(rows)
    }

    /// Today's figures of every client and app (for the status page).
    pub async fn today(&self) -> Result<Vec<Row>, UsageError> {
        let today = day_of(SystemTime::now());
        self.read(&today, &today).await
    }

    /// The configured quotas, by client: (its app, its quota).
    pub fn quotas(&self) -> Arc<HashMap<String, (String, Quota)>> {
        self.quotas.load_full()
    }

    /// May `client` start a run of `app` now? `Err` with the time until the next UTC midnight
    /// when today's runs or tokens have reached its `quota_runs_per_day` or
    /// `quota_tokens_per_day`. Clients without quotas, and unknown ones, are never refused;
    /// nor is anyone when the shared tier holds the figures and cannot be read (fail open).
    /// Reads are never checked: call it for run starts only.
    pub async fn check_quota(&self, client: &str, app: &str) -> Result<(), Duration> {
        let quotas = self.quotas.load();
        let Some((_, quota)) = quotas.get(client) else {
            return Ok(());
        };
        if quota.runs_per_day.is_none() && quota.tokens_per_day.is_none() {
            return Ok(());
        }
        let now = SystemTime::now();
        let today = day_of(now);
        let (runs, tokens) = match &self.shared {
            None => {
                let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                local
                    .get(&(today, client.to_owned(), app.to_owned()))
                    .map_or((0, 0), |f| (f.total_runs(), f.tokens))
            }
            Some(shared) => {
                let fields = [field(client, app, "runs"), field(client, app, "tokens")];
                match shared.usage_fields(&today, &fields).await {
                    Ok(v) => {
                        let n = |i: usize| {
                            v.get(i)
                                .and_then(|x| x.as_deref())
                                .and_then(|x| x.parse::<u64>().ok())
                                .unwrap_or(0)
                        };
                        (n(0), n(1))
                    }
                    Err(_) => {
                        tracing::debug!(
                            client,
                            "quota not checked: the shared tier is unavailable"
                        );
                        return Ok(());
                    }
                }
            }
        };
        let over =
            |used: u64, limit: Option<std::num::NonZeroU64>| limit.is_some_and(|l| used >= l.get());
        if over(runs, quota.runs_per_day) || over(tokens, quota.tokens_per_day) {
            Err(until_midnight(now))
        } else {
            Ok(())
        }
    }
}

/// The statuses a row's runs are counted by: the CSV's run columns, in order.
pub const STATUSES: [&str; 5] = [
    "succeeded",
    "failed",
    "stopped",
    "partial-succeeded",
    "other",
];

/// `rows` as CSV: a header row, then one line per row (day, client, app, runs in all and by
/// status, tokens, steps, run seconds). Names are `[A-Za-z0-9._-]`, so nothing needs quoting.
pub fn to_csv(rows: &[Row]) -> String {
    let mut out = String::from("day,client,app,runs");
    for s in STATUSES {
        out.push_str(",runs_");
        out.push_str(&s.replace('-', "_"));
    }
    out.push_str(",tokens,steps,run_seconds\n");
    for r in rows {
        let f = &r.figures;
        out.push_str(&format!(
            "{},{},{},{}",
            r.day,
            r.client,
            r.app,
            f.total_runs()
        ));
        for s in STATUSES {
            out.push_str(&format!(",{}", f.runs.get(s).copied().unwrap_or(0)));
        }
        out.push_str(&format!(",{},{},{:.3}\n", f.tokens, f.steps, f.run_seconds));
    }
    out
}

/// The shared tier's field for one figure of (client, app).
fn field(client: &str, app: &str, what: &str) -> String {
    format!("{client}|{app}|{what}")
}

/// What one run adds to a day's hash in the shared tier.
fn increments(
    client: &str,
    app: &str,
    status: &str,
    run: &RunFigures<'_>,
    seconds: f64,
) -> Increments {
    Increments {
        ints: vec![
            (field(client, app, "runs"), 1),
            (field(client, app, &format!("runs:{status}")), 1),
            (field(client, app, "tokens"), run.total_tokens),
            (field(client, app, "steps"), run.total_steps),
        ],
        floats: vec![(field(client, app, "run_seconds"), seconds)],
    }
}

/// Is `status` one a run ends in (Dify's terminal statuses)?
fn is_final(status: &str) -> bool {
    status_label(status) != "other"
}

/// A final status as a label: Dify's terminal statuses as they are, anything else `other`
/// (the upstream's text never becomes a label or a key as is).
pub fn status_label(status: &str) -> &'static str {
    match status {
        "succeeded" => "succeeded",
        "failed" => "failed",
        "stopped" => "stopped",
        "partial-succeeded" => "partial-succeeded",
        _ => "other",
    }
}

/// `YYYY-MM-DD` of `t`, in UTC.
pub fn day_of(t: SystemTime) -> String {
    let mut s = humantime::format_rfc3339_seconds(t).to_string();
    s.truncate(10);
    s
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date; `None` when it is not one.
fn day_number(day: &str) -> Option<u64> {
    let b = day.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    let t = humantime::parse_rfc3339(&format!("{day}T00:00:00Z")).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs() / DAY)
}

/// `YYYY-MM-DD` of a day number.
fn day_name(n: u64) -> String {
    day_of(UNIX_EPOCH + Duration::from_secs(n * DAY))
}

/// The days from `from` to `to`, inclusive, at most [`MAX_DAYS`].
pub fn day_range(from: &str, to: &str) -> Result<Vec<String>, UsageError> {
    let parse = |name: &str, d: &str| {
        day_number(d)
            .ok_or_else(|| UsageError::BadRange(format!("{name} must be a date YYYY-MM-DD")))
    };
    let (a, b) = (parse("from", from)?, parse("to", to)?);
    if a > b {
        return Err(UsageError::BadRange("from is after to".into()));
    }
    if b - a + 1 > MAX_DAYS {
        return Err(UsageError::BadRange(format!(
            "at most {MAX_DAYS} days per query"
        )));
    }
    Ok((a..=b).map(day_name).collect())
}

/// Time from `now` to the next UTC midnight (at least a second).
pub fn until_midnight(now: SystemTime) -> Duration {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Duration::from_secs(DAY - secs % DAY)
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;

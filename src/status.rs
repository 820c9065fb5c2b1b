//! The status page: one self-contained HTML page on the admin listener (`GET /`) and the JSON
//! it refreshes itself from (`GET /admin/status`).
//!
//! Invariant: the page holds no data and loads nothing from elsewhere (inline CSS and script);
//! everything it shows comes from `/admin/status`, which is guarded by the admin token like the
//! rest of the admin side. Rates (requests per second) are derived by the page from the
//! running totals between two refreshes, so the gateway keeps no window for them.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::gateway::Gateway;

/// The page (`src/status.html`).
pub const PAGE: &str = include_str!("status.html");

/// `/admin/status` body.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// Requests answered since start (every route and outcome).
    pub requests_total: u64,
    /// Run-detail answers that went through the cache, and of those the hits.
    pub cache_answers_total: u64,
    pub cache_hits_total: u64,
    /// Run-detail requests answered without an upstream request of their own.
    pub upstream_requests_saved_total: u64,
    /// Run fetches in flight now.
    pub fetches_in_flight: usize,
    /// Each app's circuit breaker.
    pub breakers: Vec<BreakerReport>,
    pub shared_tier: SharedReport,
    /// Each configured client's usage today (UTC) against its quotas.
    pub clients: Vec<ClientUsage>,
    /// Why today's usage could not be read, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BreakerReport {
    pub app: String,
    /// `open` (refusing requests) or `closed`.
    pub state: &'static str,
}

#[derive(Debug, Serialize)]
pub struct SharedReport {
    pub configured: bool,
    /// Is the completion subscription live?
    pub subscribed: bool,
    /// Failed shared-tier calls since start.
    pub errors: u64,
}

#[derive(Debug, Serialize)]
pub struct ClientUsage {
    pub client: String,
    pub app: String,
    pub runs_today: u64,
    pub tokens_today: u64,
    pub quota_runs_per_day: Option<u64>,
    pub quota_tokens_per_day: Option<u64>,
    /// Streams it follows now, when it has `max_open_streams`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_streams: Option<usize>,
}

impl StatusReport {
    /// The gateway's state now.
    pub async fn of(gateway: &Gateway) -> StatusReport {
        let metrics = gateway.metrics();
        let t = &metrics.totals;
        let breakers = gateway
            .apps()
            .iter()
            .map(|a| BreakerReport {
                app: a.name.to_string(),
                state: if a.breaker.is_open() {
                    "open"
                } else {
                    "closed"
                },
            })
            .collect();
        let shared_tier = match gateway.shared_tier() {
            Some(s) => {
                let e = s.stats();
                SharedReport {
                    configured: true,
                    subscribed: s.subscribed(),
                    errors: e.timeout + e.connection + e.server + e.corrupt + e.bad_tag,
                }
            }
            None => SharedReport {
                configured: false,
                subscribed: false,
                errors: 0,
            },
        };
        let usage = gateway.usage();
        let (today, usage_error) = match usage.today().await {
            Ok(rows) => (rows, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let quotas = usage.quotas();
        let mut clients: Vec<ClientUsage> = quotas
            .iter()
            .map(|(name, (app, q))| {
                let row = today.iter().find(|r| &r.client == name && &r.app == app);
                ClientUsage {
                    client: name.clone(),
                    app: app.clone(),
                    runs_today: row.map_or(0, |r| r.figures.total_runs()),
                    tokens_today: row.map_or(0, |r| r.figures.tokens),
                    quota_runs_per_day: q.runs_per_day.map(|n| n.get()),
                    quota_tokens_per_day: q.tokens_per_day.map(|n| n.get()),
                    open_streams: gateway.starts().open_streams(name),
                }
            })
            .collect();
        // Runs counted to no configured client (the gateway runs open, or a client since
        // removed) are shown too.
        for r in &today {
            if !quotas.contains_key(&r.client) {
                clients.push(ClientUsage {
                    client: r.client.clone(),
                    app: r.app.clone(),
                    runs_today: r.figures.total_runs(),
                    tokens_today: r.figures.tokens,
                    quota_runs_per_day: None,
                    quota_tokens_per_day: None,
                    open_streams: None,
                });
            }
        }
        clients.sort_by(|a, b| (&a.client, &a.app).cmp(&(&b.client, &b.app)));
        StatusReport {
            requests_total: t.answered.load(Ordering::Relaxed),
            cache_answers_total: t.cache_answers.load(Ordering::Relaxed),
            cache_hits_total: t.hits.load(Ordering::Relaxed),
            upstream_requests_saved_total: metrics.upstream_saved.get(),
            fetches_in_flight: gateway.cache_report().fetches_in_flight,
            breakers,
            shared_tier,
            clients,
            usage_error,
        }
    }
}

//! Prometheus metrics (text format via prometheus-client).
//!
//! Invariant: every label value comes from an outcome enum's `as_str()` or a configured name
//! (route, status class, cache outcome, reject reason, client and app names), so cardinality is
//! bounded by the configuration; a run id or a token is never a label.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::outcome::{CacheOutcome, UpstreamOutcome};
use crate::routes::Route;

/// Labels of `dify_gateway_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status_class: &'static str,
    pub cache: &'static str,
    pub client: Cow<'static, str>,
}

/// A client as the request counters see it: its label and its hit counter, resolved once (see
/// [`Metrics::client_hit_counter`]).
#[derive(Clone, Copy, Debug)]
pub struct ClientLabel<'a> {
    /// The `client` label: the configured name.
    pub name: &'a Cow<'static, str>,
    /// Its run-detail cache hits.
    pub hits: &'a Counter,
}

/// Labels of the request latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub cache: &'static str,
}

/// A single `reason`/`outcome`/`cause`/`class`/`state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: Cow<'static, str>,
}

/// Labels of the usage counters: the client a run is counted to and its app.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub client: String,
    pub app: String,
}

/// Labels of `dify_gateway_usage_runs_total`: [`UsageLabels`] and the run's final status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageRunLabels {
    pub client: String,
    pub app: String,
    pub status: &'static str,
}

/// The usage counters (see [`crate::usage`]); a run is counted by one replica only.
#[derive(Clone, Default)]
pub struct UsageMetrics {
    pub runs: Family<UsageRunLabels, Counter>,
    pub tokens: Family<UsageLabels, Counter>,
    pub run_seconds: Family<UsageLabels, Counter<f64, AtomicU64>>,
}

/// Running totals the status page derives its rates from, without reading label sets.
#[derive(Debug, Default)]
pub struct Totals {
    /// Requests answered (every route and outcome).
    pub answered: AtomicU64,
    /// Run-detail answers that went through the cache (any cache outcome).
    pub cache_answers: AtomicU64,
    /// Of those, cache hits.
    pub hits: AtomicU64,
}

/// Why a request was refused before reaching the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    BadId,
    BadRoute,
    BadFraming,
    BodyTooLarge,
    BodyTimeout,
    /// A passed-through request body that is not what its route takes (not JSON, bad multipart).
    BadBody,
    Method,
    Auth,
    RateLimit,
    /// No upstream slot under the global cap within `upstream.queue_timeout`.
    Overload,
    /// The client's fetches held its whole share of upstream slots until the queue timed out.
    OverloadClient,
    /// The app's fetches held its whole share of upstream slots until the queue timed out.
    OverloadApp,
    /// The client's `runs_per_minute` was spent.
    RunsPerMinute,
    /// The client already followed its `max_open_streams` streams.
    OpenStreams,
    /// The client has used its daily quota (`quota_runs_per_day`, `quota_tokens_per_day`).
    Quota,
    /// The id belongs to another client of the app (answered as Dify's 404).
    NotOwner,
    /// A route the client may not use (`/workflows/logs` without `read_app_logs`).
    Forbidden,
    /// A run start's `Idempotency-Key` is malformed, in use, or was sent with another request.
    Idempotency,
    /// A webhook subscription from a client without a webhook.
    NoWebhook,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadId => "bad_id",
            RejectReason::BadRoute => "bad_route",
            RejectReason::BadFraming => "bad_framing",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::BodyTimeout => "body_timeout",
            RejectReason::BadBody => "bad_body",
            RejectReason::Method => "method",
            RejectReason::Auth => "auth",
            RejectReason::RateLimit => "rate_limit",
            RejectReason::Overload => "overload",
            RejectReason::OverloadClient => "overload_client",
            RejectReason::OverloadApp => "overload_app",
            RejectReason::RunsPerMinute => "runs_per_minute",
            RejectReason::OpenStreams => "open_streams",
            RejectReason::Quota => "quota",
            RejectReason::NotOwner => "not_owner",
            RejectReason::Forbidden => "forbidden",
            RejectReason::Idempotency => "idempotency",
            RejectReason::NoWebhook => "no_webhook",
        }
    }
}

/// Latency buckets from 50 µs to 30 s.
const LATENCY_BUCKETS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The cache's gauges and eviction counters, shared with the cache's eviction listener.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub entries: Family<ClassLabel, Gauge>,
    pub bytes: Family<ClassLabel, Gauge>,
    pub evictions: Family<CauseLabel, Counter>,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub upstream_requests: Family<OutcomeLabel, Counter>,
    pub upstream_duration: Histogram,
    pub upstream_saved: Counter,
    pub coalesced_waiters: Counter,
    pub stale_served: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    /// Run starts with an `Idempotency-Key`, by what the key decided.
    pub idempotency: Family<OutcomeLabel, Counter>,
    /// Webhook delivery attempts, by outcome.
    pub webhook_attempts: Family<OutcomeLabel, Counter>,
    /// Webhook deliveries ended: delivered, failed (given up) or dropped (over the bound).
    pub webhook_deliveries: Family<OutcomeLabel, Counter>,
    /// Webhook deliveries queued (fleet-wide with the shared tier).
    pub webhook_queue: Gauge,
    pub retries: Counter,
    pub circuit_open: Gauge,
    /// Requests held waiting for a run to change (long-polls and status streams).
    pub longpoll_waiters: Gauge,
    /// Running runs watched for them (one each, however many wait).
    pub longpoll_watchers: Gauge,
    pub shared_tier_errors: Family<ReasonLabel, Counter>,
    pub shared_tier_hits: Counter,
    pub app_key_healthy: Family<AppLabel, Gauge>,
    /// Configuration reloads by result (`ok`, `invalid_config`, `apps_changed`, …).
    pub reloads: Family<ResultLabel, Counter>,
    pub cache: CacheMetrics,
    pub usage: UsageMetrics,
    pub totals: Totals,
    /// Pre-resolved handles for the hit path (run detail, 2xx, hit, no client), so a hit does
    /// not hash a label set.
    hot_hit: Counter,
    hot_hit_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dify_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route, status class, cache outcome and client",
            requests.clone(),
        );
        let request_duration: Family<LatencyLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time to answer a run-detail request, by cache outcome",
            request_duration.clone(),
        );
        let upstream_requests = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "upstream_requests",
            "Upstream requests by outcome",
            upstream_requests.clone(),
        );
        let upstream_duration = latency_histogram();
        registry.register(
            "upstream_duration_seconds",
            "Time of upstream exchanges",
            upstream_duration.clone(),
        );
        let upstream_saved = Counter::default();
        registry.register(
            "upstream_requests_saved",
            "Run-detail requests answered without an upstream request of their own (hits and coalesced waiters)",
            upstream_saved.clone(),
        );
        let coalesced_waiters = Counter::default();
        registry.register(
            "coalesced_waiters",
            "Requests that waited for another request's upstream fetch",
            coalesced_waiters.clone(),
        );
        let stale_served = Counter::default();
        registry.register(
            "stale_served",
            "Answers served stale because a refresh failed",
            stale_served.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register("rejected", "Requests refused by reason", rejected.clone());
        let idempotency = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "idempotency_keys",
            "Run starts with an Idempotency-Key, by outcome (fresh, replay, in_flight, mismatch)",
            idempotency.clone(),
        );
        let webhook_attempts = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome (delivered, status, timeout, connect, no_target)",
            webhook_attempts.clone(),
        );
        let webhook_deliveries = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries ended, by outcome (delivered, failed, dropped)",
            webhook_deliveries.clone(),
        );
        let webhook_queue = Gauge::default();
        registry.register(
            "webhook_queue_depth",
            "Webhook deliveries queued (fleet-wide with the shared tier)",
            webhook_queue.clone(),
        );
        let retries = Counter::default();
        registry.register("upstream_retries", "Upstream retries", retries.clone());
        let longpoll_waiters = Gauge::default();
        registry.register(
            "longpoll_waiters",
            "Requests held waiting for a run to change (long-polls and status streams)",
            longpoll_waiters.clone(),
        );
        let longpoll_watchers = Gauge::default();
        registry.register(
            "longpoll_watchers",
            "Running runs watched for held requests, one watcher per run",
            longpoll_watchers.clone(),
        );
        let circuit_open = Gauge::default();
        registry.register(
            "upstream_circuit_open",
            "Apps whose upstream circuit breaker is open or half-open (refusing requests)",
            circuit_open.clone(),
        );
        let shared_tier_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "shared_tier_errors",
            "Shared-tier (Redis) calls that failed, by reason",
            shared_tier_errors.clone(),
        );
        let shared_tier_hits = Counter::default();
        registry.register(
            "shared_tier_hits",
            "In-process misses answered from the shared tier",
            shared_tier_hits.clone(),
        );
        let app_key_healthy = Family::<AppLabel, Gauge>::default();
        registry.register(
            "app_key_healthy",
            "1 when the app's last readiness probe was accepted by the upstream",
            app_key_healthy.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reloads",
            "Configuration reloads (SIGHUP) by result",
            reloads.clone(),
        );
        let cache = CacheMetrics::default();
        registry.register(
            "cache_entries",
            "Entries in the in-process cache, by class",
            cache.entries.clone(),
        );
        registry.register(
            "cache_bytes",
            "Weighted bytes in the in-process cache, by class",
            cache.bytes.clone(),
        );
        registry.register(
            "cache_evictions",
            "Entries removed from the in-process cache, by cause",
            cache.evictions.clone(),
        );
        let usage = UsageMetrics::default();
        registry.register(
            "usage_runs",
            "Finished runs counted to a client and app, by final status (once per run fleet-wide)",
            usage.runs.clone(),
        );
        registry.register(
            "usage_tokens",
            "Tokens (Dify's total_tokens) of finished runs, by client and app",
            usage.tokens.clone(),
        );
        registry.register(
            "usage_run_seconds",
            "Run time (Dify's elapsed_time) of finished runs, by client and app",
            usage.run_seconds.clone(),
        );
        let hot_hit = requests
            .get_or_create(&RequestLabels {
                route: Route::RunDetail.as_str(),
                status_class: "2xx",
                cache: CacheOutcome::Hit.as_str(),
                client: Cow::Borrowed("none"),
            })
            .clone();
        let hot_hit_latency = request_duration
            .get_or_create(&LatencyLabels {
                cache: CacheOutcome::Hit.as_str(),
            })
            .clone();
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_requests,
            upstream_duration,
            upstream_saved,
            coalesced_waiters,
            stale_served,
            rejected,
            idempotency,
            webhook_attempts,
            webhook_deliveries,
            webhook_queue,
            retries,
            circuit_open,
            longpoll_waiters,
            longpoll_watchers,
            shared_tier_errors,
            shared_tier_hits,
            app_key_healthy,
            reloads,
            cache,
            usage,
            totals: Totals::default(),
            hot_hit,
            hot_hit_latency,
        }
    }

    /// Counts one answered request; `route` is `None` when no route had its path.
    pub fn request(
        &self,
        route: Option<Route>,
        status: u16,
        cache: Option<CacheOutcome>,
        client: Option<ClientLabel<'_>>,
        elapsed: Duration,
    ) {
        let class = status_class(status);
        self.totals.answered.fetch_add(1, Ordering::Relaxed);
        if cache.is_some() && route == Some(Route::RunDetail) {
            self.totals.cache_answers.fetch_add(1, Ordering::Relaxed);
            if cache == Some(CacheOutcome::Hit) {
                self.totals.hits.fetch_add(1, Ordering::Relaxed);
            }
        }
        if route == Some(Route::RunDetail) && class == "2xx" && cache == Some(CacheOutcome::Hit) {
            match client {
                None => self.hot_hit.inc(),
                Some(c) => c.hits.inc(),
            };
            self.hot_hit_latency.observe(elapsed.as_secs_f64());
            self.upstream_saved.inc();
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                route: Route::label(route),
                status_class: class,
                cache: cache.map_or("none", CacheOutcome::as_str),
                client: client.map_or(Cow::Borrowed("none"), |c| c.name.clone()),
            })
            .inc();
        if let Some(c) = cache {
            self.request_duration
                .get_or_create(&LatencyLabels { cache: c.as_str() })
                .observe(elapsed.as_secs_f64());
            if matches!(c, CacheOutcome::Hit | CacheOutcome::Coalesced) {
                self.upstream_saved.inc();
            }
            if c == CacheOutcome::Coalesced {
                self.coalesced_waiters.inc();
            }
        }
    }

    /// The pre-resolved counter of a client's cache hits (run detail, 2xx, hit), so a hit
    /// neither hashes a label set nor copies the client's name.
    pub fn client_hit_counter(&self, client: Cow<'static, str>) -> Counter {
        self.requests
            .get_or_create(&RequestLabels {
                route: Route::RunDetail.as_str(),
                status_class: "2xx",
                cache: CacheOutcome::Hit.as_str(),
                client,
            })
            .clone()
    }

    /// Counts one refused request.
    pub fn reject(&self, reason: RejectReason) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts one upstream attempt; `elapsed` is `None` when it was refused before any exchange.
    pub fn upstream(&self, outcome: UpstreamOutcome, elapsed: Option<Duration>) {
        self.upstream_requests
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(d) = elapsed {
            self.upstream_duration.observe(d.as_secs_f64());
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `2xx`, `4xx`, … for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_conventions() {
        let m = Metrics::new();
        m.request(
            Some(Route::RunDetail),
            200,
            Some(CacheOutcome::Hit),
            None,
            Duration::from_micros(30),
        );
        m.reject(RejectReason::BadId);
        m.upstream(UpstreamOutcome::Ok, Some(Duration::from_millis(3)));
        let text = m.encode();
        assert!(text.contains("dify_gateway_requests_total{route=\"run_detail\",status_class=\"2xx\",cache=\"hit\",client=\"none\"} 1"), "{text}");
        assert!(text.contains("dify_gateway_rejected_total{reason=\"bad_id\"} 1"));
        assert!(text.contains("dify_gateway_upstream_requests_total{outcome=\"ok\"} 1"));
        assert!(text.contains("dify_gateway_request_duration_seconds_bucket"));
        assert!(text.contains("dify_gateway_upstream_requests_saved_total 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}

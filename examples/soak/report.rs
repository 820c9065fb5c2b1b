//! The soak's report: figures gathered during the run, the invariants judged on them, and the
//! Markdown written to stdout and `bench-results/`.
//!
//! Invariant: every figure printed was measured in this run (a figure that could not be read is
//! printed as `n/a`, never guessed), and the exit status is failure exactly when an invariant
//! row says FAIL.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::gateway_process::Memory;
use crate::scrape::{LogScan, MetricMap};
use crate::shutdown::ShutdownReport;
use crate::slowloris::{SlowConn, SlowEnd};
use crate::tally::{Counts, Tally};

/// RSS growth allowed over the load: end ≤ factor × start + slack.
const RSS_FACTOR: f64 = 1.5;
const RSS_SLACK_KIB: u64 = 64 * 1024;

/// Everything the report shows.
pub struct Figures {
    pub stamp: String,
    pub commit: String,
    pub config: String,
    pub planned: Duration,
    pub elapsed: Duration,
    pub warmup: Duration,
    pub clients: usize,
    pub think_ms: u64,
    /// The request mix, as text.
    pub mix: String,
    pub tally: Tally,
    /// Mock requests during the load (warm-up fetches of hot runs excluded).
    pub upstream_requests: u64,
    pub rss_start: Option<Memory>,
    pub rss_end: Option<Memory>,
    pub rss_min_max_kib: Option<(u64, u64)>,
    pub cpu_load_secs: Option<f64>,
    pub cpu_total_secs: Option<f64>,
    pub metrics: MetricMap,
    pub cache_stats: Option<String>,
    /// (samples with the circuit open, samples taken), one a second.
    pub circuit_samples: (u64, u64),
    pub outages: Vec<(Duration, Duration)>,
    pub slow: Vec<SlowConn>,
    pub alive_end: bool,
    pub healthz_end: Option<u16>,
    pub shutdown: ShutdownReport,
    pub log: LogScan,
    pub log_path: String,
    pub allow_passthrough: bool,
}

/// One judged invariant.
pub struct Check {
    pub name: &'static str,
    pub held: bool,
    pub detail: String,
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "n/a".to_owned(), f)
}

fn join_counts<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "–".to_owned();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn errors(c: &Counts) -> String {
    let m: BTreeMap<&str, u64> = c.errors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    join_counts(&m)
}

impl Figures {
    /// Judges the invariants.
    pub fn checks(&self) -> Vec<Check> {
        let v = &self.tally.violations;
        let hot = self
            .tally
            .per_category
            .get(&crate::tally::Category::Hot)
            .cloned()
            .unwrap_or_default();
        let mut out = vec![
            Check {
                name: "gateway alive and public /healthz 200 at the end of the load",
                held: self.alive_end && self.healthz_end == Some(200),
                detail: format!(
                    "alive: {}, /healthz: {}",
                    self.alive_end,
                    opt(self.healthz_end, |s| s.to_string())
                ),
            },
            Check {
                name: "no 5xx for hot terminal runs",
                held: v.hot_5xx == 0,
                detail: format!(
                    "{} hot requests, {} answered 5xx; client-side errors: {}",
                    hot.sent,
                    v.hot_5xx,
                    errors(&hot)
                ),
            },
            Check {
                name: "no 200 carrying a fault body, another run's body, or a malformed body from the cache",
                held: v.bad_200 == 0,
                detail: format!("{} such answers", v.bad_200),
            },
            Check {
                name: "no upstream-malformed 200 body (truncated / invalid JSON) served as 200",
                held: v.passthrough_200 == 0 || self.allow_passthrough,
                detail: format!(
                    "{} served, X-Cache {}{}",
                    v.passthrough_200,
                    join_counts(&v.passthrough_cache),
                    if self.allow_passthrough && v.passthrough_200 > 0 {
                        " (accepted: --allow-passthrough)"
                    } else {
                        ""
                    }
                ),
            },
        ];
        let rss = match (self.rss_start, self.rss_end) {
            (Some(s), Some(e)) => {
                let limit = (s.rss_kib as f64 * RSS_FACTOR) as u64 + RSS_SLACK_KIB;
                Check {
                    name: "RSS end ≤ 1.5 × RSS start + 64 MiB",
                    held: e.rss_kib <= limit,
                    detail: format!(
                        "start {}, end {}, limit {}",
                        mib(s.rss_kib),
                        mib(e.rss_kib),
                        mib(limit)
                    ),
                }
            }
            _ => Check {
                name: "RSS end ≤ 1.5 × RSS start + 64 MiB",
                held: false,
                detail: "RSS could not be read".into(),
            },
        };
        out.push(rss);
        let sd = &self.shutdown;
        out.push(Check {
            name: "shutdown: requests in flight at SIGTERM complete with 200",
            held: sd.in_flight_all_ok(),
            detail: format!(
                "{} in flight ({} slow): {}",
                sd.in_flight_total(),
                sd.in_flight_slow,
                join_counts(&sd.in_flight)
            ),
        });
        out.push(Check {
            name: "shutdown: new connections refused while draining",
            held: sd.new_connections_refused(),
            detail: sd
                .probes
                .iter()
                .map(|(ms, o, during)| {
                    format!(
                        "+{ms} ms: {o}{}",
                        if *during { "" } else { " (after exit)" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        });
        out.push(Check {
            name: "shutdown: exit code 0",
            held: sd.exit_code == Some(0),
            detail: format!(
                "exit code {}, {} after SIGTERM",
                opt(sd.exit_code, |c| c.to_string()),
                opt(sd.exit_after, |d| format!(
                    "{:.0} ms",
                    d.as_secs_f64() * 1e3
                ))
            ),
        });
        out
    }

    /// The Markdown report.
    pub fn markdown(&self, checks: &[Check]) -> String {
        let mut o = String::new();
        let t = &self.tally;
        let secs = self.elapsed.as_secs_f64();
        let _ = writeln!(o, "# dify-gateway soak, {}\n", self.stamp);
        let _ = writeln!(
            o,
            "Commit `{}`. Gateway: release binary as a child process; mock Dify in the soak process; loopback only. \
             {} clients (hyper-util, keep-alive), think time {} ms ± 50 %. Mix: {}. Gateway log (access log off): `{}`.\n",
            self.commit, self.clients, self.think_ms, self.mix, self.log_path
        );
        let _ = writeln!(o, "## Summary\n\n| Figure | Value |\n| --- | --- |");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(o, "| {k} | {v} |");
        };
        row(
            "Duration of the load",
            format!(
                "{:.1} s (planned {} s; RSS start taken after {} s of warm-up)",
                secs,
                self.planned.as_secs(),
                self.warmup.as_secs()
            ),
        );
        row(
            "Requests sent",
            format!("{} ({:.0}/s)", t.all.sent, t.all.sent as f64 / secs),
        );
        row(
            "Upstream requests (mock `total()`, incl. the gateway's /info readiness probes)",
            self.upstream_requests.to_string(),
        );
        row(
            "Upstream requests per client request",
            format!(
                "{:.4}",
                self.upstream_requests as f64 / t.all.sent.max(1) as f64
            ),
        );
        row(
            "Gateway RSS at start (after warm-up)",
            opt(self.rss_start, |m| mib(m.rss_kib)),
        );
        row("Gateway RSS at end", opt(self.rss_end, |m| mib(m.rss_kib)));
        row(
            "Gateway RSS min / max of 1 s samples",
            opt(self.rss_min_max_kib, |(a, b)| {
                format!("{} / {}", mib(a), mib(b))
            }),
        );
        row(
            "Gateway peak RSS (VmHWM)",
            opt(self.rss_end, |m| mib(m.hwm_kib)),
        );
        row(
            "Gateway CPU seconds during the load",
            opt(self.cpu_load_secs, |c| {
                format!("{c:.1} s ({:.2} cores on average)", c / secs)
            }),
        );
        row(
            "Gateway CPU seconds, whole process life to end of load",
            opt(self.cpu_total_secs, |c| format!("{c:.1} s")),
        );
        row(
            "Circuit open (1 s samples of the gauge)",
            format!("{} of {}", self.circuit_samples.0, self.circuit_samples.1),
        );
        row(
            "Outage windows (s from load start)",
            if self.outages.is_empty() {
                "none".into()
            } else {
                self.outages
                    .iter()
                    .map(|(a, b)| format!("{:.1}–{:.1}", a.as_secs_f64(), b.as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );

        let _ = writeln!(
            o,
            "\n## Responses by status\n\n| Status | Count | Share |\n| --- | ---: | ---: |"
        );
        for (s, n) in &t.all.by_status {
            let _ = writeln!(
                o,
                "| {s} | {n} | {:.2} % |",
                *n as f64 * 100.0 / t.all.sent.max(1) as f64
            );
        }
        let _ = writeln!(
            o,
            "\n## Non-200 answers by error code\n\n| Status and `code` | Count |\n| --- | ---: |"
        );
        for (k, n) in t.all.by_answer.iter().filter(|(k, _)| k.as_str() != "200") {
            let _ = writeln!(o, "| {k} | {n} |");
        }
        let _ = writeln!(
            o,
            "\n## Responses by X-Cache\n\n| X-Cache | Count |\n| --- | ---: |"
        );
        for (c, n) in &t.all.by_cache {
            let label = if c == "-" { "(absent)" } else { c };
            let _ = writeln!(o, "| {label} | {n} |");
        }
        let _ = writeln!(
            o,
            "\n## Client-side errors\n\n| Kind | Count |\n| --- | ---: |"
        );
        for k in [
            crate::tally::ClientError::Connect,
            crate::tally::ClientError::Timeout,
            crate::tally::ClientError::Reset,
            crate::tally::ClientError::Other,
        ] {
            let _ = writeln!(
                o,
                "| {} | {} |",
                k.as_str(),
                t.all.errors.get(&k).copied().unwrap_or(0)
            );
        }

        let _ = writeln!(
            o,
            "\n## By kind of run\n\nStatus with the error body's `code` (`html` for an HTML page).\n\n| Kind | Requests | Status | X-Cache | Client errors |\n| --- | ---: | --- | --- | --- |"
        );
        for (cat, c) in &t.per_category {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                cat.as_str(),
                c.sent,
                join_counts(&c.by_answer),
                join_counts(&c.by_cache),
                errors(c)
            );
        }

        self.gateway_metrics(&mut o);
        self.slow_section(&mut o);
        self.shutdown_section(&mut o);

        let _ = writeln!(
            o,
            "\n## Invariants\n\n| Invariant | Result | Detail |\n| --- | --- | --- |"
        );
        for c in checks {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                c.name,
                if c.held { "PASS" } else { "**FAIL**" },
                c.detail
            );
        }
        let v = &t.violations;
        if !v.examples.is_empty() || !v.passthrough_examples.is_empty() {
            let _ = writeln!(o, "\nExamples:\n");
            for e in v.examples.iter().chain(&v.passthrough_examples) {
                let _ = writeln!(o, "- {e}");
            }
        }

        let _ = writeln!(
            o,
            "\n## Gateway log\n\n{} lines, {} WARN, {} ERROR, {} panics.\n",
            self.log.lines, self.log.warn, self.log.error, self.log.panics
        );
        if !self.log.messages.is_empty() {
            let _ = writeln!(o, "| Message | Count |\n| --- | ---: |");
            for (m, n) in &self.log.messages {
                let _ = writeln!(o, "| {} | {n} |", m.replace('|', "\\|"));
            }
        }
        let _ = writeln!(o, "\n## Gateway config used\n\n```toml\n{}```", self.config);
        o
    }

    fn gateway_metrics(&self, o: &mut String) {
        let m = &self.metrics;
        let _ = writeln!(o, "\n## Gateway metrics at the end of the load (`/metrics`)\n\n| Series | Value |\n| --- | ---: |");
        let fmt = |v: Option<f64>| opt(v, |x| format!("{x}"));
        for name in [
            "dify_gateway_stale_served_total",
            "dify_gateway_upstream_retries_total",
            "dify_gateway_upstream_circuit_open",
            "dify_gateway_coalesced_waiters_total",
            "dify_gateway_upstream_requests_saved_total",
        ] {
            let _ = writeln!(o, "| `{name}` | {} |", fmt(m.get(name)));
        }
        for (family, label) in [
            ("dify_gateway_rejected_total", "reason"),
            ("dify_gateway_upstream_requests_total", "outcome"),
            ("dify_gateway_cache_evictions_total", "cause"),
            ("dify_gateway_cache_entries", "class"),
            ("dify_gateway_cache_bytes", "class"),
        ] {
            let series = m.by_label(family);
            if series.is_empty() {
                let _ = writeln!(o, "| `{family}` | (no series) |");
            }
            for (l, v) in series {
                let _ = writeln!(o, "| `{family}{{{label}=\"{l}\"}}` | {v} |");
            }
        }
        if let Some(s) = &self.cache_stats {
            let _ = writeln!(o, "\n`/admin/cache/stats`: `{}`", s.trim());
        }
    }

    fn slow_section(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "\n## Slow clients (raw TCP, `header_read_timeout` = 5 s)\n\n| Kind | Opened | Cut by the gateway | Answered | Still open at 15 s | Held (min–max) |\n| --- | ---: | ---: | --- | ---: | --- |"
        );
        for trickle in [true, false] {
            let v: Vec<&SlowConn> = self.slow.iter().filter(|c| c.trickle == trickle).collect();
            let cut = v.iter().filter(|c| matches!(c.end, SlowEnd::Cut)).count();
            let open = v
                .iter()
                .filter(|c| matches!(c.end, SlowEnd::StillOpen))
                .count();
            let answered: Vec<String> = v
                .iter()
                .filter_map(|c| match &c.end {
                    SlowEnd::Answered(s) => Some(s.clone()),
                    SlowEnd::ConnectFailed => Some("connect failed".into()),
                    _ => None,
                })
                .collect();
            let held = |f: fn(Duration, Duration) -> Duration| {
                v.iter()
                    .map(|c| c.held)
                    .reduce(f)
                    .map_or("–".into(), |d| format!("{:.1} s", d.as_secs_f64()))
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {}–{} |",
                if trickle {
                    "trickled head (1 byte / 500 ms)"
                } else {
                    "idle (sends nothing)"
                },
                v.len(),
                cut,
                if answered.is_empty() {
                    "–".into()
                } else {
                    answered.join("; ")
                },
                open,
                held(Duration::min),
                held(Duration::max)
            );
        }
    }

    fn shutdown_section(&self, o: &mut String) {
        let s = &self.shutdown;
        let _ = writeln!(
            o,
            "\n## Graceful shutdown under load\n\n{} clients ({} on runs whose upstream answer takes 1 s, the rest on hot runs); SIGTERM after 2.5 s of load; clients go on for 2.5 s after it.\n\n| Figure | Value |\n| --- | --- |",
            s.clients, s.slow_clients
        );
        let _ = writeln!(
            o,
            "| Wait for a fresh run to be answered 200 first (circuit closed) | {} |",
            opt(s.upstream_ready_after, |d| format!(
                "{:.1} s",
                d.as_secs_f64()
            ))
        );
        let _ = writeln!(
            o,
            "| Requests finished before SIGTERM | {} |",
            s.finished_before
        );
        let _ = writeln!(
            o,
            "| In flight at SIGTERM | {} ({} slow): {} |",
            s.in_flight_total(),
            s.in_flight_slow,
            join_counts(&s.in_flight)
        );
        let _ = writeln!(
            o,
            "| Started after SIGTERM | {} |",
            join_counts(&s.started_after)
        );
        let _ = writeln!(
            o,
            "| New TCP connections after SIGTERM | {} |",
            s.probes
                .iter()
                .map(|(ms, r, during)| format!(
                    "+{ms} ms {r}{}",
                    if *during { "" } else { " (after exit)" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(o, "| Exit code | {} |", opt(s.exit_code, |c| c.to_string()));
        let _ = writeln!(
            o,
            "| SIGTERM to exit | {} |",
            opt(s.exit_after, |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
        );
    }
}

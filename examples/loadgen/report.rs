//! Turns the results file of `benches/e2e.sh` into the Markdown report.
//!
//! Invariant: every figure printed is computed from the measurements in the file (medians of
//! the runs for wrk scenarios); the only constants here are the project's targets, printed
//! beside the measured value with a pass/fail mark.
//!
//! File format, tab-separated, one record a line:
//!
//! ```text
//! meta  KEY       VALUE
//! wrk   SCENARIO  SERVER  RUN  REQUESTS  SECS  P50_US  P99_US  P999_US  CPU_TICKS  ERRORS  UPSTREAM
//!       FOREIGN_CPU_PCT
//! hwm   SCENARIO  SERVER  KB
//! kv    SECTION   KEY     VALUE
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// One wrk run of one server.
struct WrkRun {
    requests: f64,
    secs: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu_ticks: f64,
    errors: f64,
    upstream: f64,
    /// CPU used by other processes during the run, % of all CPUs.
    foreign: f64,
}

/// Medians of one server's runs in one scenario.
#[derive(Clone, Copy)]
struct Summary {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu_us: f64,
    errors: f64,
    upstream: f64,
    runs: usize,
    /// The largest share of CPU other processes took during any of the runs.
    foreign_max: f64,
    /// Run-to-run spread (lowest, highest) of req/s, p99 and CPU per request.
    rps_range: (f64, f64),
    p99_range: (f64, f64),
    cpu_range: (f64, f64),
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Records in file order, grouped by key, keeping first-seen order.
#[derive(Default)]
struct Ordered<T> {
    keys: Vec<String>,
    map: HashMap<String, T>,
}

impl<T: Default> Ordered<T> {
    fn entry(&mut self, k: &str) -> &mut T {
        if !self.map.contains_key(k) {
            self.keys.push(k.to_owned());
        }
        self.map.entry(k.to_owned()).or_default()
    }
}

/// Everything the results file holds.
#[derive(Default)]
struct Results {
    meta: Ordered<String>,
    /// scenario -> server -> runs
    wrk: Ordered<Ordered<Vec<WrkRun>>>,
    /// (scenario, server) -> peak RSS in kB
    hwm: HashMap<(String, String), f64>,
    /// section -> key -> value
    kv: Ordered<Ordered<String>>,
}

fn parse(text: &str) -> Result<Results, String> {
    let mut r = Results::default();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let num = |i: usize| -> Result<f64, String> {
            f.get(i)
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| format!("line {}: field {i} is not a number: {line}", n + 1))
        };
        match f.first().copied() {
            Some("meta") if f.len() >= 3 => *r.meta.entry(f[1]) = f[2..].join("\t"),
            Some("wrk") if f.len() == 13 => {
                let run = WrkRun {
                    requests: num(4)?,
                    secs: num(5)?,
                    p50: num(6)?,
                    p99: num(7)?,
                    p999: num(8)?,
                    cpu_ticks: num(9)?,
                    errors: num(10)?,
                    upstream: num(11)?,
                    foreign: num(12)?,
                };
                r.wrk.entry(f[1]).entry(f[2]).push(run);
            }
            Some("hwm") if f.len() == 4 => {
                r.hwm.insert((f[1].to_owned(), f[2].to_owned()), num(3)?);
            }
            Some("kv") if f.len() >= 4 => *r.kv.entry(f[1]).entry(f[2]) = f[3..].join("\t"),
            Some("") | None => {}
            _ => return Err(format!("line {}: unknown record: {line}", n + 1)),
        }
    }
    Ok(r)
}

fn summarise(runs: &[WrkRun], clk_tck: f64) -> Summary {
    let col = |f: &dyn Fn(&WrkRun) -> f64| median(runs.iter().map(f).collect());
    let range = |f: &dyn Fn(&WrkRun) -> f64| {
        runs.iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let rps = |r: &WrkRun| r.requests / r.secs;
    let cpu = |r: &WrkRun| r.cpu_ticks * 1e6 / clk_tck / r.requests.max(1.0);
    Summary {
        rps: col(&rps),
        p50: col(&|r| r.p50),
        p99: col(&|r| r.p99),
        p999: col(&|r| r.p999),
        cpu_us: col(&cpu),
        rps_range: range(&rps),
        p99_range: range(&|r| r.p99),
        cpu_range: range(&cpu),
        errors: col(&|r| r.errors),
        upstream: col(&|r| r.upstream),
        runs: runs.len(),
        foreign_max: runs.iter().map(|r| r.foreign).fold(0.0, f64::max),
    }
}

/// A target check line: `what`, the measured value, the target, and whether it is met.
fn check(out: &mut String, what: &str, value: String, target: &str, ok: bool) {
    let mark = if ok { "met" } else { "**not met**" };
    let _ = writeln!(out, "| {what} | {value} | {target} | {mark} |");
}

fn kv_num(section: &Ordered<String>, k: &str) -> Option<f64> {
    section.map.get(k).and_then(|v| v.parse().ok())
}

/// Target checks for one wrk scenario, from the servers it compares.
fn wrk_checks(out: &mut String, scenario: &str, s: &HashMap<String, Summary>) {
    let (gw, nginx, bare, direct) = (
        s.get("gateway"),
        s.get("nginx"),
        s.get("bare"),
        s.get("mock-direct"),
    );
    // The hit-path targets apply to the scenarios that only hit (1 and 2).
    let hit_path = scenario.starts_with('1') || scenario.starts_with('2');
    // The miss path under load (6): every request goes upstream, against nginx proxy_pass.
    let miss_load = scenario.starts_with('6');
    if let (Some(g), Some(n), true) = (gw, nginx, hit_path) {
        let _ = writeln!(
            out,
            "| {scenario}: req/s gateway / nginx | {:.2}× | (report) | |",
            g.rps / n.rps
        );
        let _ = writeln!(
            out,
            "| {scenario}: p99 gateway vs nginx | {:.0} µs vs {:.0} µs | (report) | |",
            g.p99, n.p99
        );
    }
    if let (Some(g), Some(n), true) = (gw, nginx, miss_load) {
        check(
            out,
            &format!("{scenario}: CPU/req gateway / nginx proxy_pass"),
            cpu_ratio(g, n),
            "≤ 1.00×",
            g.cpu_us <= n.cpu_us,
        );
        let r = g.rps / n.rps;
        check(
            out,
            &format!("{scenario}: req/s gateway / nginx proxy_pass"),
            format!("{r:.2}×"),
            "≥ 1.00×",
            r >= 1.0,
        );
        check(
            out,
            &format!("{scenario}: p99 gateway vs nginx proxy_pass"),
            format!("{:.0} µs vs {:.0} µs", g.p99, n.p99),
            "gateway ≤ nginx",
            g.p99 <= n.p99,
        );
    }
    if let (Some(g), Some(n), false, false) = (gw, nginx, hit_path, miss_load) {
        let _ = writeln!(
            out,
            "| {scenario}: p50 / p99 gateway vs nginx | {:.0} / {:.0} µs vs {:.0} / {:.0} µs | (report) | |",
            g.p50, g.p99, n.p50, n.p99
        );
    }
    if let (Some(g), Some(b)) = (gw, bare) {
        let r = g.cpu_us / b.cpu_us;
        check(
            out,
            &format!("{scenario}: CPU/req gateway / bare hyper"),
            cpu_ratio(g, b),
            "≤ 1.15×",
            r <= 1.15,
        );
        let r = g.rps / b.rps;
        check(
            out,
            &format!("{scenario}: req/s gateway / bare hyper"),
            format!("{r:.2}×"),
            "≥ 0.90×",
            r >= 0.9,
        );
    }
    // What the ceilings themselves reach, so a ratio target can be read against them.
    for (name, what) in [
        ("bare", "bare hyper"),
        (
            "bare-gateway-like",
            "bare hyper with a gateway hit's headers and settings",
        ),
        (
            "bare-distinct-bodies",
            "bare hyper over 10,000 distinct bodies",
        ),
        (
            "bare-proxy",
            "hyper server + hyper-util client proxying, nothing else",
        ),
        (
            "bare-inline",
            "hyper server + hyper's client connection driven on the request's task, no pool",
        ),
    ] {
        let Some(c) = s.get(name) else { continue };
        if let (Some(n), true) = (nginx, miss_load) {
            let _ = writeln!(
                out,
                "| {scenario}: CPU/req {name} / nginx proxy_pass | {} | (ceiling: {what}) | |",
                cpu_ratio(c, n)
            );
            let _ = writeln!(
                out,
                "| {scenario}: req/s {name} / nginx proxy_pass | {:.2}× | (ceiling: {what}) | |",
                c.rps / n.rps
            );
        }
        if let (Some(n), true) = (nginx, hit_path) {
            let _ = writeln!(
                out,
                "| {scenario}: req/s {name} / nginx | {:.2}× | (ceiling: {what}) | |",
                c.rps / n.rps
            );
        }
        if let (Some(g), true) = (gw, name != "bare") {
            let _ = writeln!(
                out,
                "| {scenario}: CPU/req gateway / {name} | {} | (ceiling: {what}) | |",
                cpu_ratio(g, c)
            );
        }
    }
    if let (Some(g), Some(b)) = (s.get("gateway-nolog"), bare) {
        let _ = writeln!(
            out,
            "| {scenario}: CPU/req gateway-nolog / bare hyper | {} | (access log off) | |",
            cpu_ratio(g, b)
        );
    }
    if let (Some(g), Some(d), false) = (gw, direct, miss_load) {
        let p50 = g.p50 - d.p50;
        check(
            out,
            &format!("{scenario}: miss overhead p50 (gateway − direct)"),
            format!("{p50:.0} µs"),
            "≤ 200 µs",
            p50 <= 200.0,
        );
        let _ = writeln!(
            out,
            "| {scenario}: miss overhead p99 (gateway − direct) | {:.0} µs | (report) | |",
            g.p99 - d.p99
        );
    }
}

/// `a`'s CPU per request over `b`'s, and both figures: `1.22× (9.4 vs 7.7 µs)`.
fn cpu_ratio(a: &Summary, b: &Summary) -> String {
    format!(
        "{:.2}× ({:.1} vs {:.1} µs)",
        a.cpu_us / b.cpu_us,
        a.cpu_us,
        b.cpu_us
    )
}

/// Target checks that read `kv` sections (stampede, pollers, memory).
fn kv_checks(out: &mut String, section: &str, kv: &Ordered<String>) {
    if section.starts_with('3') && section.contains("gateway") {
        if let Some(up) = kv_num(kv, "upstream_requests") {
            check(
                out,
                &format!("{section}: upstream requests"),
                format!("{up:.0}"),
                "exactly 1",
                up == 1.0,
            );
        }
        // The first answer is the earliest the upstream answer can be seen from outside, so
        // the spread of the answers is how long the last waiter trailed it.
        if let Some(spread) = kv_num(kv, "answer_spread_ms") {
            check(
                out,
                &format!("{section}: last waiter after the first answer"),
                format!("{spread:.2} ms"),
                "≤ 5 ms",
                spread <= 5.0,
            );
        }
    }
    if section.starts_with('3') && section.contains("ceiling") {
        if let Some(spread) = kv_num(kv, "answer_spread_ms") {
            let _ = writeln!(
                out,
                "| {section}: last answer after the first | {spread:.2} ms | (ceiling for the 5 ms target) | |"
            );
        }
    }
    if section.starts_with('4') {
        if let Some(a) = kv_num(kv, "upstream_per_run_per_ttl_while_running") {
            check(
                out,
                &format!("{section}: upstream per running run per running_ttl"),
                format!("{a:.3}"),
                "≤ 1",
                a <= 1.0,
            );
        }
    }
    if let Some(per) = kv_num(kv, "rss_per_entry_beyond_body_bytes") {
        check(
            out,
            &format!("{section}: per entry beyond the body"),
            format!("{per:.0} B"),
            "≤ 200 B",
            per <= 200.0,
        );
    }
    if section.starts_with("memory") {
        if let (Some(per), Some(rss), Some(body)) = (
            kv_num(kv, "overhead_bytes_per_entry"),
            kv_num(kv, "rss_after_kb"),
            kv_num(kv, "body_bytes"),
        ) {
            check(
                out,
                &format!("{section}: overhead per entry beyond the body"),
                format!("{per:.0} B"),
                "≤ 200 B",
                per <= 200.0,
            );
            let limit = 1.3 * body + 30.0 * 1024.0 * 1024.0;
            check(
                out,
                &format!("{section}: RSS vs 1.3 × cached bytes + 30 MiB"),
                format!(
                    "{:.1} MiB vs {:.1} MiB",
                    rss / 1024.0,
                    limit / 1024.0 / 1024.0
                ),
                "RSS ≤ limit",
                rss * 1024.0 <= limit,
            );
        }
    }
}

/// Prints the report for the results file at `path`.
pub fn print(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r = parse(&text)?;
    let clk_tck: f64 = r
        .meta
        .map
        .get("clk_tck")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100.0);
    let mut out = String::new();
    let _ = writeln!(out, "# dify-gateway end-to-end benchmark\n");
    for k in &r.meta.keys {
        let _ = writeln!(out, "- {k}: {}", r.meta.map[k]);
    }
    let mut checks = String::new();
    for scenario in &r.wrk.keys {
        let servers = &r.wrk.map[scenario];
        let _ = writeln!(out, "\n## {scenario}\n");
        let _ = writeln!(
            out,
            "| server | runs | req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | peak RSS MiB | errors | upstream reqs | other CPU % (max) | spread: req/s; p99; CPU µs/req (min–max) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        let mut sums = HashMap::new();
        for server in &servers.keys {
            let s = summarise(&servers.map[server], clk_tck);
            let hwm = r
                .hwm
                .get(&(scenario.clone(), server.clone()))
                .map_or("–".to_owned(), |kb| format!("{:.1}", kb / 1024.0));
            let _ = writeln!(
                out,
                "| {server} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {hwm} | {:.0} | {:.0} | {:.0} | {:.0}–{:.0}; {:.0}–{:.0}; {:.1}–{:.1} |",
                s.runs, s.rps, s.p50, s.p99, s.p999, s.cpu_us, s.errors, s.upstream, s.foreign_max,
                s.rps_range.0, s.rps_range.1, s.p99_range.0, s.p99_range.1, s.cpu_range.0,
                s.cpu_range.1
            );
            sums.insert(server.clone(), s);
        }
        wrk_checks(&mut checks, scenario, &sums);
    }
    for section in &r.kv.keys {
        let kv = &r.kv.map[section];
        let _ = writeln!(out, "\n## {section}\n");
        let _ = writeln!(out, "| measure | value |\n|---|---|");
        for k in &kv.keys {
            let _ = writeln!(out, "| {k} | {} |", kv.map[k]);
        }
        kv_checks(&mut checks, section, kv);
    }
    if !checks.is_empty() {
        let _ = writeln!(out, "\n## Targets\n");
        let _ = writeln!(out, "| check | measured | target | |\n|---|---|---|---|");
        out.push_str(&checks);
    }
    print!("{out}");
    Ok(())
}

//! What the gateway says about itself: its Prometheus `/metrics` text and its log file.
//!
//! Invariant: values are taken as exposed (series names with their labels, log levels and
//! messages as written); nothing is inferred when a series or a line is missing.

use std::collections::BTreeMap;

/// Prometheus text as `series → value` (`name{labels}` exactly as exposed).
#[derive(Debug, Default)]
pub struct MetricMap(pub BTreeMap<String, f64>);

impl MetricMap {
    pub fn parse(text: &str) -> MetricMap {
        let mut m = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    m.insert(series.to_owned(), v);
                }
            }
        }
        MetricMap(m)
    }

    pub fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// Series of `name` with one label, as `label value → value`.
    pub fn by_label(&self, name: &str) -> Vec<(String, f64)> {
        let prefix = format!("{name}{{");
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let labels = k.strip_prefix(&prefix)?.strip_suffix('}')?;
                let value = labels.split_once('=')?.1.trim_matches('"');
                Some((value.to_owned(), *v))
            })
            .collect()
    }
}

/// What the gateway's log file holds.
#[derive(Debug, Default)]
pub struct LogScan {
    pub lines: u64,
    pub warn: u64,
    pub error: u64,
    pub panics: u64,
    /// WARN/ERROR messages (fields stripped) with their counts.
    pub messages: BTreeMap<String, u64>,
}

impl LogScan {
    pub fn of(text: &str) -> LogScan {
        let mut s = LogScan::default();
        for line in text.lines() {
            s.lines += 1;
            if line.contains("panicked") {
                s.panics += 1;
            }
            let level = if line.contains(" WARN ") {
                s.warn += 1;
                "WARN"
            } else if line.contains(" ERROR ") {
                s.error += 1;
                "ERROR"
            } else {
                continue;
            };
            let rest = line.split_once(level).map_or(line, |(_, r)| r);
            let msg: Vec<&str> = rest
                .split_whitespace()
                .take_while(|w| !w.contains('='))
                .collect();
            *s.messages
                .entry(format!("{level} {}", msg.join(" ")))
                .or_default() += 1;
        }
        s
    }
}

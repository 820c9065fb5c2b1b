//! Readiness: each app's upstream is probed at an interval with the app's own key.
//!
//! Invariant: `/readyz` says ready only when some app's upstream answered a probe (any status
//! below 500) within `admin.ready_max_age` as Dify would; each app's key health reflects its last
//! probe, so a revoked or disabled key (401/403) is visible before clients hit it. An answer no
//! Dify API root gives — a 404 on the probe path, or a 2xx that is not JSON — means `base_url`
//! points elsewhere (classically without `/v1`): it does not count as reachable, and the log and
//! `/readyz` say so with the fix.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::metrics::{AppLabel, Metrics};
use crate::upstream::App;

/// What the last probe of an app found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHealth {
    /// Not probed yet.
    Unknown,
    /// The upstream accepted the key.
    Ok,
    /// 401 or 403: the key is revoked, the app disabled or deleted.
    Rejected,
    /// Some other answer (429, other 4xx).
    Degraded,
    /// No usable answer (connect error, timeout, 5xx).
    Unreachable,
}

impl KeyHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyHealth::Unknown => "unknown",
            KeyHealth::Ok => "ok",
            KeyHealth::Rejected => "rejected",
            KeyHealth::Degraded => "degraded",
            KeyHealth::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    health: KeyHealth,
    status: Option<u16>,
    at: Option<Instant>,
    /// Last time the upstream answered as Dify (status < 500).
    reachable_at: Option<Instant>,
    /// The last answer was not one of Dify's API root (see the module doc).
    not_dify: bool,
}

/// The per-app probe results.
pub struct Readiness {
    apps: Vec<(Arc<App>, Arc<Mutex<Probe>>)>,
    max_age: Duration,
}

/// `/readyz` body.
#[derive(Serialize)]
pub struct Report {
    pub ready: bool,
    pub apps: Vec<AppReport>,
}

#[derive(Serialize)]
pub struct AppReport {
    pub app: String,
    pub key: &'static str,
    pub upstream_status: Option<u16>,
    pub last_probe_seconds_ago: Option<u64>,
    pub reachable: bool,
    /// What is wrong with the app's upstream setting, and how to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Path probed under each app's base URL (one of Dify's app API routes).
const PROBE_PATH: &str = "/info";

/// Why an answer shows `base_url` is not Dify's API root, and the fix.
fn not_dify_problem(base_url: &http::Uri) -> String {
    let base = base_url.to_string();
    let base = base.trim_end_matches('/');
    let hint = if base.ends_with("/v1") {
        "check that base_url is Dify's service API root".to_owned()
    } else {
        format!("base_url should end in /v1 (e.g. {base}/v1)")
    };
    format!(
        "{base}{PROBE_PATH} did not answer as Dify's API (404 or not JSON): base_url does not point at Dify's API root; {hint}"
    )
}

impl Readiness {
    pub fn new(apps: &[Arc<App>], max_age: Duration) -> Readiness {
        let blank = Probe {
            health: KeyHealth::Unknown,
            status: None,
            at: None,
            reachable_at: None,
            not_dify: false,
        };
        Readiness {
            apps: apps
                .iter()
                .map(|a| (Arc::clone(a), Arc::new(Mutex::new(blank))))
                .collect(),
            max_age,
        }
    }

    /// Probes every app once (concurrently) and records the results.
    pub async fn probe_all(&self, metrics: &Arc<Metrics>) {
        let mut set = tokio::task::JoinSet::new();
        for (app, slot) in &self.apps {
            let (app, slot, metrics) = (Arc::clone(app), Arc::clone(slot), Arc::clone(metrics));
            set.spawn(async move { probe_one(&app, &slot, &metrics).await });
        }
        while set.join_next().await.is_some() {}
    }

    /// The current report.
    pub fn report(&self) -> Report {
        let now = Instant::now();
        let apps: Vec<AppReport> = self
            .apps
            .iter()
            .map(|(app, slot)| {
                let p = *slot.lock().unwrap_or_else(PoisonError::into_inner);
                AppReport {
                    app: app.name.to_string(),
                    key: p.health.as_str(),
                    upstream_status: p.status,
                    last_probe_seconds_ago: p.at.map(|t| now.duration_since(t).as_secs()),
                    reachable: p
                        .reachable_at
                        .is_some_and(|t| now.duration_since(t) <= self.max_age),
                    problem: p.not_dify.then(|| not_dify_problem(&app.base_url)),
                }
            })
            .collect();
        Report {
            ready: apps.iter().any(|a| a.reachable),
            apps,
        }
    }

    /// Probes at `interval` until the returned task is aborted.
    pub fn spawn(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.probe_all(&metrics).await;
            }
        })
    }
}

async fn probe_one(app: &App, slot: &Mutex<Probe>, metrics: &Metrics) {
    let uri = app.upstream.path_url(PROBE_PATH);
    let result = match uri {
        Ok(u) => app.upstream.get(u, None).await,
        Err(e) => Err(e),
    };
    let now = Instant::now();
    let mut p = slot.lock().unwrap_or_else(PoisonError::into_inner);
    p.at = Some(now);
    let was_not_dify = p.not_dify;
    p.not_dify = false;
    match result {
        Ok(a) => {
            let code = a.status.as_u16();
            p.status = Some(code);
            let json = a
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.trim_start().starts_with("application/json"));
            p.not_dify = code == 404 || (a.status.is_success() && !json);
            p.health = match code {
                _ if p.not_dify => KeyHealth::Unknown,
                200..=299 => KeyHealth::Ok,
                401 | 403 => KeyHealth::Rejected,
                500.. => KeyHealth::Unreachable,
                _ => KeyHealth::Degraded,
            };
            if code < 500 && !p.not_dify {
                p.reachable_at = Some(now);
            }
        }
        Err(_) => {
            p.status = None;
            p.health = KeyHealth::Unreachable;
        }
    }
    if p.not_dify && !was_not_dify {
        tracing::error!(app = %app.name, status = ?p.status, problem = %not_dify_problem(&app.base_url), "UPSTREAM IS NOT DIFY'S API");
    }
    if p.health == KeyHealth::Rejected {
        tracing::warn!(app = %app.name, status = ?p.status, "upstream rejected the app key");
    }
    metrics
        .app_key_healthy
        .get_or_create(&AppLabel {
            app: app.name.clone(),
        })
        .set(i64::from(p.health == KeyHealth::Ok));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::AppId;
    use crate::config::Config;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with `status` and a body of `content_type`, as a web
    /// site at the host's root would.
    async fn site(status: &'static str, content_type: &'static str) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = "<html><body>Dify</body></html>";
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    async fn report_for(base: &str) -> Report {
        let cfg = Config::for_upstream(base, "app-k").unwrap();
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let app = Arc::new(App::new(AppId(0), &cfg.apps[0], &cfg.upstream, &gauge).unwrap());
        let r = Readiness::new(&[app], Duration::from_secs(60));
        r.probe_all(&Arc::new(Metrics::new())).await;
        r.report()
    }

    #[tokio::test]
    async fn a_web_page_or_a_404_at_the_probe_path_is_not_dify() {
        for (status, content_type) in [("200 OK", "text/html"), ("404 Not Found", "text/html")] {
            let base = site(status, content_type).await;
            let r = report_for(&base).await;
            assert!(!r.ready, "{status}");
            let problem = r.apps[0].problem.as_deref().unwrap();
            assert!(
                problem.contains(&format!("should end in /v1 (e.g. {base}/v1)")),
                "{problem}"
            );
            assert_eq!(r.apps[0].key, "unknown");
        }
        // The same answer under a base ending in /v1 points at the root without the /v1 hint.
        let base = format!("{}/v1", site("200 OK", "text/html").await);
        let problem = report_for(&base).await.apps[0].problem.clone().unwrap();
        assert!(problem.contains("Dify's service API root"), "{problem}");
        // A JSON 2xx is Dify.
        let r = report_for(&site("200 OK", "application/json").await).await;
        assert!(r.ready && r.apps[0].problem.is_none());
    }
}

use std::num::NonZeroU64;

use super::*;

fn client(name: &str, runs: Option<u64>, tokens: Option<u64>) -> ClientConfig {
    ClientConfig {
        name: name.into(),
        token_sha256: [0; 32],
        app: 0,
        rate: None,
        starts: Default::default(),
        read_app_logs: false,
        max_waiters: None,
        user_prefix: None,
        quota: Quota {
            runs_per_day: runs.and_then(NonZeroU64::new),
            tokens_per_day: tokens.and_then(NonZeroU64::new),
        },
        webhook: None,
    }
}

fn usage(clients: &[ClientConfig]) -> (Usage, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let u = Usage::new(clients, &["app".into()], None, Arc::clone(&metrics));
    (u, metrics)
}

#[tokio::test]
async fn a_run_is_counted_once_whoever_reports_it() {
    let (u, metrics) = usage(&[]);
    let run = "9f0c7a3e-0000-4000-8000-000000000001";
    assert_eq!(
        u.finished("app", "team-a", run, "succeeded", 120, 3, 1.5)
            .await,
        Counted::Counted
    );
    for who in ["team-a", "team-b", OPEN_CLIENT] {
        assert_eq!(
            u.finished("app", who, run, "succeeded", 120, 3, 1.5).await,
            Counted::Duplicate
        );
    }
    // The same id in another app is another run.
    assert_eq!(
        u.finished("other", "team-b", run, "failed", 7, 1, 0.5)
            .await,
        Counted::Counted
    );
    let today = day_of(SystemTime::now());
    let rows = u.read(&today, &today).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let a = rows.iter().find(|r| r.client == "team-a").unwrap();
    assert_eq!(a.app, "app");
    assert_eq!(a.figures.runs["succeeded"], 1);
    assert_eq!((a.figures.tokens, a.figures.steps), (120, 3));
    assert_eq!(a.figures.run_seconds, 1.5);
    let text = metrics.encode();
    assert!(
        text.contains(
            "dify_gateway_usage_runs_total{client=\"team-a\",app=\"app\",status=\"succeeded\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("dify_gateway_usage_tokens_total{client=\"team-a\",app=\"app\"} 120"));
    assert!(
        text.contains("dify_gateway_usage_run_seconds_total{client=\"team-a\",app=\"app\"} 1.5")
    );
}

#[test]
fn a_claim_is_held_for_its_ttl_then_taken_again() {
    let (u, _) = usage(&[]);
    let run = "9f0c7a3e-0000-4000-8000-000000000002";
    let t0 = Instant::now();
    assert!(u.claim("app", run, t0));
    assert!(!u.claim("app", run, t0));
    assert!(!u.claim("app", run, t0 + CLAIM_TTL - Duration::from_secs(1)));
    // Another app's run of the same id is another run.
    assert!(u.claim("other", run, t0));
    // Past the TTL it counts as absent, and the new claim holds from then on.
    let later = t0 + CLAIM_TTL;
    assert!(u.claim("app", run, later));
    assert!(!u.claim("app", run, later + Duration::from_secs(1)));
}

#[test]
fn concurrent_claims_of_one_run_give_it_to_exactly_one() {
    let (u, _) = usage(&[]);
    let u = Arc::new(u);
    let now = Instant::now();
    let won: usize = (0..8)
        .map(|_| {
            let u = Arc::clone(&u);
            std::thread::spawn(move || {
                (0..1000)
                    .filter(|i| u.claim("app", &format!("run-{i}"), now))
                    .count()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("no panic"))
        .sum();
    assert_eq!(won, 1000);
}

#[tokio::test]
async fn an_unknown_status_is_counted_as_other() {
    let (u, _) = usage(&[]);
    u.finished("app", "a", "r1", "exploded\n", 0, 0, f64::NAN)
        .await;
    let today = day_of(SystemTime::now());
    let rows = u.read(&today, &today).await.unwrap();
    assert_eq!(rows[0].figures.runs["other"], 1);
    assert_eq!(rows[0].figures.run_seconds, 0.0);
}

#[tokio::test]
async fn quotas_refuse_until_midnight_once_reached() {
    let (u, _) = usage(&[
        client("runs", Some(2), None),
        client("tokens", None, Some(100)),
        client("free", None, None),
    ]);
    assert_eq!(u.check_quota("runs", "app").await, Ok(()));
    u.finished("app", "runs", "r1", "succeeded", 1, 1, 1.0)
        .await;
    assert_eq!(u.check_quota("runs", "app").await, Ok(()));
    u.finished("app", "runs", "r2", "failed", 1, 1, 1.0).await;
    let wait = u.check_quota("runs", "app").await.unwrap_err();
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(DAY),
        "{wait:?}"
    );

    u.finished("app", "tokens", "t1", "succeeded", 99, 1, 1.0)
        .await;
    assert_eq!(u.check_quota("tokens", "app").await, Ok(()));
    u.finished("app", "tokens", "t2", "succeeded", 1, 1, 1.0)
        .await;
    assert!(u.check_quota("tokens", "app").await.is_err());

    for i in 0..5 {
        u.finished("app", "free", &format!("f{i}"), "succeeded", 1000, 1, 1.0)
            .await;
    }
    assert_eq!(u.check_quota("free", "app").await, Ok(()));
    assert_eq!(u.check_quota("unknown", "app").await, Ok(()));

    // A reload lifts a quota.
    u.reload(&[client("runs", Some(10), None)], &["app".into()]);
    assert_eq!(u.check_quota("runs", "app").await, Ok(()));
}

#[test]
fn days_parse_strictly_and_ranges_are_bounded() {
    assert_eq!(
        day_range("2026-02-27", "2026-03-01").unwrap(),
        ["2026-02-27", "2026-02-28", "2026-03-01"]
    );
    assert_eq!(
        day_range("2024-12-31", "2024-12-31").unwrap(),
        ["2024-12-31"]
    );
    for bad in [
        "2026-2-01",
        "2026-02-30",
        "20260201",
        "2026-02-01x",
        "",
        "1969-12-31",
    ] {
        assert!(
            matches!(day_range(bad, "2026-03-01"), Err(UsageError::BadRange(_))),
            "{bad}"
        );
    }
    assert!(day_range("2026-03-02", "2026-03-01").is_err());
    assert!(day_range("2025-01-01", "2025-12-31").is_ok());
    assert!(day_range("2024-01-01", "2025-12-31").is_err());
}

#[test]
fn midnight_is_the_next_utc_day() {
    let t = UNIX_EPOCH + Duration::from_secs(20_000 * DAY + 3600);
    assert_eq!(until_midnight(t), Duration::from_secs(DAY - 3600));
    assert_eq!(day_of(t), day_name(20_000));
}

#[test]
fn finished_runs_parse_from_difys_shapes_and_running_ones_do_not() {
    let detail = br#"{"id":"r1","status":"succeeded","total_tokens":12,"total_steps":3,"elapsed_time":0.5,"outputs":{}}"#;
    let r = FinishedRun::parse(detail).unwrap();
    assert_eq!(r.id.as_deref(), Some("r1"));
    assert_eq!(
        (r.total_tokens, r.total_steps, r.elapsed_time),
        (Some(12), Some(3), Some(0.5))
    );
    assert!(FinishedRun::parse(br#"{"id":"r1","status":"running","total_tokens":0}"#).is_none());
    assert!(FinishedRun::parse(b"not json").is_none());
    let partial = FinishedRun::parse(br#"{"status":"partial-succeeded"}"#).unwrap();
    assert_eq!(partial.total_tokens, None);
}

#[test]
fn a_quota_refusal_is_429_quota_exceeded_until_midnight() {
    let e = crate::error::GatewayError::quota_exceeded(Duration::from_millis(1500));
    assert_eq!(e.as_str(), "quota_exceeded");
    assert_eq!(e.status(), 429);
    assert_eq!(e.to_response().headers()["retry-after"], "2");
    assert_eq!(crate::metrics::RejectReason::Quota.as_str(), "quota");
}

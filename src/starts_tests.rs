use std::num::NonZeroU32;

use super::*;

fn client(name: &str, runs_per_minute: Option<u32>, max_open_streams: Option<u32>) -> ClientConfig {
    ClientConfig {
        name: name.into(),
        token_sha256: [0; 32],
        app: 0,
        rate: None,
        starts: StartLimits {
            runs_per_minute: runs_per_minute.and_then(NonZeroU32::new),
            max_open_streams: max_open_streams.and_then(NonZeroU32::new),
        },
        read_app_logs: false,
        quota: Default::default(),
        webhook: None,
        max_waiters: None,
        user_prefix: None,
    }
}

#[test]
fn runs_per_minute_refuses_past_the_bucket_with_a_retry_after() {
    let s = Starts::new(&[client("a", Some(2), None), client("b", None, None)]);
    assert!(s.start(Some("a")).is_ok());
    assert!(s.start(Some("a")).is_ok());
    let refused = s.start(Some("a")).unwrap_err();
    let StartRefused::RunsPerMinute { retry_after } = refused else {
        panic!("{refused:?}");
    };
    // Two a minute: the next token comes within 30 s.
    assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(30));
    let e = GatewayError::from(refused);
    let resp = e.to_response();
    assert_eq!(resp.status(), 429);
    assert_eq!(e.as_str(), "too_many_requests");
    let secs: u64 = resp.headers()[http::header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&secs), "{secs}");
    assert_eq!(refused.as_str(), "runs_per_minute");
    // Others are not limited by it; neither is the open gateway.
    for _ in 0..10 {
        assert!(s.start(Some("b")).is_ok());
        assert!(s.start(None).is_ok());
    }
}

#[test]
fn an_open_stream_slot_is_freed_when_its_permit_drops() {
    let s = Starts::new(&[client("a", None, Some(2))]);
    let first = s.start_streaming(Some("a")).unwrap();
    let second = s.open_stream(Some("a")).unwrap();
    assert_eq!(s.open_streams("a"), Some(2));
    let refused = s.start_streaming(Some("a")).unwrap_err();
    assert_eq!(refused, StartRefused::OpenStreams);
    let resp = GatewayError::from(refused).to_response();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
    drop(first);
    assert_eq!(s.open_streams("a"), Some(1));
    let _third = s.start_streaming(Some("a")).unwrap();
    drop(second);
    assert_eq!(s.open_streams("a"), Some(1));
}

#[test]
fn a_streaming_start_refused_per_minute_gives_its_slot_back() {
    let s = Starts::new(&[client("a", Some(1), Some(5))]);
    let _running = s.start_streaming(Some("a")).unwrap();
    assert!(matches!(
        s.start_streaming(Some("a")),
        Err(StartRefused::RunsPerMinute { .. })
    ));
    assert_eq!(s.open_streams("a"), Some(1));
    // Following an existing run's events takes no run start.
    let _events = s.open_stream(Some("a")).unwrap();
}

#[test]
fn a_reload_keeps_unchanged_limits_and_follows_changed_ones() {
    let s = Starts::new(&[client("a", Some(1), Some(1)), client("b", Some(1), None)]);
    let held = s.start_streaming(Some("a")).unwrap();
    s.start(Some("b")).unwrap();
    s.reload(&[client("a", Some(1), Some(1)), client("b", Some(3), None)]);
    // a: unchanged, still spent and still holding its stream.
    assert!(s.start(Some("a")).is_err());
    assert_eq!(
        s.open_stream(Some("a")).unwrap_err(),
        StartRefused::OpenStreams
    );
    // b: its new limit applies.
    for _ in 0..3 {
        s.start(Some("b")).unwrap();
    }
    assert!(s.start(Some("b")).is_err());
    drop(held);
    // Removed: no longer limited here (the client table refuses its token).
    s.reload(&[]);
    assert!(s.start(Some("a")).is_ok());
}

use std::net::TcpListener;

use secrecy::SecretString;

use super::*;
use crate::config::{KeySource, SharedConfig};

fn app(name: &str, isolate: bool) -> AppConfig {
    AppConfig {
        name: name.into(),
        base_url: "http://127.0.0.1:9/v1".parse().unwrap(),
        api_key: SecretString::from("app-test"),
        key_source: KeySource::Env("KEY".into()),
        isolate_clients: isolate,
    }
}

fn ownership(max_records: u64, ttl: Duration, isolate: bool) -> Ownership {
    Ownership::new(
        &OwnershipConfig {
            max_records,
            ttl,
            unknown_ttl: Duration::from_secs(1),
        },
        &[app("a", isolate), app("b", isolate)],
        None,
    )
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const A: AppId = AppId(0);
const B: AppId = AppId(1);

#[tokio::test(start_paused = true)]
async fn owner_foreign_and_unknown() {
    let o = ownership(100, DAY, true);
    let run = Uuid::new_v4();
    assert_eq!(
        o.record(A, Kind::Run, run, Some("team-a")).await,
        Recorded::Local
    );
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-a")).await,
        Access::Owner
    );
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Foreign
    );
    assert!(!Access::Foreign.allowed());
    // Another id, another kind or another app is not this record.
    let other = Uuid::new_v4();
    assert_eq!(
        o.check(A, Kind::Run, other, Some("team-b")).await,
        Access::Unknown
    );
    assert_eq!(
        o.check(A, Kind::File, run, Some("team-b")).await,
        Access::Unknown
    );
    assert_eq!(
        o.check(B, Kind::Run, run, Some("team-b")).await,
        Access::Unknown
    );
    // The first record wins.
    o.record(A, Kind::Run, run, Some("team-b")).await;
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Foreign
    );
    // Open mode has no client to judge.
    assert_eq!(o.check(A, Kind::Run, run, None).await, Access::NotIsolated);
    assert_eq!(o.record(A, Kind::Run, other, None).await, Recorded::Nobody);
}

#[tokio::test(start_paused = true)]
async fn a_started_run_owns_its_task() {
    let o = ownership(100, DAY, true);
    let (run, task) = (Uuid::new_v4(), Uuid::new_v4());
    o.record_run(A, run, Some(task), Some("team-a")).await;
    assert_eq!(
        o.check(A, Kind::Task, task, Some("team-b")).await,
        Access::Foreign
    );
    assert_eq!(
        o.check(A, Kind::Task, task, Some("team-a")).await,
        Access::Owner
    );
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Foreign
    );
}

#[tokio::test(start_paused = true)]
async fn isolation_off_lets_everyone_in_and_a_reload_turns_it_on() {
    let o = ownership(100, DAY, false);
    let run = Uuid::new_v4();
    o.record(A, Kind::Run, run, Some("team-a")).await;
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::NotIsolated
    );
    // Recorded while off, enforced once on.
    o.set_isolation(&[app("a", true), app("b", false)]);
    assert!(o.isolates(A) && !o.isolates(B));
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Foreign
    );
}

#[tokio::test(start_paused = true)]
async fn records_expire_after_their_ttl() {
    let ttl = Duration::from_secs(60);
    let o = ownership(100, ttl, true);
    let run = Uuid::new_v4();
    o.record(A, Kind::Run, run, Some("team-a")).await;
    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Foreign
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Unknown
    );
    // An expired record is replaced by the next creator's.
    o.record(A, Kind::Run, run, Some("team-b")).await;
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Owner
    );
}

#[tokio::test(start_paused = true)]
async fn memory_holds_at_most_max_records_and_keeps_the_newest() {
    let o = ownership(16, DAY, true);
    let mut runs = Vec::new();
    for _ in 0..200 {
        let run = Uuid::new_v4();
        o.record(A, Kind::Run, run, Some("team-a")).await;
        runs.push(run);
    }
    assert!(o.held() <= 16, "{}", o.held());
    let newest = *runs.last().unwrap();
    assert_eq!(
        o.check(A, Kind::Run, newest, Some("team-b")).await,
        Access::Foreign
    );
}

/// A shared tier nobody answers on.
fn dead_tier() -> SharedTier {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    SharedTier::new(SharedConfig::for_url(&format!("redis://127.0.0.1:{port}")).unwrap()).unwrap()
}

/// An isolating app's ownership with a shared tier nobody answers on.
fn behind_dead_tier() -> Ownership {
    Ownership::new(
        &OwnershipConfig {
            max_records: 100,
            ttl: DAY,
            unknown_ttl: Duration::from_secs(1),
        },
        &[app("a", true)],
        Some(dead_tier()),
    )
}

#[tokio::test]
async fn a_dead_shared_tier_never_lets_a_foreign_client_in_for_a_local_record() {
    let o = behind_dead_tier();
    let run = Uuid::new_v4();
    assert_eq!(
        o.record(A, Kind::Run, run, Some("team-a")).await,
        Recorded::LocalOnly
    );
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Foreign
    );
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-a")).await,
        Access::Owner
    );
    // An id this replica does not hold cannot be verified: let in, and said so.
    let unknown = Uuid::new_v4();
    let access = o.check(A, Kind::Run, unknown, Some("team-b")).await;
    assert_eq!(access, Access::Unverified);
    assert!(access.allowed());
}

#[tokio::test(start_paused = true)]
async fn memory_alone_answers_what_it_holds() {
    let ttl = Duration::from_secs(60);
    let o = ownership(100, ttl, true);
    let run = Uuid::new_v4();
    assert_eq!(
        o.check_now(A, Kind::Run, run, None),
        Some(Access::NotIsolated)
    );
    // Without a shared tier, memory is all there is: an id not held is unknown, as for check.
    assert_eq!(
        o.check_now(A, Kind::Run, run, Some("team-b")),
        Some(Access::Unknown)
    );
    o.record(A, Kind::Run, run, Some("team-a")).await;
    assert_eq!(
        o.check_now(A, Kind::Run, run, Some("team-a")),
        Some(Access::Owner)
    );
    assert_eq!(
        o.check_now(A, Kind::Run, run, Some("team-b")),
        Some(Access::Foreign)
    );
    // A record that ran out is left to check, which drops it.
    tokio::time::advance(ttl).await;
    assert_eq!(o.check_now(A, Kind::Run, run, Some("team-b")), None);
    assert_eq!(
        o.check(A, Kind::Run, run, Some("team-b")).await,
        Access::Unknown
    );
    let open = ownership(100, DAY, false);
    assert_eq!(
        open.check_now(A, Kind::Run, run, Some("team-b")),
        Some(Access::NotIsolated)
    );
}

#[tokio::test]
async fn with_a_shared_tier_an_id_not_held_here_is_for_the_tier() {
    let o = behind_dead_tier();
    let run = Uuid::new_v4();
    assert_eq!(o.check_now(A, Kind::Run, run, Some("team-b")), None);
    o.record(A, Kind::Run, run, Some("team-a")).await;
    assert_eq!(
        o.check_now(A, Kind::Run, run, Some("team-b")),
        Some(Access::Foreign)
    );
}

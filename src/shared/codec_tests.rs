use super::*;
use proptest::prelude::*;
use std::sync::Arc;
use uuid::Uuid;

const TAG: &str = "0123456789abcdef0123456789abcdef";

fn run(n: u128) -> RunId {
    RunId::from(Uuid::from_u128(n))
}

fn entry(body: Vec<u8>, class: EntryClass, ttl: Option<Duration>) -> Stored {
    Stored {
        status: if class == EntryClass::NotFound {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        },
        headers: Arc::new(KeptHeaders {
            content_type: Some(HeaderValue::from_static("application/json")),
            x_version: Some(HeaderValue::from_static("1.9.2")),
            x_env: None,
            retry_after: None,
        }),
        etag: crate::cache::etag_of(&body),
        body: Bytes::from(body),
        class: Some(class),
        ttl,
        fetched_at: Instant::now(),
    }
}

fn same(a: &Stored, b: &Stored) {
    assert_eq!(a.status, b.status);
    assert_eq!(a.class, b.class);
    assert_eq!(a.ttl, b.ttl);
    assert_eq!(a.body, b.body);
    assert_eq!(a.headers.content_type, b.headers.content_type);
    assert_eq!(a.headers.x_version, b.headers.x_version);
    assert_eq!(a.headers.x_env, b.headers.x_env);
    assert_eq!(b.headers.retry_after, None);
}

#[test]
fn round_trips_a_large_body() {
    let body: Vec<u8> = (0..6 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let s = entry(body, EntryClass::Terminal, None);
    let v = encode(TAG, run(1), &s, 1_000).unwrap();
    assert_eq!(
        v.len(),
        s.body.len() + FIXED_LEN + TAG.len() + 16 + 5 + CRC_LEN
    );
    let d = decode_at(Bytes::from(v), TAG, run(1), 1_000, Instant::now()).unwrap();
    same(&s, &d);
}

#[test]
fn age_counts_from_the_stored_time() {
    let s = entry(
        b"{}".to_vec(),
        EntryClass::Running,
        Some(Duration::from_secs(1)),
    );
    let v = encode(TAG, run(1), &s, 10_000).unwrap();
    let now = Instant::now();
    let d = decode_at(Bytes::from(v.clone()), TAG, run(1), 15_500, now).unwrap();
    assert_eq!(now - d.fetched_at, Duration::from_millis(5_500));
    // A reader whose clock is behind the writer's sees age zero, not a panic.
    let d = decode_at(Bytes::from(v.clone()), TAG, run(1), 9_000, now).unwrap();
    assert_eq!(d.fetched_at, now);
    // Older than the monotonic clock can represent: saturates.
    let d = decode_at(Bytes::from(v), TAG, run(1), u64::MAX, now).unwrap();
    assert!(d.fetched_at <= now);
}

#[test]
fn sub_millisecond_ttls_round_up() {
    let s = entry(
        Vec::new(),
        EntryClass::Running,
        Some(Duration::from_micros(1500)),
    );
    let v = encode(TAG, run(1), &s, 0).unwrap();
    let d = decode_at(Bytes::from(v), TAG, run(1), 0, Instant::now()).unwrap();
    assert_eq!(d.ttl, Some(Duration::from_millis(2)));
}

#[test]
fn unkept_entries_are_not_encoded() {
    let mut s = entry(Vec::new(), EntryClass::Running, None);
    s.class = None;
    assert_eq!(encode(TAG, run(1), &s, 0), Err(EncodeError::NotKept));
    let s = entry(Vec::new(), EntryClass::Running, None);
    assert_eq!(
        encode(&"x".repeat(256), run(1), &s, 0),
        Err(EncodeError::TagTooLong)
    );
}

#[test]
fn foreign_values_are_refused() {
    let s = entry(
        b"{\"status\":\"succeeded\"}".to_vec(),
        EntryClass::Terminal,
        None,
    );
    let v = Bytes::from(encode(TAG, run(1), &s, 0).unwrap());
    let now = Instant::now();
    assert_eq!(
        decode_at(v.clone(), "another-app", run(1), 0, now).err(),
        Some(DecodeError::ForeignApp)
    );
    assert_eq!(
        decode_at(v.clone(), TAG, run(2), 0, now).err(),
        Some(DecodeError::ForeignRun)
    );
    let json = Bytes::from_static(
        br#"{"id":"x","status":"succeeded","outputs":{}} padding padding padding"#,
    );
    assert_eq!(
        decode_at(json, TAG, run(1), 0, now).err(),
        Some(DecodeError::Magic)
    );
    let mut v2 = v.to_vec();
    v2[4] = 2;
    assert_eq!(
        decode_at(Bytes::from(v2), TAG, run(1), 0, now).err(),
        Some(DecodeError::Version(2))
    );
    assert_eq!(
        decode_at(Bytes::new(), TAG, run(1), 0, now).err(),
        Some(DecodeError::TooShort)
    );
}

#[test]
fn a_value_whose_crc_matches_but_fields_lie_is_refused() {
    // Flags claim no ttl but the ttl field is set; fix the CRC so only the field check catches it.
    let s = entry(Vec::new(), EntryClass::Terminal, None);
    let mut v = encode(TAG, run(1), &s, 0).unwrap();
    v[25] = 1;
    let n = v.len() - CRC_LEN;
    let crc = crc32fast::hash(&v[..n]).to_be_bytes();
    v[n..].copy_from_slice(&crc);
    assert_eq!(
        decode_at(Bytes::from(v), TAG, run(1), 0, Instant::now()).err(),
        Some(DecodeError::Flags)
    );
}

fn header_value() -> impl Strategy<Value = Option<HeaderValue>> {
    proptest::option::of("[ -~]{0,40}").prop_map(|o| o.map(|s| HeaderValue::from_str(&s).unwrap()))
}

prop_compose! {
    fn arb_entry()(
        status in 100u16..=999,
        class in prop_oneof![
            Just(EntryClass::Terminal),
            Just(EntryClass::Running),
            Just(EntryClass::NotFound)
        ],
        ttl_ms in proptest::option::of(1u64..=1 << 40),
        content_type in header_value(),
        x_version in header_value(),
        x_env in header_value(),
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) -> Stored {
        Stored {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Arc::new(KeptHeaders { content_type, x_version, x_env, retry_after: None }),
            etag: crate::cache::etag_of(&body),
        body: Bytes::from(body),
            class: Some(class),
            ttl: ttl_ms.map(Duration::from_millis),
            fetched_at: Instant::now(),
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_decode_and_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(decode_at(Bytes::from(b), TAG, run(1), 0, Instant::now()).is_err());
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_magic_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut v = MAGIC.to_vec();
        v.push(VERSION);
        v.extend_from_slice(&b);
        prop_assert!(decode_at(Bytes::from(v), TAG, run(1), 0, Instant::now()).is_err());
    }

    #[test]
    fn encode_then_decode_round_trips(
        s in arb_entry(),
        tag in "[!-z|~]{1,64}",
        id in any::<u128>(),
        stored in 0u64..1 << 50,
        age in 0u64..1 << 20,
    ) {
        let v = encode(&tag, run(id), &s, stored).unwrap();
        let now = Instant::now();
        let d = decode_at(Bytes::from(v), &tag, run(id), stored + age, now).unwrap();
        same(&s, &d);
        prop_assert_eq!(now - d.fetched_at, Duration::from_millis(age));
    }

    #[test]
    fn any_flipped_byte_is_refused(s in arb_entry(), pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut v = encode(TAG, run(7), &s, 42).unwrap();
        let i = pos.index(v.len());
        v[i] ^= mask;
        prop_assert!(decode_at(Bytes::from(v), TAG, run(7), 42, Instant::now()).is_err());
    }

    #[test]
    fn any_truncation_or_extension_is_refused(s in arb_entry(), cut in any::<prop::sample::Index>(), extra in 1usize..8) {
        let v = encode(TAG, run(7), &s, 42).unwrap();
        let n = cut.index(v.len());
        prop_assert!(decode_at(Bytes::copy_from_slice(&v[..n]), TAG, run(7), 42, Instant::now()).is_err());
        let mut longer = v.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        prop_assert!(decode_at(Bytes::from(longer), TAG, run(7), 42, Instant::now()).is_err());
    }
}

//! Workflow run ids as the gateway accepts them.
//!
//! Invariant: a [`RunId`] is always a hyphenated UUID, and every text form of it (cache key,
//! upstream path) is the lower-case canonical one, so `ABC…` and `abc…` name one run. Anything
//! else is rejected here, before it can reach the cache or the upstream.

use std::fmt;

use uuid::Uuid;

/// Length of the hyphenated form, `8-4-4-4-12`.
const HYPHENATED_LEN: usize = 36;

/// A validated, canonical workflow run id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(Uuid);

/// Why a path segment is not a run id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("workflow_run_id must be a hyphenated UUID")]
pub struct InvalidRunId;

impl RunId {
    /// Accepts only the 36-character hyphenated form, in any letter case.
    pub fn parse(s: &str) -> Result<RunId, InvalidRunId> {
        let b = s.as_bytes();
        if b.len() != HYPHENATED_LEN
            || b[8] != b'-'
            || b[13] != b'-'
            || b[18] != b'-'
            || b[23] != b'-'
        {
            return Err(InvalidRunId);
        }
        Uuid::try_parse_ascii(b)
            .map(RunId)
            .map_err(|_| InvalidRunId)
    }

    /// The underlying UUID.
    pub fn uuid(&self) -> Uuid {
        self.0
    }

    /// The canonical lower-case text, written into a stack buffer.
    pub fn encode<'b>(&self, buf: &'b mut [u8; HYPHENATED_LEN]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

impl From<Uuid> for RunId {
    fn from(u: Uuid) -> Self {
        RunId(u)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10";

    #[test]
    fn accepts_hyphenated_in_any_case() {
        let lower = RunId::parse(ID).unwrap();
        let upper = RunId::parse(&ID.to_uppercase()).unwrap();
        assert_eq!(lower, upper);
        assert_eq!(upper.to_string(), ID);
        let mut buf = [0u8; 36];
        assert_eq!(upper.encode(&mut buf), ID);
    }

    #[test]
    fn rejects_other_forms() {
        for bad in [
            "",
            "abc",
            "0b7c5c3e8f5e4b7a9d591d7b1c9e2f10",
            "{0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10}",
            "urn:uuid:0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f10",
            "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f1g",
            "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f1",
            "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f100",
            "0b7c5c3e+8f5e-4b7a-9d59-1d7b1c9e2f10",
            "..%2F..%2Fworkflows%2Flogs%2F%2e%2e%2e",
            "0b7c5c3e-8f5e-4b7a-9d5%2F1d7b1c9e2f10",
            "0b7c5c3e-8f5e-4b7a-9d59-1d7b1c9e2f1é",
        ] {
            assert_eq!(RunId::parse(bad), Err(InvalidRunId), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_and_canonical_is_lowercase(s in ".{0,64}") {
            if let Ok(id) = RunId::parse(&s) {
                let canon = id.to_string();
                prop_assert_eq!(canon.len(), 36);
                prop_assert_eq!(canon.to_ascii_lowercase(), canon.clone());
                prop_assert_eq!(s.to_ascii_lowercase(), canon);
            }
        }

        #[test]
        fn every_case_mix_of_a_uuid_is_one_id(bytes in any::<[u8; 16]>(), mask in any::<u64>()) {
            let u = Uuid::from_bytes(bytes);
            let canon = u.hyphenated().to_string();
            let mixed: String = canon.chars().enumerate()
                .map(|(i, c)| if mask >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                .collect();
            prop_assert_eq!(RunId::parse(&mixed).unwrap(), RunId::parse(&canon).unwrap());
        }
    }
}

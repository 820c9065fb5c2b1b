//! `[passthrough]`: what the gateway accepts on the routes it passes to Dify (run starts, stops,
//! logs, files, the app's descriptions), beside the cached run-detail route.
//!
//! Invariant: both caps are above zero, so every body the gateway forwards is bounded.

use serde::Deserialize;

use super::context::{ConfigError, Context};

/// Default [`PassthroughConfig::max_json_bytes`]: 1 MiB, far above a run's inputs as Dify's
/// forms take them, small enough that a buffered JSON body costs little.
pub const DEFAULT_MAX_JSON_BYTES: u64 = 1 << 20;

/// Default [`PassthroughConfig::max_upload_bytes`]: 100 MiB (104857600), Dify's nginx limit.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 100 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassthrough {
    pub max_json_bytes: Option<u64>,
    pub max_upload_bytes: Option<u64>,
    pub allow_unlisted: Option<bool>,
}

/// The passed-through routes' limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughConfig {
    /// Largest JSON request body (read whole, checked, rewritten); larger is 413.
    pub max_json_bytes: u64,
    /// Largest multipart upload (streamed); larger is 413, even once partly sent.
    pub max_upload_bytes: u64,
    /// Pass paths under `/v1` that no route lists to the client's app (else Dify's 404).
    pub allow_unlisted: bool,
}

impl Default for PassthroughConfig {
    fn default() -> Self {
        PassthroughConfig {
            max_json_bytes: DEFAULT_MAX_JSON_BYTES,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            allow_unlisted: false,
        }
    }
}

impl RawPassthrough {
    /// Checks `[passthrough]`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<PassthroughConfig, ConfigError> {
        let max_json_bytes = self.max_json_bytes.unwrap_or(DEFAULT_MAX_JSON_BYTES);
        let max_upload_bytes = self.max_upload_bytes.unwrap_or(DEFAULT_MAX_UPLOAD_BYTES);
        if max_json_bytes == 0 {
            return Err(ctx.invalid("passthrough.max_json_bytes", "must be above zero".into()));
        }
        if max_upload_bytes == 0 {
            return Err(ctx.invalid("passthrough.max_upload_bytes", "must be above zero".into()));
        }
        Ok(PassthroughConfig {
            max_json_bytes,
            max_upload_bytes,
            allow_unlisted: self.allow_unlisted.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_zero_caps() {
        let ctx = Context::standalone();
        let c = RawPassthrough::default().validate(&ctx).unwrap();
        assert_eq!(c, PassthroughConfig::default());
        assert_eq!(c.max_upload_bytes, 104_857_600);
        let e = RawPassthrough {
            max_json_bytes: Some(0),
            ..RawPassthrough::default()
        }
        .validate(&ctx)
        .unwrap_err();
        assert!(e.to_string().contains("passthrough.max_json_bytes"), "{e}");
    }
}

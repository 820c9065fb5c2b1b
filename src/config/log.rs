//! `[log]`: the format of log lines and whether each request gets an access line.
//!
//! Invariant: the format is one the telemetry knows; `--log-format` (or its variable) wins over
//! the file.

use serde::Deserialize;

use super::context::{ConfigError, Context};

/// Default `log.format`: readable by a person at a terminal; log shippers that want fields set
/// `json`.
pub(crate) const DEFAULT_LOG_FORMAT: &str = "text";

/// Default [`LogConfig::access_log`]: one line per request is what an operator looks for first
/// when a client reports a problem.
pub(crate) const DEFAULT_ACCESS_LOG: bool = true;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub access_log: Option<bool>,
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One line per request at INFO level on target `access`.
    pub access_log: bool,
}

impl RawLog {
    /// Checks `[log]`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<LogConfig, ConfigError> {
        let format = ctx.overridable(
            |o| (&o.log_format, o.origins.log_format),
            self.format,
            "log.format",
            DEFAULT_LOG_FORMAT,
            |s| LogFormat::parse(s).ok_or_else(|| format!("`{s}`: expected text or json")),
        )?;
        Ok(LogConfig {
            format,
            access_log: self.access_log.unwrap_or(DEFAULT_ACCESS_LOG),
        })
    }
}

//! Command-line arguments and the start-up sequence the binary runs.
//!
//! Invariant: no flag takes the upstream key as a value; the key comes only from
//! `DIFY_API_KEY` or the key file named in the config.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{Config, ConfigError, Overrides, RawConfig};

/// A caching reverse proxy for Dify's workflow run-detail API.
#[derive(Debug, Parser)]
#[command(name = "dify-gateway", version, about)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "DIFY_GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the public listener [default: 127.0.0.1:8080].
    #[arg(long, env = "DIFY_GATEWAY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Upstream base URL [default: https://api.dify.ai/v1].
    #[arg(long, env = "DIFY_GATEWAY_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Log line format: text or json [default: text].
    #[arg(long, env = "DIFY_GATEWAY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Validate the configuration (and the key's presence), print a summary, and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl Cli {
    /// Loads the file (if any), applies flag overrides and validates against the process
    /// environment.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let raw = match &self.config {
            Some(p) => RawConfig::from_file(p)?,
            None => RawConfig::default(),
        };
        let overrides = Overrides {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            log_format: self.log_format.clone(),
        };
        raw.validate(&overrides, self.config.as_deref(), &|name| {
            std::env::var(name).ok()
        })
    }
}

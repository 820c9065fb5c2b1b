//! Command-line arguments and the start-up sequence the binary runs.
//!
//! Invariant: no flag takes the upstream key as a value; the key comes only from
//! `DIFY_API_KEY` or the key file named in the config.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use crate::config::{Config, ConfigError, Origins, Overrides, RawConfig};

/// Environment variables that stand in for flags.
const LISTEN_ENV: &str = "DIFY_GATEWAY_LISTEN";
const UPSTREAM_ENV: &str = "DIFY_GATEWAY_UPSTREAM";
const LOG_FORMAT_ENV: &str = "DIFY_GATEWAY_LOG_FORMAT";
const ADMIN_LISTEN_ENV: &str = "DIFY_GATEWAY_ADMIN_LISTEN";
const REDIS_URL_ENV: &str = "DIFY_GATEWAY_REDIS_URL";

/// A caching reverse proxy for Dify's workflow run-detail API.
#[derive(Debug, Parser)]
#[command(name = "dify-gateway", version, about)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "DIFY_GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the public listener: IP:PORT, HOST:PORT or :PORT (all interfaces)
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = LISTEN_ENV, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Upstream base URL [default: https://api.dify.ai/v1].
    #[arg(long, env = UPSTREAM_ENV, value_name = "URL")]
    pub upstream: Option<String>,
    /// Log line format: text or json [default: text].
    #[arg(long, env = LOG_FORMAT_ENV, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Address of the admin listener (metrics, readiness, purge) [default: 127.0.0.1:9090].
    #[arg(long, env = ADMIN_LISTEN_ENV, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Redis/Valkey URL of the shared tier (`redis://`, `rediss://`); overrides `shared.urls`.
    #[arg(long, env = REDIS_URL_ENV, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Validate the configuration (and the key's presence), print a summary, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Ask a running gateway's `/healthz` at ADDR and exit 0 when it answers 200 (for container
    /// health checks in images without a shell).
    #[arg(long, value_name = "ADDR", conflicts_with = "check_config")]
    pub health_probe: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Which of the values above came from a variable rather than a flag.
    #[arg(skip)]
    pub origins: Origins,
}

/// Subcommands (without one, the gateway serves).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a random client token; prints it once, with the `[[clients]]` entry to paste
    /// into the config (which stores only the token's SHA-256).
    GenToken {
        /// The client's name.
        #[arg(long)]
        client: String,
        /// The app the client may use.
        #[arg(long, default_value = crate::config::DEFAULT_APP)]
        app: String,
    },
    /// Try the gateway with no Dify account, key or network: serves it in front of a built-in
    /// mock Dify on loopback and prints what to try. Reads no configuration.
    #[cfg(feature = "mock")]
    Demo {
        /// Address of the gateway (loopback only).
        #[arg(long, value_name = "ADDR", default_value = crate::config::DEFAULT_LISTEN)]
        listen: String,
        /// Address of the admin side (loopback only).
        #[arg(long, value_name = "ADDR", default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: String,
        /// How long each mock run stays `running` before it ends.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
        running_for: std::time::Duration,
    },
}

/// Prints a new token and its config entry.
pub fn print_new_token(client: &str, app: &str) -> Result<(), String> {
    let token = crate::clients::generate_token().map_err(|e| format!("no randomness: {e}"))?;
    println!("token (give this to the client; it is not stored anywhere):\n  {token}\n");
    println!("config entry:\n");
    println!("[[clients]]");
    println!("name = {client:?}");
    println!(
        "token_sha256 = \"{}\"",
        crate::clients::token_sha256_hex(&token)
    );
    println!("app = {app:?}");
    println!("# rate_per_second = 20");
    println!("# burst = 40");
    Ok(())
}

/// One `GET /healthz` over plain TCP with a short deadline; true on a 200.
pub fn health_probe(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

impl Cli {
    /// Parses the process's arguments and environment, noting where each override came from.
    pub fn from_env() -> Cli {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.origins = origins(&matches);
        cli
    }

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
            admin_listen: self.admin_listen.clone(),
            redis_url: self.redis_url.clone(),
            origins: self.origins,
        };
        raw.validate(&overrides, self.config.as_deref(), &|name| {
            std::env::var(name).ok()
        })
    }
}

/// The flag's name, or the variable's when the value came from the environment.
fn origins(m: &ArgMatches) -> Origins {
    let flags = Origins::default();
    let pick = |id: &str, flag: &'static str, env: &'static str| {
        if m.value_source(id) == Some(ValueSource::EnvVariable) {
            env
        } else {
            flag
        }
    };
    Origins {
        listen: pick("listen", flags.listen, LISTEN_ENV),
        upstream: pick("upstream", flags.upstream, UPSTREAM_ENV),
        log_format: pick("log_format", flags.log_format, LOG_FORMAT_ENV),
        admin_listen: pick("admin_listen", flags.admin_listen, ADMIN_LISTEN_ENV),
        redis_url: pick("redis_url", flags.redis_url, REDIS_URL_ENV),
    }
}

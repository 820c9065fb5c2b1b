//! `[server]` and `[server.tls]`: the public listener and its connection deadlines.
//!
//! Invariant: every deadline of a served connection is above zero (keep-alive PINGs and TCP
//! keepalive may be turned off with `"0s"`), and TLS files exist when TLS is on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::context::{ConfigError, Context};
use super::values::{dur, parse_listen, HumanDuration};

/// The default listen address of the public side.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Default [`ServerConfig::header_read_timeout`]: a real client sends its first request within
/// a round trip or two of connecting (TLS included); ten seconds leaves room for slow mobile
/// links while a stalled socket gives its slot back quickly.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`ServerConfig::idle_timeout`]: above the 60 s idle timeout of common load balancers,
/// so the gateway is not the side that closes a pooled connection under a request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Default [`ServerConfig::max_response_time`]: far above any answer the gateway gives a read
/// (the upstream's total timeout with its retries, a queue wait, a long-poll of a minute), so
/// only a client that stops taking its answer meets it.
pub const DEFAULT_MAX_RESPONSE_TIME: Duration = Duration::from_secs(300);

/// Default [`ServerConfig::keep_alive_interval`]: finds a dead HTTP/2 peer within a minute
/// without noticeable traffic.
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Default [`ServerConfig::keep_alive_timeout`]: several round trips of even a poor mobile link.
/// It also bounds how long shutdown waits for an idle HTTP/2 client to acknowledge its GOAWAY.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`ServerConfig::tcp_keepalive`]: a peer that vanished without a FIN (a NAT or a
/// machine gone) is found in minutes, not the two hours of the kernel's default.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Default [`ServerConfig::max_header_bytes`]: twice the 8 KiB common proxies allow, room for
/// long bearer tokens and tracing headers, while a flood of huge heads stays cheap to refuse.
pub(crate) const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;

/// Smallest accepted [`ServerConfig::max_header_bytes`]: below 8 KiB ordinary browser and SDK
/// requests with a token would start getting 431.
pub(crate) const MIN_HEADER_BYTES: usize = 8192;

/// Largest accepted [`ServerConfig::max_header_bytes`]: a run-detail request never needs more,
/// and every connection may buffer this much.
pub(crate) const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// Default [`ServerConfig::max_connections`]: far more clients than one gateway's upstream slots
/// can serve at once, yet a bounded number of sockets and buffers.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default [`ServerConfig::drain_timeout`]: the 30 s Kubernetes waits by default after SIGTERM
/// before it kills a pod, and as long as one whole upstream fetch may take.
pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`TlsConfig::handshake_timeout`]: as long as the header read deadline, so TLS adds no
/// second way for a slow client to hold a slot.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shortest TCP keepalive: the kernel counts keepalive in whole seconds and refuses less.
pub(crate) const MIN_TCP_KEEPALIVE: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub header_read_timeout: Option<HumanDuration>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub drain_timeout: Option<HumanDuration>,
    pub idle_timeout: Option<HumanDuration>,
    pub max_response_time: Option<HumanDuration>,
    pub keep_alive_interval: Option<HumanDuration>,
    pub keep_alive_timeout: Option<HumanDuration>,
    pub tcp_keepalive: Option<HumanDuration>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub handshake_timeout: Option<HumanDuration>,
}

/// Settings of the public listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the public side listens.
    pub listen: SocketAddr,
    /// From the moment a connection is admitted, its first complete request head must arrive
    /// within this time — protocol sniff, TLS handshake, HTTP/1 head or HTTP/2 preface, SETTINGS
    /// and first HEADERS alike — or the connection is cut.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; beyond it the client gets 431.
    pub max_header_bytes: usize,
    /// Connections served at once. When all are taken, a newcomer gets the slot of the connection
    /// that has gone longest without a request in flight; when every one is busy, it waits.
    pub max_connections: usize,
    /// On SIGINT/SIGTERM, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// A served connection with no request in flight for this long is closed (HTTP/1 keep-alive
    /// or HTTP/2 with no open stream; a later HTTP/1 head must also be complete by then).
    pub idle_timeout: Duration,
    /// A connection with a request that has been in flight this long is closed: a client that
    /// stops reading its answer (an HTTP/2 flow-control window left at zero, an HTTP/1 socket
    /// never read) cannot keep its slot. Event streams are exempt; their own bounds
    /// (`[stream]`, `upstream.run_timeout`) end them.
    pub max_response_time: Duration,
    /// HTTP/2 PINGs are sent this often; `None` sends none.
    pub keep_alive_interval: Option<Duration>,
    /// A PING — a keep-alive one, or the one that follows a GOAWAY — must be answered within this
    /// or the connection is closed.
    pub keep_alive_timeout: Duration,
    /// TCP keepalive on accepted sockets: idle time before the first probe and between probes;
    /// `None` leaves it off.
    pub tcp_keepalive: Option<Duration>,
    /// Serve HTTPS with these files when set.
    pub tls: Option<TlsConfig>,
}

/// TLS on the public listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// A client must finish its TLS handshake within this time.
    pub handshake_timeout: Duration,
}

impl RawServer {
    /// Checks `[server]`; `--listen` (or its variable) wins over `server.listen`.
    pub(super) fn validate(self, ctx: &Context<'_>) -> Result<ServerConfig, ConfigError> {
        let listen = ctx.overridable(
            |o| (&o.listen, o.origins.listen),
            self.listen,
            "server.listen",
            DEFAULT_LISTEN,
            parse_listen,
        )?;
        let max_header_bytes = self.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&max_header_bytes) {
            return Err(ctx.invalid(
                "server.max_header_bytes",
                format!("{max_header_bytes} is outside {MIN_HEADER_BYTES}..={MAX_HEADER_BYTES}"),
            ));
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ctx.invalid("server.max_connections", "must be at least 1".into()));
        }
        let header_read_timeout = dur(self.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        let idle_timeout = dur(self.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let keep_alive_timeout = dur(self.keep_alive_timeout, DEFAULT_KEEP_ALIVE_TIMEOUT);
        let max_response_time = dur(self.max_response_time, DEFAULT_MAX_RESPONSE_TIME);
        for (key, d) in [
            ("server.max_response_time", max_response_time),
            ("server.header_read_timeout", header_read_timeout),
            ("server.idle_timeout", idle_timeout),
            ("server.keep_alive_timeout", keep_alive_timeout),
        ] {
            if d.is_zero() {
                return Err(ctx.invalid(key, "must be above zero".into()));
            }
        }
        let keep_alive_interval = dur(self.keep_alive_interval, DEFAULT_KEEP_ALIVE_INTERVAL);
        let tcp_keepalive = dur(self.tcp_keepalive, DEFAULT_TCP_KEEPALIVE);
        if !tcp_keepalive.is_zero() && tcp_keepalive < MIN_TCP_KEEPALIVE {
            return Err(ctx.invalid(
                "server.tcp_keepalive",
                "must be at least 1s, or \"0s\" to turn it off".into(),
            ));
        }
        Ok(ServerConfig {
            listen,
            header_read_timeout,
            max_header_bytes,
            max_connections,
            drain_timeout: dur(self.drain_timeout, DEFAULT_DRAIN_TIMEOUT),
            idle_timeout,
            max_response_time,
            keep_alive_interval: (!keep_alive_interval.is_zero()).then_some(keep_alive_interval),
            keep_alive_timeout,
            tcp_keepalive: (!tcp_keepalive.is_zero()).then_some(tcp_keepalive),
            tls: self.tls.map(|t| t.validate(ctx)).transpose()?,
        })
    }
}

impl RawTls {
    /// Checks `[server.tls]`: both files must exist now (they are loaded at start and on reload).
    fn validate(self, ctx: &Context<'_>) -> Result<TlsConfig, ConfigError> {
        for (key, path) in [
            ("server.tls.cert_file", &self.cert_file),
            ("server.tls.key_file", &self.key_file),
        ] {
            if !path.is_file() {
                return Err(ctx.invalid(key, format!("{} is not a readable file", path.display())));
            }
        }
        Ok(TlsConfig {
            cert_file: self.cert_file,
            key_file: self.key_file,
            handshake_timeout: dur(self.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::admin::DEFAULT_ADMIN_MAX_CONNECTIONS;
    use crate::config::tests::key_env;
    use crate::config::{Overrides, RawConfig};

    #[test]
    fn overrides_win_over_file() {
        let raw = RawConfig::from_toml("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let c = raw
            .validate(
                &Overrides {
                    listen: Some("127.0.0.1:2".into()),
                    ..Overrides::default()
                },
                None,
                &key_env,
            )
            .unwrap();
        assert_eq!(c.server.listen.port(), 2);
    }

    #[test]
    fn connection_deadlines_have_defaults_and_are_checked() {
        let c = RawConfig::default()
            .validate(&Overrides::default(), None, &key_env)
            .unwrap();
        assert_eq!(c.server.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(c.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(
            c.server.keep_alive_interval,
            Some(DEFAULT_KEEP_ALIVE_INTERVAL)
        );
        assert_eq!(c.server.keep_alive_timeout, DEFAULT_KEEP_ALIVE_TIMEOUT);
        assert_eq!(c.server.tcp_keepalive, Some(DEFAULT_TCP_KEEPALIVE));
        assert_eq!(c.admin.max_connections, DEFAULT_ADMIN_MAX_CONNECTIONS);
        let off = RawConfig::from_toml(
            "[server]\nkeep_alive_interval = \"0s\"\ntcp_keepalive = \"0s\"\n",
        )
        .unwrap()
        .validate(&Overrides::default(), None, &key_env)
        .unwrap();
        assert_eq!(off.server.keep_alive_interval, None);
        assert_eq!(off.server.tcp_keepalive, None);
        for (toml, key) in [
            ("[server]\nidle_timeout = \"0s\"\n", "server.idle_timeout"),
            (
                "[server]\nkeep_alive_timeout = \"0s\"\n",
                "server.keep_alive_timeout",
            ),
            (
                "[server]\nheader_read_timeout = \"0s\"\n",
                "server.header_read_timeout",
            ),
            (
                "[server]\ntcp_keepalive = \"500ms\"\n",
                "server.tcp_keepalive",
            ),
            ("[admin]\nmax_connections = 0\n", "admin.max_connections"),
        ] {
            let e = RawConfig::from_toml(toml)
                .unwrap()
                .validate(&Overrides::default(), None, &key_env)
                .unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }
}

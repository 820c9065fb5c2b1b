//! The connections to Redis: one multiplexed command connection (standalone or cluster) and the
//! clients the notification subscriber connects with.
//!
//! Invariant: opening never waits for Redis and never fails because Redis is down — connections
//! are made lazily and re-made in the background — so the gateway starts and serves without it.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterConfig;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::{Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use crate::config::SharedConfig;

/// The Redis client refused to set up connections from validated settings (validation already
/// refuses the URLs it cannot use, so this is not expected). `key` is the TOML key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for `{key}`: {message}")]
pub struct SharedConfigError {
    /// The TOML key at fault.
    pub key: &'static str,
    /// What is wrong; never contains a password.
    pub message: String,
}

/// Longest pause between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// First pause after a failed connection attempt; doubles up to [`MAX_RECONNECT_DELAY`].
const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(50);
/// Attempts in one reconnection round; the next call after a failed round starts another.
const RECONNECT_ATTEMPTS: usize = 4;
/// Unacknowledged data older than this kills the TCP connection (Linux `TCP_USER_TIMEOUT`), so
/// a silently dropped path (no RST) is noticed and re-made instead of timing out forever.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP options for every connection: no Nagle delay, keepalive probes, a user timeout.
fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(TCP_USER_TIMEOUT)
}

/// Connection details for each configured URL. Errors name the entry, never the URL.
pub(crate) fn connection_infos(
    cfg: &SharedConfig,
) -> Result<Vec<ConnectionInfo>, SharedConfigError> {
    cfg.urls
        .iter()
        .enumerate()
        .map(|(i, u)| {
            u.as_str()
                .into_connection_info()
                .map(|info| info.set_tcp_settings(tcp_settings()))
                .map_err(|_| SharedConfigError {
                    key: "shared.urls",
                    message: format!("entry {i} is not a usable Redis URL"),
                })
        })
        .collect()
}

/// A command connection, standalone or cluster. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One server, through a connection manager that reconnects by itself.
    Single(ConnectionManager),
    /// A cluster, routed by hash slot; reconnects to nodes and refreshes slots by itself.
    Cluster(ClusterConnection),
}

/// Where one SCAN must run to see every key.
pub(crate) enum ScanTarget {
    /// The one server of a standalone set-up.
    Server,
    /// One cluster primary, by address.
    Node { host: String, port: u16 },
}

impl Conn {
    /// Prepares the connection without contacting Redis. Must run inside a Tokio runtime.
    pub(crate) fn open(cfg: &SharedConfig) -> Result<Conn, SharedConfigError> {
        let infos = connection_infos(cfg)?;
        let setup_error = |what: &str| SharedConfigError {
            key: "shared.urls",
            message: format!("cannot set up the {what} client"),
        };
        if cfg.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(infos)
                .connection_timeout(cfg.connect_timeout)
                .response_timeout(cfg.connect_timeout.max(cfg.timeout))
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(MAX_RECONNECT_DELAY.as_millis() as u64)
                .tcp_settings(tcp_settings())
                .build()
                .map_err(|_| setup_error("cluster"))?;
            let config = ClusterConfig::new()
                .set_connection_timeout(cfg.connect_timeout)
                .set_response_timeout(cfg.connect_timeout.max(cfg.timeout));
            Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(config),
            ))
        } else {
            let info = infos
                .into_iter()
                .next()
                .ok_or_else(|| setup_error("standalone"))?;
            let client = Client::open(info).map_err(|_| setup_error("standalone"))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.connect_timeout))
                .set_min_delay(MIN_RECONNECT_DELAY)
                .set_max_delay(MAX_RECONNECT_DELAY)
                .set_number_of_retries(RECONNECT_ATTEMPTS);
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|_| setup_error("standalone"))?;
            Ok(Conn::Single(manager))
        }
    }

    /// The places a SCAN must visit: the server, or every cluster primary.
    pub(crate) async fn scan_targets(&mut self) -> redis::RedisResult<Vec<ScanTarget>> {
        match self {
            Conn::Single(_) => Ok(vec![ScanTarget::Server]),
            Conn::Cluster(c) => {
                let slots = c
                    .route_command(
                        redis::cmd("CLUSTER").arg("SLOTS").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                Ok(primaries(&slots)
                    .into_iter()
                    .map(|(host, port)| ScanTarget::Node { host, port })
                    .collect())
            }
        }
    }

    /// Runs `cmd` on one SCAN target.
    pub(crate) async fn query_on(
        &mut self,
        target: &ScanTarget,
        cmd: &Cmd,
    ) -> redis::RedisResult<Value> {
        match (self, target) {
            (Conn::Cluster(c), ScanTarget::Node { host, port }) => {
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                c.route_command(cmd.clone(), RoutingInfo::SingleNode(route))
                    .await
            }
            (conn, _) => conn.req_packed_command(cmd).await,
        }
    }
}

/// The distinct primaries in a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id], …], …]`.
fn primaries(reply: &Value) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = reply else {
        return out;
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let Some(Value::Array(node)) = fields.get(2) else {
            continue;
        };
        let host = match node.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = node.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !out.iter().any(|(h, p)| *h == host && *p == port) {
            out.push((host, port));
        }
    }
    out
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Clients for the notification subscriber, one per URL, tried in turn. Any cluster node will
/// do: classic PUBLISH reaches subscribers on every node.
pub(crate) fn pubsub_clients(cfg: &SharedConfig) -> Result<Vec<Client>, SharedConfigError> {
    connection_infos(cfg)?
        .into_iter()
        .map(|info| {
            Client::open(info).map_err(|_| SharedConfigError {
                key: "shared.urls",
                message: "cannot set up the notification client".into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn primaries_are_read_from_cluster_slots() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(12000),
                node("10.0.0.1", 7000),
            ]),
            Value::Array(vec![Value::Int(12001), Value::Int(16383)]),
        ]);
        assert_eq!(
            primaries(&reply),
            vec![("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
        assert!(primaries(&Value::Nil).is_empty());
    }
}

//! A gateway started in this process on loopback, in front of one upstream, for the examples
//! that measure it. It runs until the process ends; no probes, so every upstream request seen
//! is the workload's.

use std::net::SocketAddr;

use dify_gateway::config::{Overrides, RawConfig, API_KEY_ENV};
use dify_gateway::{Listeners, RunOptions};
use tokio::net::TcpListener;

/// Starts a gateway with `toml` in front of `upstream` (its base URL) using `key`; returns the
/// public address.
pub async fn gateway(upstream: &str, key: &str, toml: &str) -> SocketAddr {
    let key = key.to_owned();
    let config = RawConfig::from_toml(toml)
        .expect("toml")
        .validate(
            &Overrides {
                upstream: Some(upstream.to_owned()),
                ..Overrides::default()
            },
            None,
            &move |n| (n == API_KEY_ENV).then(|| key.clone()),
        )
        .expect("config");
    let bind = || TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        public: bind().await.expect("bind"),
        admin: bind().await.expect("bind"),
    };
    let addr = listeners.public.local_addr().expect("addr");
    let options = RunOptions {
        access_log: None,
        reload: None,
        probes: false,
    };
    tokio::spawn(dify_gateway::run(
        listeners,
        config,
        options,
        std::future::pending(),
    ));
    addr
}

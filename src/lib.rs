//! dify-gateway: a caching reverse proxy for Dify's workflow run-detail API.
//!
//! The binary is a thin shell over this library: [`cli`] parses arguments, [`config`] validates
//! them, [`gateway::Gateway`] answers requests and [`server::run`] serves it on a listener.

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cache;
pub mod cli;
pub mod clients;
pub mod config;
mod connections;
pub mod demo;
pub mod error;
pub mod flight;
pub mod gateway;
pub mod intake;
pub mod metrics;
pub mod mock;
pub mod outcome;
pub mod policy;
pub mod readiness;
pub mod reload;
pub mod request_id;
pub mod rewrite;
pub mod routes;
pub mod run_id;
pub mod server;
pub mod shared;
pub mod sse;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use gateway::Gateway;

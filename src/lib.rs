//! dify-gateway: a caching reverse proxy for Dify's workflow run-detail API.
//!
//! The binary is a thin shell over this library: [`cli`] parses arguments, [`config`] validates
//! them, and [`run()`] serves them on the listeners the caller bound until the caller says stop;
//! the integration tests call the same [`run()`] (or its two steps, [`Prepared`]).

pub mod access_log;
mod admin;
mod body;
pub mod cache;
pub mod cli;
pub mod clients;
pub mod config;
mod connections;
mod deadlines;
#[cfg(feature = "mock")]
pub mod demo;
mod error;
mod flight;
mod gateway;
pub mod idempotency;
pub mod intake;
pub mod metrics;
#[cfg(feature = "mock")]
pub mod mock;
mod outcome;
pub mod ownership;
pub mod passthrough;
pub mod policy;
mod readiness;
pub mod reload;
mod request_id;
pub mod rewrite;
mod routes;
mod run;
pub mod run_id;
pub mod server;
pub mod shared;
pub mod sse;
pub mod starts;
mod status;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod usage;
mod watch;
pub mod webhooks;

pub use config::Config;
pub use gateway::Gateway;
pub use run::{run, warn_if_exposed, Listeners, Prepared, Reload, RunError, RunOptions};

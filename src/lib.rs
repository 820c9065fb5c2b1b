//! dify-gateway: a caching reverse proxy for Dify's workflow run-detail API.
//!
//! The binary is a thin shell over this library: [`cli`] parses arguments, [`config`] validates
//! them, [`gateway::Gateway`] answers requests and [`server::run`] serves it on a listener.

pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod flight;
pub mod gateway;
pub mod mock;
pub mod outcome;
pub mod policy;
pub mod run_id;
pub mod server;
pub mod shared;
pub mod telemetry;
pub mod upstream;

pub use config::Config;
pub use gateway::Gateway;

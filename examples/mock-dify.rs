//! A mock Dify to try the gateway without a Dify account.
//!
//! Serves `GET /v1/workflows/run/{id}` for any UUID: the run is `running` for a few seconds after
//! it is first asked for, then `succeeded` (or `failed` / `partial-succeeded` for some ids), with
//! Dify's body layout and error bodies. It expects the key in `DIFY_API_KEY`.
//!
//! ```text
//! DIFY_API_KEY=app-demo cargo run --example mock-dify -- 127.0.0.1:5001 5
//! ```

use std::time::Duration;

use dify_gateway::mock::{AutoRuns, MockDify};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:5001".into());
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let key = std::env::var("DIFY_API_KEY").unwrap_or_else(|_| "app-demo".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let mock = MockDify::serve(
        listener,
        &key,
        Some(AutoRuns {
            running_for: Duration::from_secs(secs),
            output_bytes: 1024,
        }),
    );
    println!(
        "mock Dify on {} (runs finish {secs}s after their first request)",
        mock.base_url()
    );
    tokio::signal::ctrl_c().await?;
    println!("served {} requests", mock.total());
    Ok(())
}

//! A mock Dify to try the gateway without a Dify account.
//!
//! Serves `GET /v1/workflows/run/{id}` for any UUID: the run is `running` for a few seconds after
//! it is first asked for, then `succeeded` (or `failed` / `partial-succeeded` for some ids), with
//! Dify's body layout and error bodies. It also serves the rest of the Workflow App API (run
//! starts, blocking and streamed, stop, stream resume, logs, files, the app's descriptions; see
//! `dify_gateway::mock`). It expects the key in `DIFY_API_KEY`.
//!
//! ```text
//! DIFY_API_KEY=app-demo cargo run --example mock-dify -- 127.0.0.1:5001 5
//! ```
//!
//! Options after the two positional arguments, for the benchmarks (`benches/e2e.sh`):
//!
//! - `--output-bytes N`: about N bytes of output text per run body (default 1024);
//! - `--delay-ms N`: every answer waits N ms first, like a slow Dify (default 0);
//! - `--event-delay-ms N`: a started run waits N ms before each of its events (default 0);
//! - `--chunks N`: a started run streams N text chunks (default 3);
//! - `--upload-limit N`: file parts over N bytes are refused with Dify's 413 (default 15 MiB);
//! - `--stats ADDR`: a second listener that answers any connection with the number of requests
//!   served so far, so a script can count upstream requests without stopping the mock.

use std::time::Duration;

use dify_gateway::mock::{AutoRuns, MockDify, RunScript};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Output text per run body when `--output-bytes` is not given.
const DEFAULT_OUTPUT_BYTES: usize = 1024;

/// Command line: `ADDR SECS [--output-bytes N] [--delay-ms N] [--event-delay-ms N] [--chunks N]
/// [--upload-limit N] [--stats ADDR]`.
struct Args {
    /// Where the mock listens.
    addr: String,
    /// How long a run stays `running` after its first request.
    running_secs: u64,
    /// About how many bytes of output text each run body carries.
    output_bytes: usize,
    /// Delay before every answer.
    delay: Duration,
    /// Delay before each event of a started run.
    event_delay: Duration,
    /// Text chunks per started run.
    chunks: Option<usize>,
    /// Largest file part accepted.
    upload_limit: Option<u64>,
    /// Where the request counter is served, if anywhere.
    stats: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut args = Args {
        addr: "127.0.0.1:5001".into(),
        running_secs: 5,
        output_bytes: DEFAULT_OUTPUT_BYTES,
        delay: Duration::ZERO,
        event_delay: Duration::ZERO,
        chunks: None,
        upload_limit: None,
        stats: None,
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--output-bytes" => {
                args.output_bytes = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?;
            }
            "--delay-ms" => {
                let ms: u64 = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?;
                args.delay = Duration::from_millis(ms);
            }
            "--event-delay-ms" => {
                let ms: u64 = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?;
                args.event_delay = Duration::from_millis(ms);
            }
            "--chunks" => {
                args.chunks = Some(value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?);
            }
            "--upload-limit" => {
                args.upload_limit = Some(value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?);
            }
            "--stats" => args.stats = Some(value(&a)?),
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ => positional.push(a),
        }
    }
    let mut positional = positional.into_iter();
    if let Some(addr) = positional.next() {
        args.addr = addr;
    }
    if let Some(secs) = positional.next() {
        args.running_secs = secs.parse().map_err(|e| format!("SECS: {e}"))?;
    }
    Ok(args)
}

/// Answers every connection on `listener` with the mock's request count, then closes it.
async fn serve_stats(listener: TcpListener, mock: MockDify) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let body = format!("{}\n", mock.total());
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mock-dify: {e}");
            eprintln!(
                "usage: mock-dify ADDR SECS [--output-bytes N] [--delay-ms N] [--event-delay-ms N] [--chunks N] [--upload-limit N] [--stats ADDR]"
            );
            std::process::exit(2);
        }
    };
    let key = std::env::var("DIFY_API_KEY").unwrap_or_else(|_| "app-demo".into());
    let listener = TcpListener::bind(&args.addr).await?;
    let mock = MockDify::serve(
        listener,
        &key,
        Some(AutoRuns {
            running_for: Duration::from_secs(args.running_secs),
            output_bytes: args.output_bytes,
        }),
    );
    mock.set_delay(args.delay);
    mock.set_event_delay(args.event_delay);
    if let Some(n) = args.chunks {
        mock.set_run_script(RunScript::chunks(n));
    }
    if let Some(n) = args.upload_limit {
        mock.set_upload_limit(n);
    }
    if let Some(stats) = &args.stats {
        let l = TcpListener::bind(stats).await?;
        tokio::spawn(serve_stats(l, mock.clone()));
    }
    println!(
        "mock Dify on {} (runs finish {}s after their first request)",
        mock.base_url(),
        args.running_secs
    );
    tokio::signal::ctrl_c().await?;
    println!("served {} requests", mock.total());
    Ok(())
}

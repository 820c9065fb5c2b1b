//! Logging set-up.
//!
//! Invariant: log lines are written by a background thread through a non-blocking writer, so a
//! request never waits on stdout, and reach stdout in batches at most [`FLUSH_EVERY`] late;
//! nothing the gateway logs carries the upstream key.

use std::io::{self, BufWriter, Stdout, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Longest time a written line waits in the buffer before it reaches stdout.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

type Shared = Arc<Mutex<BufWriter<Stdout>>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, BufWriter<Stdout>> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// stdout behind a 64 KiB buffer that a ticker thread flushes every [`FLUSH_EVERY`].
///
/// The appender's worker flushes its writer whenever its queue runs empty — under steady load
/// that is after nearly every line, one `write(2)` per request. Here its flushes are no-ops and
/// the ticker (or a full buffer, or the worker's exit) writes the batch instead.
struct BatchedStdout {
    shared: Shared,
}

impl Write for BatchedStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.shared).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BatchedStdout {
    fn drop(&mut self) {
        // The worker drops its writer when the guard is dropped at exit: write what is left.
        let _ = lock(&self.shared).flush();
    }
}

/// Installs the global subscriber. Keep the guard alive until exit so buffered lines are flushed.
pub fn init(format: LogFormat) -> WorkerGuard {
    let shared: Shared = Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        io::stdout(),
    )));
    let ticker = Arc::downgrade(&shared);
    // Ends by itself once the writer is gone.
    let _ = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(move || loop {
            std::thread::sleep(FLUSH_EVERY);
            match ticker.upgrade() {
                Some(s) => {
                    let _ = lock(&s).flush();
                }
                None => return,
            }
        });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(BatchedStdout { shared });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

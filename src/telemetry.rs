//! Logging set-up.
//!
//! Invariant: log lines reach stdout only from background threads — tracing's through a
//! non-blocking writer into a shared buffer, access lines through [`AccessLog`]'s batch — so a
//! request never waits on stdout; the log thread writes both out at most [`FLUSH_EVERY`] late;
//! nothing the gateway logs carries the upstream key.

use std::io::{self, BufWriter, Stdout, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::access_log::AccessLog;
use crate::config::LogFormat;

/// Longest time a written line waits in the buffer before it reaches stdout.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

type Shared = Arc<Mutex<BufWriter<Stdout>>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, BufWriter<Stdout>> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// stdout behind a 64 KiB buffer that the log thread flushes every [`FLUSH_EVERY`].
///
/// The appender's worker flushes its writer whenever its queue runs empty — under steady load
/// that is after nearly every line, one `write(2)` per request. Here its flushes are no-ops and
/// the log thread (or a full buffer, or the worker's exit) writes the batch instead.
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

/// What [`init`] set up. Keep it alive until exit: dropping it writes what is still buffered.
pub struct Telemetry {
    /// The access log, when `RUST_LOG` lets target `access` log at INFO (and the log thread
    /// started).
    pub access: Option<Arc<AccessLog>>,
    /// Flushes tracing's queued lines into the shared buffer when dropped.
    appender: Option<WorkerGuard>,
    /// The log thread, joined on drop after its last batch.
    writer: Option<std::thread::JoinHandle<()>>,
    /// The access log the writer thread drains (also when `access` is filtered out).
    drained: Arc<AccessLog>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // The log thread writes the last access batch (and may log a warning about dropped
        // lines); then the appender's worker writes its queued lines, the warning among them,
        // and its writer flushes them to stdout as it is dropped.
        self.drained.close();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        drop(self.appender.take());
    }
}

/// Installs the global subscriber and starts the thread that writes log batches to stdout.
pub fn init(format: LogFormat) -> Telemetry {
    let shared: Shared = Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        io::stdout(),
    )));
    let access = Arc::new(AccessLog::new(format));
    let writer = {
        let (shared, access) = (Arc::clone(&shared), Arc::clone(&access));
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_batches(&shared, &access))
            .ok()
    };
    let (appender, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(BatchedStdout { shared });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(appender)
        .with_ansi(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    // Without the log thread nothing would drain the access log: leave it off.
    let enabled = writer.is_some() && tracing::enabled!(target: "access", tracing::Level::INFO);
    Telemetry {
        access: enabled.then(|| Arc::clone(&access)),
        appender: Some(guard),
        writer,
        drained: access,
    }
}

/// The log thread: every [`FLUSH_EVERY`], or sooner when the access log has a full batch, writes
/// the access batch and the tracing lines buffered so far to stdout; returns once the access
/// log is closed and its last batch written.
fn write_batches(shared: &Shared, access: &AccessLog) {
    let mut batch = Vec::new();
    loop {
        let last = access.is_closing();
        access.take(&mut batch, FLUSH_EVERY);
        {
            let mut out = lock(shared);
            let _ = out.write_all(&batch);
            let _ = out.flush();
        }
        batch.clear();
        let dropped = access.take_dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "access log lines dropped: stdout is not keeping up"
            );
        }
        if last {
            return;
        }
    }
}

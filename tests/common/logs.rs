//! Log lines written during a test, captured by the process-wide `tracing` subscriber (so one
//! test per binary that installs it).
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Collects every log line written.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Installs the global subscriber at `level`, in plain text, writing here.
    pub fn install(level: tracing::Level) -> Captured {
        let logs = Captured::default();
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .init();
        logs
    }

    /// The first line holding every one of `words`.
    pub fn line_with(&self, words: &[&str]) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .map(str::to_owned)
    }
}

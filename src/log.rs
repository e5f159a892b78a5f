//! Log output that never takes a request (or the process) down.
//!
//! Lines go to stderr through a bounded queue drained by one thread
//! (tracing-appender's non-blocking writer, lossy): a request never waits
//! for the log destination. A line the destination refuses (a full disk, a
//! closed pipe, `/dev/full`) or that finds the queue full is dropped and
//! counted in `keyward_log_lines_dropped_total`, never retried, never a
//! panic. The audit trail is these lines, so it shares their guarantee: best
//! effort, with every loss counted; the store, not the log, is the record of
//! what changed.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines held for the writer thread before new ones are dropped.
const QUEUED_LINES: usize = 16_384;

/// Lines the destination refused.
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// The queue's own count of lines dropped while it was full.
static QUEUE_FULL: OnceLock<ErrorCounter> = OnceLock::new();

/// Lines dropped so far, for whatever reason.
#[must_use]
pub fn dropped_lines() -> u64 {
    let full = QUEUE_FULL
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64);
    REFUSED.load(Ordering::Relaxed) + full
}

/// Installs the global subscriber: `RUST_LOG` (default `info`), in
/// `format`. Keep the guard until exit: dropping it writes what is queued.
pub fn init(format: LogFormat) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("keyward-log")
        .finish(Destination(std::io::stderr()));
    let _ = QUEUE_FULL.set(writer.error_counter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(writer)
        // tracing-subscriber reports its own write failures with
        // `eprintln!`, which panics when stderr is what failed.
        .log_internal_errors(false);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// Colour only on a terminal, and not when `NO_COLOR` is set to anything
/// (no-color.org): a file, a pipe, `kubectl logs` or a log collector gets
/// plain text.
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// The real destination: a write it refuses counts one dropped line and
/// reports success, so nothing above it retries, blocks or panics (the
/// writer thread `eprintln!`s a failed flush).
struct Destination<W>(W);

impl<W: Write> Write for Destination<W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if self.0.write_all(line).is_err() {
            REFUSED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn a_refused_line_is_counted_not_returned() {
        let before = REFUSED.load(Ordering::Relaxed);
        let mut full = Destination(std::io::Cursor::new([0u8; 4]));
        assert_eq!(full.write(b"0123456789\n").expect("never an error"), 11);
        assert!(full.flush().is_ok());
        assert_eq!(REFUSED.load(Ordering::Relaxed), before + 1);
    }
}

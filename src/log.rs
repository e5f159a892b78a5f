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
//!
//! In the human format every value is written so that it cannot pass for
//! another field or another line ([`EscapedFields`]): text values are
//! quoted and escaped, numbers and booleans are bare. A key name or an
//! error is text a caller chose; written bare, `x" operation=delete` and a
//! U+2028 would forge a field and a line in the audit trail. The JSON
//! format escapes by construction.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// How logs are written (`--log-format`). Here rather than in `config`,
/// so logging depends on nothing above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

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
        LogFormat::Human => builder.fmt_fields(EscapedFields).init(),
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

/// Formats an event's (or span's) fields for the human format as
/// `name="text"` or `name=123`: every text value (strings, `%` and `?`
/// values, errors) is quoted and escaped by [`Escaper`], so no value can
/// close its quotes, start a field, or start a line. The message, written
/// first and bare as usual, is escaped the same way but not quoted.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> MakeVisitor<Writer<'w>> for EscapedFields {
    type Visitor = EscapingVisitor<'w>;

    fn make_visitor(&self, target: Writer<'w>) -> Self::Visitor {
        EscapingVisitor {
            writer: target,
            delimit: false,
            result: Ok(()),
        }
    }
}

/// Writes one event's fields; see [`EscapedFields`].
#[derive(Debug)]
pub struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    /// Whether a field was written already (so the next needs a space).
    delimit: bool,
    result: std::fmt::Result,
}

impl EscapingVisitor<'_> {
    /// Writes the separator and, but for the message, `name=`.
    fn start(&mut self, field: &Field) -> std::fmt::Result {
        if std::mem::replace(&mut self.delimit, true) {
            self.writer.write_char(' ')?;
        }
        if field.name() == "message" {
            return Ok(());
        }
        write!(self.writer, "{}=", field.name())
    }

    /// A text value: quoted and escaped (the message: escaped only).
    fn text(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let quoted = field.name() != "message";
        self.result = self.start(field).and_then(|()| {
            let mut escaper = Escaper {
                out: &mut self.writer,
                quoted,
            };
            if quoted {
                escaper.out.write_char('"')?;
            }
            escaper.write_fmt(value)?;
            if quoted {
                escaper.out.write_char('"')?;
            }
            Ok(())
        });
    }

    /// A number or a boolean: nothing in it to escape.
    fn bare(&mut self, field: &Field, value: &dyn std::fmt::Display) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .start(field)
            .and_then(|()| write!(self.writer, "{value}"));
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.bare(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field, &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field, &value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.bare(field, &value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.bare(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, &value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, format_args!("{value}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.text(field, format_args!("{value:?}"));
    }
}

impl VisitOutput<std::fmt::Result> for EscapingVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapingVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.writer
    }
}

/// Passes text through, escaping (as `char::escape_debug` writes them)
/// every character that could end a line or disguise what follows
/// ([`hazardous`]) and, in a quoted value, `"` and `\`.
struct Escaper<'a, W: ?Sized> {
    out: &'a mut W,
    quoted: bool,
}

impl<W: std::fmt::Write + ?Sized> std::fmt::Write for Escaper<'_, W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        for c in text.chars() {
            if hazardous(c) || (self.quoted && matches!(c, '"' | '\\')) {
                write!(self.out, "{}", c.escape_debug())?;
            } else {
                self.out.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Whether `c` may not appear raw in a log line: C0/C1 controls (line
/// feeds, U+0085 NEXT LINE, escape), the line and paragraph separators
/// (U+2028, U+2029), bidirectional controls (U+061C, U+200E, U+200F,
/// U+202A–U+202E, U+2066–U+2069), and whatever else `char::escape_debug`
/// would escape (other format characters, unassigned and private-use code
/// points, combining marks standing where they could attach to a quote).
fn hazardous(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
        || (!matches!(c, '"' | '\'' | '\\') && c.escape_debug().len() > 1)
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

    /// Every character the review named, and the quote, come out escaped;
    /// ordinary text in any script stays as it is.
    #[test]
    fn hazardous_characters_are_escaped() {
        for c in [
            '\n', '\r', '\u{0}', '\u{1b}', '\u{85}', '\u{2028}', '\u{2029}', '\u{202a}',
            '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}',
            '\u{2069}', '\u{200b}', '\u{200e}', '\u{feff}',
        ] {
            assert!(hazardous(c), "{c:?}");
        }
        for c in ['a', ' ', '=', '\'', 'é', '日', 'ж', '"', '\\'] {
            assert!(!hazardous(c), "{c:?}");
        }
        let mut out = String::new();
        Escaper {
            out: &mut out,
            quoted: true,
        }
        .write_str("x\" operation=delete\u{2028} INFO \\ \u{202e}é")
        .expect("a string takes any write");
        assert_eq!(out, r#"x\" operation=delete\u{2028} INFO \\ \u{202e}é"#);
    }

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

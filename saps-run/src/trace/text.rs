//! The text format: one line per call exactly as `strace -f -T` prints it
//! (issue 6), then an optional SAPS annotation line.
//!
//! The line layout copied from strace 6.1: an optional pid prefix
//! (`[pid  N] ` on a terminal, `N     ` in a `-o` file), an optional `-tt`
//! time, `name(args)`, padding so that `= ` starts at column 40, the result
//! (`-1 ECONNREFUSED (Connection refused)`), and `<seconds>`. The
//! annotation line starts with two spaces and `# saps:`, which strace never
//! prints, so tools that parse strace output can skip it.

use super::decode::{Decoded, Outcome};
use saps_interceptor::notify::Reply;
use saps_interceptor::supervisor::CallRecord;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// strace's `acolumn`: the result starts at this column when it can.
const RESULT_COLUMN: usize = 40;

/// The pid prefix of a line (strace -f).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefix {
    None,
    /// `[pid  1234] `: on standard error, for a process other than the first.
    Bracketed,
    /// `1234  `: in a single `-o` file, on every line.
    Plain,
}

/// Everything but the pid prefix that shapes a line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    pub timestamps: bool,
    pub annotate: bool,
}

/// The call's line (and annotation line), each ending in `\n`.
pub(crate) fn format(call: &CallRecord, d: &Decoded, prefix: Prefix, style: Style) -> String {
    let mut s = String::with_capacity(160);
    match prefix {
        Prefix::None => {}
        Prefix::Bracketed => {
            let _ = write!(s, "[pid {:5}] ", call.pid);
        }
        Prefix::Plain => {
            let _ = write!(s, "{:<5} ", call.pid);
        }
    }
    if style.timestamps {
        s.push_str(&clock(call.start));
        s.push(' ');
    }
    let _ = write!(s, "{}({})", d.name, d.args.join(", "));
    while s.len() < RESULT_COLUMN - 1 {
        s.push(' ');
    }
    s.push_str(" = ");
    match &d.outcome {
        Outcome::Value(v) => {
            let _ = write!(s, "{v}");
        }
        Outcome::Error { name, message, .. } => {
            let _ = write!(s, "-1 {name} ({message})");
        }
        Outcome::Native if style.annotate => s.push_str("? (native)"),
        Outcome::Native => s.push('?'),
    }
    let _ = writeln!(s, " <{}>", seconds(call.duration));
    if style.annotate {
        s.push_str(&annotation(call));
    }
    s
}

/// `  # saps: inode=123456 conn=7 virtual group=0.0.0.0:80 io-server=embedded
/// node=web1` (absent parts left out).
fn annotation(call: &CallRecord) -> String {
    let mut s = String::from("  # saps:");
    if let Some(ino) = call.note.inode {
        let _ = write!(s, " inode={ino}");
    }
    if let Some(conn) = call.note.conn {
        let _ = write!(s, " conn={conn}");
    }
    let action = match call.note.action {
        "" if matches!(call.result, Reply::Continue) => "native",
        a => a,
    };
    if !action.is_empty() {
        let _ = write!(s, " {action}");
    }
    if let Some(g) = call.note.group {
        let _ = write!(s, " group={g}");
    }
    if let (Some(io), Some(node)) = (&call.note.io_server, &call.note.node) {
        let _ = write!(s, " io-server={io} node={node}");
    }
    s.push('\n');
    s
}

/// `0.000213`: seconds with microseconds, as in `<…>` and `strace -c`.
pub(crate) fn seconds(d: Duration) -> String {
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

/// `HH:MM:SS.uuuuuu` in UTC (strace -tt uses the local time zone; saps-run
/// prints UTC, which is the same on hosts running with `TZ=UTC`).
fn clock(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let day_secs = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since.subsec_micros()
    )
}

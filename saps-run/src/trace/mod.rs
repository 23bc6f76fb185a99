//! `saps-run --trace`: strace-style output of the trapped socket calls
//! (issue 6; DESIGN.md "Interfaces"). The supervisor hands one
//! [`CallRecord`] per serviced call to [`TraceWriter::record`]; the writer
//! filters it, formats it and writes it where `-o`/`--ff` say.
//!
//! * `decode.rs` — arguments and results in strace's notation.
//! * `text.rs` — the `strace -f -T` line and the `# saps:` annotation.
//! * `json.rs` — one JSON object per line.
//! * `summary.rs` — the `-c` table.
//! * `filter.rs` — `-e trace=…`.
//!
//! Only connection management traps, never the data path, so tracing adds
//! one format and one `write` per trapped call and nothing per byte.
//! The formats are documented in `docs/trace.md`.

mod decode;
mod filter;
mod json;
mod summary;
mod text;

pub use filter::TraceFilter;

use saps_interceptor::supervisor::{CallRecord, Tracer};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use text::{Prefix, Style};

/// `--trace-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceFormat {
    /// strace's notation.
    Text,
    /// One JSON object per line.
    Json,
}

/// What `--trace` prints and where.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub format: TraceFormat,
    /// `-o FILE` (default: standard error).
    pub output: Option<PathBuf>,
    /// `--ff`: one file per process, `FILE.PID`.
    pub per_pid: bool,
    /// `-e trace=…` (default: every trapped call).
    pub filter: Option<TraceFilter>,
    /// `--tt`: `HH:MM:SS.uuuuuu` before each line.
    pub timestamps: bool,
    /// The `# saps:` lines (off: pure strace output).
    pub annotate: bool,
    /// `-c`: the summary table on [`TraceWriter::finish`].
    pub summary: bool,
}

/// Where lines go.
enum Sink {
    Stderr,
    File(File),
    PerPid {
        base: PathBuf,
        files: HashMap<i32, File>,
    },
}

struct State {
    sink: Sink,
    /// The first process seen: on standard error, strace-style `[pid N]`
    /// prefixes mark the others.
    first_pid: Option<i32>,
    summary: summary::Summary,
    /// A write already failed (reported once).
    failed: bool,
}

/// The `--trace` [`Tracer`].
pub struct TraceWriter {
    opts: TraceOptions,
    state: Mutex<State>,
}

impl TraceWriter {
    /// Opens the output (`-o FILE` is created or truncated now, so a bad
    /// path fails before the program starts).
    pub fn new(opts: TraceOptions) -> anyhow::Result<Self> {
        let sink = match (&opts.output, opts.per_pid) {
            (None, _) => Sink::Stderr,
            (Some(base), true) => Sink::PerPid {
                base: base.clone(),
                files: HashMap::new(),
            },
            (Some(path), false) => Sink::File(create(path)?),
        };
        Ok(TraceWriter {
            opts,
            state: Mutex::new(State {
                sink,
                first_pid: None,
                summary: summary::Summary::default(),
                failed: false,
            }),
        })
    }

    /// Writes the `-c` summary if asked for. Every line is written when it
    /// is recorded (one `write` each), so nothing else is buffered.
    pub fn finish(&self) {
        if !self.opts.summary {
            return;
        }
        let mut st = self.state();
        let table = match self.opts.format {
            TraceFormat::Text => st.summary.render(self.opts.annotate),
            TraceFormat::Json => format!("{}\n", st.summary.to_json()),
        };
        if let Err(e) = st.sink.write(None, table.as_bytes()) {
            tracing::warn!(error = %e, "writing the trace summary failed");
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tracer for TraceWriter {
    fn record(&self, call: &CallRecord) {
        if self.opts.filter.is_some_and(|f| !f.allows(call.nr)) {
            return;
        }
        let d = decode::decode(call);
        let mut st = self.state();
        if self.opts.summary {
            st.summary.add(call, &d.outcome);
        }
        let first = *st.first_pid.get_or_insert(call.pid);
        let out = match self.opts.format {
            TraceFormat::Json => format!("{}\n", json::record(call, &d)),
            TraceFormat::Text => {
                let prefix = st.sink.prefix(call.pid, first);
                let style = Style {
                    timestamps: self.opts.timestamps,
                    annotate: self.opts.annotate,
                };
                text::format(call, &d, prefix, style)
            }
        };
        let res = st.sink.write(Some(call.pid), out.as_bytes());
        if let Err(e) = res {
            if !std::mem::replace(&mut st.failed, true) {
                tracing::warn!(error = %e, "writing the trace failed; further errors are not reported");
            }
        }
    }
}

fn create(path: &std::path::Path) -> anyhow::Result<File> {
    File::create(path).map_err(|e| anyhow::anyhow!("-o {}: {e}", path.display()))
}

impl Sink {
    /// strace -f's pid prefix here: `[pid N]` on standard error for all
    /// but the `first` process, `N` on every line of one file, none per pid.
    fn prefix(&self, pid: i32, first: i32) -> Prefix {
        match self {
            Sink::Stderr if pid != first => Prefix::Bracketed,
            Sink::Stderr | Sink::PerPid { .. } => Prefix::None,
            Sink::File(_) => Prefix::Plain,
        }
    }

    /// Writes the lines of process `pid` (`None`: the summary, which goes
    /// to standard error when there is no single file).
    fn write(&mut self, pid: Option<i32>, bytes: &[u8]) -> std::io::Result<()> {
        match (self, pid) {
            (Sink::File(f), _) => f.write_all(bytes),
            (Sink::PerPid { base, files }, Some(pid)) => {
                per_pid_file(base, files, pid)?.write_all(bytes)
            }
            (Sink::Stderr | Sink::PerPid { .. }, _) => std::io::stderr().write_all(bytes),
        }
    }
}

/// `FILE.PID`, created on the process's first call (strace -ff).
fn per_pid_file<'a>(
    base: &std::path::Path,
    files: &'a mut HashMap<i32, File>,
    pid: i32,
) -> std::io::Result<&'a mut File> {
    use std::collections::hash_map::Entry;
    match files.entry(pid) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(v) => {
            let mut name = base.as_os_str().to_owned();
            name.push(format!(".{pid}"));
            Ok(v.insert(File::create(name)?))
        }
    }
}

#[cfg(test)]
mod tests;

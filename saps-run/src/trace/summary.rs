//! The summary printed on exit with `-c` (issue 6): strace -c's table of
//! time, calls and errors per syscall, then the SAPS counters.
//!
//! Times are the wall-clock service times SAPS measured (strace -c counts
//! system CPU time unless given `-w`; a trapped call's cost is its wait).
//! Rows are sorted by time, then by syscall number, as strace sorts them.

use super::decode::{syscall_name, Outcome};
use super::text::seconds;
use saps_interceptor::supervisor::CallRecord;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

#[derive(Debug, Default, Clone, Copy)]
struct Row {
    calls: u64,
    errors: u64,
    time: Duration,
}

/// Counts of the calls seen so far.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    rows: BTreeMap<i64, Row>,
    conns: BTreeSet<u64>,
    native: u64,
}

const DASHES: &str = "------ ----------- ----------- --------- --------- ----------------\n";

impl Summary {
    pub fn add(&mut self, call: &CallRecord, outcome: &Outcome) {
        let row = self.rows.entry(call.nr).or_default();
        row.calls += 1;
        row.time += call.duration;
        match outcome {
            Outcome::Error { .. } => row.errors += 1,
            Outcome::Native => self.native += 1,
            Outcome::Value(_) => {}
        }
        self.conns.extend(call.note.conn);
    }

    /// The rows in strace's order and their total.
    fn sorted(&self) -> (Vec<(i64, Row)>, Row) {
        let mut rows: Vec<(i64, Row)> = self.rows.iter().map(|(nr, r)| (*nr, *r)).collect();
        rows.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(a.0.cmp(&b.0)));
        let total = rows.iter().fold(Row::default(), |t, (_, r)| Row {
            calls: t.calls + r.calls,
            errors: t.errors + r.errors,
            time: t.time + r.time,
        });
        (rows, total)
    }

    /// The strace -c table; with `saps`, a `# saps:` counters line after it.
    pub fn render(&self, saps: bool) -> String {
        let (rows, total) = self.sorted();
        let mut s = String::from("% time     seconds  usecs/call     calls    errors syscall\n");
        s.push_str(DASHES);
        for (nr, r) in &rows {
            let pct = if total.time.is_zero() {
                0.0
            } else {
                100.0 * r.time.as_secs_f64() / total.time.as_secs_f64()
            };
            line(&mut s, pct, r, &syscall_name(*nr));
        }
        s.push_str(DASHES);
        line(&mut s, 100.0, &total, "total");
        if saps {
            let _ = writeln!(
                s,
                "# saps: {} SAPS connections, {} calls served, {} ran natively",
                self.conns.len(),
                total.calls - self.native,
                self.native
            );
        }
        s
    }

    /// The same counts as one JSON object (`--trace-format json -c`).
    pub fn to_json(&self) -> Value {
        let (rows, total) = self.sorted();
        let row = |name: &str, r: &Row| {
            json!({
                "syscall": name,
                "calls": r.calls,
                "errors": r.errors,
                "seconds": r.time.as_secs_f64(),
            })
        };
        json!({
            "summary": rows.iter().map(|(nr, r)| row(&syscall_name(*nr), r)).collect::<Vec<_>>(),
            "total": row("total", &total),
            "saps": {
                "connections": self.conns.len(),
                "native_calls": self.native,
            },
        })
    }
}

/// `%6.2f %11.6f %11lu %9u %9.u %s`: strace's row (errors blank when 0).
fn line(s: &mut String, pct: f64, r: &Row, name: &str) {
    let usecs = r
        .time
        .as_micros()
        .checked_div(u128::from(r.calls))
        .unwrap_or(0);
    let errors = if r.errors == 0 {
        String::new()
    } else {
        r.errors.to_string()
    };
    let _ = writeln!(
        s,
        "{pct:6.2} {:>11} {usecs:>11} {:>9} {errors:>9} {name}",
        seconds(r.time),
        r.calls
    );
}

//! The JSON format (`--trace-format json`, issue 6): one object per line,
//! with the field names documented in `docs/trace.md` (kept stable):
//!
//! ```json
//! {"ts":"2026-11-25T08:26:13.405804Z","pid":1234,"syscall":"connect",
//!  "args":["3","{sa_family=AF_INET, …}","16"],"retval":-1,"errno":111,
//!  "errno_name":"ECONNREFUSED","duration_us":146,
//!  "saps":{"inode":123456,"conn":7,"action":"virtual","group":"0.0.0.0:80",
//!          "io_server":"embedded","node":"web1"}}
//! ```
//!
//! `args` holds the same strings as the text format. `retval` is `null`
//! when the call ran natively (SAPS does not see its result).

use super::decode::{Decoded, Outcome};
use saps_interceptor::supervisor::CallRecord;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// The object of one call.
pub(crate) fn record(call: &CallRecord, d: &Decoded) -> Value {
    let (retval, errno, errno_name) = match &d.outcome {
        Outcome::Value(v) => (json!(v), Value::Null, Value::Null),
        Outcome::Error { errno, name, .. } => (json!(-1), json!(errno), json!(name)),
        Outcome::Native => (Value::Null, Value::Null, Value::Null),
    };
    json!({
        "ts": rfc3339(call.start),
        "pid": call.pid,
        "syscall": d.name,
        "args": d.args,
        "retval": retval,
        "errno": errno,
        "errno_name": errno_name,
        "duration_us": u64::try_from(call.duration.as_micros()).unwrap_or(u64::MAX),
        "saps": {
            "inode": call.note.inode,
            "conn": call.note.conn,
            "action": call.note.action,
            "group": call.note.group.map(|g| g.to_string()),
            "io_server": call.note.io_server.as_deref(),
            "node": call.note.node.as_deref(),
        },
    })
}

/// `2026-11-25T08:26:13.405804Z` (UTC, microseconds).
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_micros()
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2026-11-25T08:26:13.405804Z, checked with `date -u -d @1795595173`.
        let t = UNIX_EPOCH + Duration::new(1_795_595_173, 405_804_000);
        assert_eq!(rfc3339(t), "2026-11-25T08:26:13.405804Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000Z");
    }
}

//! Log rate limiting of refusals and drops (like the kernel's
//! `net_ratelimit`): under a flood (strangers on the fabric port, a
//! hostile node, clients timing out by the thousand) each reason is
//! logged once per [`LOG_INTERVAL`]; the others are counted, and the next
//! line of that reason, or the housekeeping tick's summary, says how many
//! ("… and 1234 more in the last 10 s"). [`Limiter`] is the sans-IO core,
//! driven with explicit time; [`LogLimit`] is the io-server's, under its
//! own small lock (taken by no one holding another).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one reason may be logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What was not logged of one reason since its last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Suppressed(pub u64);

impl fmt::Display for Suppressed {
    /// Empty when nothing was suppressed; else " (and N more in the last
    /// 10 s)", to follow the message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(
                f,
                " (and {n} more in the last {} s)",
                LOG_INTERVAL.as_secs()
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    /// When the reason was last logged.
    logged: Instant,
    suppressed: u64,
}

/// Per reason: when it was last logged and how many since were not.
/// Reasons are the call sites' fixed strings, so the table is bounded by
/// the code.
#[derive(Debug, Default)]
pub struct Limiter {
    windows: HashMap<&'static str, Window>,
}

impl Limiter {
    /// An event of `reason` at `now`: `Some` (with what was suppressed
    /// before it) when it is to be logged, `None` when it is only counted.
    pub fn allow(&mut self, reason: &'static str, now: Instant) -> Option<Suppressed> {
        match self.windows.get_mut(reason) {
            Some(w) if now.saturating_duration_since(w.logged) < LOG_INTERVAL => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                let before = Suppressed(w.suppressed);
                *w = Window {
                    logged: now,
                    suppressed: 0,
                };
                Some(before)
            }
            None => {
                let w = Window {
                    logged: now,
                    suppressed: 0,
                };
                self.windows.insert(reason, w);
                Some(Suppressed(0))
            }
        }
    }

    /// The reasons whose interval is over at `now` with events not
    /// logged: to be summed up in one line each. Quiet reasons are
    /// forgotten.
    pub fn flush(&mut self, now: Instant) -> Vec<(&'static str, Suppressed)> {
        let mut out = Vec::new();
        self.windows.retain(|&reason, w| {
            if now.saturating_duration_since(w.logged) < LOG_INTERVAL {
                return true;
            }
            if w.suppressed > 0 {
                out.push((reason, Suppressed(w.suppressed)));
            }
            false
        });
        out
    }
}

/// The io-server's [`Limiter`].
#[derive(Debug, Default)]
pub struct LogLimit(Mutex<Limiter>);

impl LogLimit {
    /// See [`Limiter::allow`], now.
    pub fn allow(&self, reason: &'static str) -> Option<Suppressed> {
        let mut l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        l.allow(reason, Instant::now())
    }

    /// Logs the summary of every reason whose interval is over.
    pub fn flush(&self) {
        let done = {
            let mut l = self.0.lock().unwrap_or_else(|e| e.into_inner());
            l.flush(Instant::now())
        };
        for (reason, n) in done {
            tracing::warn!(
                "{reason}: {} more in the last {} s",
                n.0,
                LOG_INTERVAL.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_flood_is_logged_once_per_interval_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        assert_eq!(l.allow("refused", t0), Some(Suppressed(0)));
        for i in 0..1234 {
            assert_eq!(l.allow("refused", t0 + S / 2 + S * i / 200), None);
        }
        // Another reason has its own window.
        assert_eq!(l.allow("timed out", t0 + S), Some(Suppressed(0)));
        let next = l.allow("refused", t0 + 10 * S);
        assert_eq!(next, Some(Suppressed(1234)));
        assert_eq!(
            next.unwrap().to_string(),
            " (and 1234 more in the last 10 s)"
        );
        assert_eq!(Suppressed(0).to_string(), "");
    }

    #[test]
    fn a_flood_that_stops_is_summed_up_once_its_interval_is_over() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        l.allow("refused", t0);
        l.allow("refused", t0 + S);
        l.allow("refused", t0 + 2 * S);
        l.allow("alone", t0);
        assert_eq!(l.flush(t0 + 9 * S), []);
        assert_eq!(l.flush(t0 + 10 * S), [("refused", Suppressed(2))]);
        assert_eq!(l.flush(t0 + 30 * S), [], "said once; quiet ones forgotten");
        assert_eq!(l.allow("refused", t0 + 31 * S), Some(Suppressed(0)));
    }
}

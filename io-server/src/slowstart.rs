//! Slow start (haproxy's `slowstart`), sans-IO: a node that joins or
//! rejoins gets a share of new clients that ramps linearly from almost
//! nothing to its full weight over `--slow-start`, so a cold node (empty
//! caches, JIT not warm, pools not filled) is not handed its full share
//! at once. As in haproxy, the effective weight is recomputed in steps
//! (at each housekeeping tick, `timeouts.rs`), never per client, and is
//! at least 1 while the weight is not 0: a ramping node is always in use.

use std::time::{Duration, Instant};

/// A node's weight ramping up since it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ramp {
    since: Instant,
}

impl Ramp {
    pub fn new(since: Instant) -> Ramp {
        Ramp { since }
    }

    /// When it began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The effective weight at `now` of a node whose weight is `weight`,
    /// `period` being `--slow-start`; `None` once the ramp is over (the
    /// weight is the node's own from then on).
    pub fn effective(&self, weight: u32, period: Duration, now: Instant) -> Option<u32> {
        let elapsed = now.saturating_duration_since(self.since);
        if period.is_zero() || elapsed >= period {
            return None;
        }
        // haproxy's arithmetic: the share in whole per cent, rounded up
        // (1 % at the start), then the weight's share, rounded up.
        let (e, p) = (elapsed.as_micros(), period.as_micros());
        let pct = ((e * 100).div_ceil(p)).clamp(1, 100);
        let w = (u128::from(weight) * pct).div_ceil(100);
        Some(w as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_effective_weight_ramps_linearly_from_one_to_the_full_weight() {
        let t0 = Instant::now();
        let r = Ramp::new(t0);
        let period = 10 * S;
        let at = |s: f64| r.effective(100, period, t0 + S.mul_f64(s));
        assert_eq!(at(0.0), Some(1));
        assert_eq!(at(1.0), Some(10));
        assert_eq!(at(5.0), Some(50));
        assert_eq!(at(9.99), Some(100));
        assert_eq!(at(10.0), None, "over: the node's own weight");
        let mut last = 0;
        for tenth in 0..100 {
            let w = at(f64::from(tenth) / 10.0).unwrap();
            assert!(w >= last, "never down: {w} after {last}");
            last = w;
        }
    }

    #[test]
    fn a_small_weight_is_at_least_one_and_zero_stays_zero() {
        let t0 = Instant::now();
        let r = Ramp::new(t0);
        assert_eq!(r.effective(1, 60 * S, t0 + S), Some(1));
        assert_eq!(r.effective(3, 60 * S, t0 + 30 * S), Some(2));
        assert_eq!(
            r.effective(0, 60 * S, t0 + S),
            Some(0),
            "draining stays drained"
        );
        assert_eq!(r.effective(256, Duration::ZERO, t0), None, "no slow start");
    }
}

//! Per-connection, per-direction flow control (SAPS paper, Appendix A).
//!
//! Sender: `A_s` octets sent, `L_s` the limit granted by the receiver; it may
//! send while `A_s < L_s`. Receiver: `A_r` octets received, `B_r` its buffer
//! size, `E_r` its free space, `L_r` the last limit it reported. It starts
//! with `L_r = B_r` and reports `L_r = A_r + E_r` whenever
//! `A_r + E_r > L_r + B_r / 2`. Limits are absolute 64-bit octet counts, so a
//! duplicated or late credit frame can never grow the window wrongly.

/// The sending half: what we may still send on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendCredit {
    /// `A_s`: octets sent so far.
    sent: u64,
    /// `L_s`: the highest limit the receiver has granted.
    limit: u64,
    /// The receiver's `B_r`, its first `L_r`.
    window: u64,
}

impl SendCredit {
    /// `initial` is the receiver's buffer `B_r`, its first `L_r`.
    pub fn new(initial: u64) -> Self {
        Self {
            sent: 0,
            limit: initial,
            window: initial,
        }
    }

    /// `L_s - A_s`: octets that may be sent now.
    pub fn available(&self) -> u64 {
        self.limit - self.sent
    }

    /// `A_s`.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Octets sent that the receiver has not yet reported consumed. A
    /// receiver reports `L_r = A_r + E_r`, with `E_r = B_r - (A_r -
    /// consumed)`: so `L_s - B_r` is what it had consumed when it last
    /// reported, and `A_s - (L_s - B_r)` is in flight or in its buffer.
    /// Appendix A reports after half a buffer, so this over-counts by less
    /// than `B_r / 2`.
    pub fn unacknowledged(&self) -> u64 {
        // A_s + B_r - L_s, never below 0.
        (self.sent + self.window).saturating_sub(self.limit)
    }

    /// Records `n` octets sent. The caller must stay within [`available`].
    ///
    /// [`available`]: Self::available
    pub fn on_sent(&mut self, n: u64) {
        debug_assert!(n <= self.available());
        self.sent += n;
    }

    /// `(A_s, L_s, B_r)`, for a snapshot of the channel.
    pub(crate) fn parts(&self) -> (u64, u64, u64) {
        (self.sent, self.limit, self.window)
    }

    /// The credit [`SendCredit::parts`] gave; `None` when `A_s > L_s`,
    /// which no sender reaches.
    pub(crate) fn from_parts(sent: u64, limit: u64, window: u64) -> Option<Self> {
        (sent <= limit).then_some(Self {
            sent,
            limit,
            window,
        })
    }

    /// Applies a credit frame. Returns true when the window grew from
    /// empty, i.e. when a blocked sender should be told `buffer_available`.
    pub fn on_credit(&mut self, limit: u64) -> bool {
        if limit <= self.limit {
            return false; // duplicated or late: limits only grow
        }
        let was_blocked = self.available() == 0;
        self.limit = limit;
        was_blocked
    }
}

/// The peer sent past the limit we granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer sent {received} octets, past the granted limit of {limit}")]
pub struct CreditViolation {
    pub received: u64,
    pub limit: u64,
}

/// The receiving half: our buffer for one connection and the limit we granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvCredit {
    /// `A_r`: octets received.
    received: u64,
    /// Octets the application has taken out of the buffer.
    consumed: u64,
    /// `B_r`: buffer size.
    buffer: u64,
    /// `L_r`: the last limit reported to the sender.
    reported: u64,
}

impl RecvCredit {
    pub fn new(buffer: u64) -> Self {
        Self {
            received: 0,
            consumed: 0,
            buffer,
            reported: buffer,
        }
    }

    /// `E_r = B_r - (A_r - consumed)`.
    pub fn free(&self) -> u64 {
        self.buffer - (self.received - self.consumed)
    }

    /// Octets received but not yet consumed.
    pub fn buffered(&self) -> u64 {
        self.received - self.consumed
    }

    /// `A_r`.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Records `n` octets arriving; refuses octets beyond `L_r`.
    pub fn on_received(&mut self, n: u64) -> Result<(), CreditViolation> {
        let received = self.received.saturating_add(n);
        if received > self.reported {
            return Err(CreditViolation {
                received,
                limit: self.reported,
            });
        }
        self.received = received;
        Ok(())
    }

    /// Records `n` octets consumed by the application. Returns the new limit
    /// to report when Appendix A's rule says so.
    pub fn on_consumed(&mut self, n: u64) -> Option<u64> {
        // Saturating: a caller claiming more than was received (even
        // `usize::MAX`) is capped at `A_r`, never an overflow.
        self.consumed = self.consumed.saturating_add(n).min(self.received);
        // A_r + E_r > L_r + B_r/2
        let candidate = self.received + self.free();
        if candidate > self.reported + self.buffer / 2 {
            self.reported = candidate;
            Some(candidate)
        } else {
            None
        }
    }

    /// `(A_r, consumed, B_r, L_r)`, for a snapshot of the channel.
    pub(crate) fn parts(&self) -> (u64, u64, u64, u64) {
        (self.received, self.consumed, self.buffer, self.reported)
    }

    /// The credit [`RecvCredit::parts`] gave; `None` for counts no
    /// receiver reaches (more consumed than received, more buffered than
    /// `B_r`, more received than `L_r`, a next limit past 64 bits).
    pub(crate) fn from_parts(
        received: u64,
        consumed: u64,
        buffer: u64,
        reported: u64,
    ) -> Option<Self> {
        let sane = consumed <= received
            && received - consumed <= buffer
            && received <= reported
            && reported.checked_add(buffer).is_some();
        sane.then_some(Self {
            received,
            consumed,
            buffer,
            reported,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_stops_at_the_limit_and_resumes_on_credit() {
        let mut s = SendCredit::new(100);
        s.on_sent(100);
        assert_eq!(s.available(), 0);
        assert!(s.on_credit(150), "growth from empty wakes the sender");
        assert_eq!(s.available(), 50);
        assert!(!s.on_credit(120), "a late, smaller limit is ignored");
        assert!(!s.on_credit(150), "a duplicate is ignored");
        assert_eq!(s.available(), 50);
    }

    #[test]
    fn unacknowledged_is_what_was_sent_past_the_receivers_last_report() {
        // B_r = 100: L_s starts at 100.
        let mut s = SendCredit::new(100);
        assert_eq!(s.unacknowledged(), 0);
        s.on_sent(60);
        assert_eq!(s.unacknowledged(), 60);
        // The receiver consumed 50: it reports L_r = 50 + 100.
        s.on_credit(150);
        assert_eq!(s.unacknowledged(), 10);
        s.on_sent(90);
        assert_eq!(s.unacknowledged(), 100, "never more than B_r");
        // A late, smaller limit changes nothing.
        s.on_credit(120);
        assert_eq!(s.unacknowledged(), 100);
    }

    #[test]
    fn receiver_reports_after_half_a_buffer_is_consumed() {
        let mut r = RecvCredit::new(100);
        r.on_received(100).unwrap();
        assert_eq!(
            r.on_received(1),
            Err(CreditViolation {
                received: 101,
                limit: 100
            })
        );
        assert_eq!(r.on_consumed(50), None, "50 > 50 is false");
        assert_eq!(r.on_consumed(1), Some(151));
        r.on_received(51).unwrap();
        assert_eq!(r.free(), 0);
        assert_eq!(
            r.on_consumed(200),
            Some(251),
            "consumption is capped at A_r"
        );
        r.on_received(10).unwrap();
        assert_eq!(r.on_consumed(u64::MAX), None, "no overflow past A_r");
        assert_eq!(r.buffered(), 0);
    }
}

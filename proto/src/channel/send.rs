//! The sending calls of a channel (§2.1.1 `send_message`, Appendix A's
//! sender): a payload the caller has ([`Channel::send_message`]), or room
//! lent for one the shell reads or splices straight into the output
//! ([`Channel::reserve`], [`Channel::commit`], [`Channel::commit_spliced`]),
//! each within the connection's credit; and the end of a direction.

use super::{CallError, Channel, Reservation, MAX_DATA};
use crate::frame::{ConnId, Frame};

impl Channel {
    /// `send_message`: queues as much of `data` as the peer's credit allows
    /// and returns how much. 0 means wait for `BufferAvailable`.
    pub fn send_message(&mut self, conn: ConnId, data: &[u8]) -> Result<usize, CallError> {
        let n = data.len().min(self.send_room(conn)?);
        if n == 0 {
            if !data.is_empty() && !self.frozen {
                self.stats.credit_stalls += 1;
            }
            return Ok(0);
        }
        for chunk in data[..n].chunks(MAX_DATA) {
            self.output.encode_data(conn, chunk);
        }
        self.sent(conn, n);
        Ok(n)
    }

    /// Octets `conn` may send now (none while frozen); an error if it
    /// may not send at all.
    fn send_room(&self, conn: ConnId) -> Result<usize, CallError> {
        self.open_check()?;
        let room = self.conns.send_room(conn)? as usize;
        Ok(if self.frozen { 0 } else { room })
    }

    /// Counts `n` octets queued on `conn` against its credit.
    fn sent(&mut self, conn: ConnId, n: usize) {
        self.conns.sent(conn, n as u64);
        self.stats.bytes_sent += n as u64;
    }

    /// Lends room for one Data frame's payload on `conn` in the channel's
    /// output buffer: at most `max` octets, the send window (less what is
    /// lent already) and [`MAX_DATA`]. The shell writes the payload into
    /// it (a socket's read, with no copy) and gives it back with
    /// [`Channel::commit`], or splices the payload into the channel's
    /// pipe and gives it back with [`Channel::commit_spliced`]. `None`:
    /// the window is shut (a credit stall, counted), or the channel is
    /// frozen ([`Channel::freeze`]).
    pub fn reserve(&mut self, conn: ConnId, max: usize) -> Result<Option<Reservation>, CallError> {
        let room = max.min(self.send_room(conn)?).min(MAX_DATA);
        if room == 0 {
            if !self.frozen {
                self.stats.credit_stalls += 1;
            }
            return Ok(None);
        }
        let r = self.output.lend(conn, room);
        self.conns.lend(conn, r.room as u64);
        Ok(Some(r))
    }

    /// Queues the payload written into `r` as one Data frame, after what
    /// was queued before it, and counts it against the credit; the room
    /// left goes back to the window. Returns the payload's length (0: no
    /// frame). An error, and nothing sent, when the connection or the
    /// channel closed since [`Channel::reserve`].
    pub fn commit(&mut self, r: Reservation) -> Result<usize, CallError> {
        let n = r.len();
        self.settle(r, n, false)
    }

    /// [`Channel::commit`] for a payload of `n` octets (at most the room
    /// of `r`, in which nothing was written) that the shell spliced into
    /// the channel's pipe: the frame's header goes out with what was
    /// queued before it, then a [`Transmit`](super::Transmit) of `n` spliced octets.
    pub fn commit_spliced(&mut self, r: Reservation, n: usize) -> Result<usize, CallError> {
        assert!(
            r.is_empty() && n <= r.room,
            "a spliced payload fits its reservation"
        );
        self.settle(r, n, true)
    }

    fn settle(&mut self, r: Reservation, n: usize, spliced: bool) -> Result<usize, CallError> {
        let Reservation { conn, frame, room } = r;
        self.conns.take_back(conn, room as u64);
        let live = match (self.is_open(), self.conns.contains(conn)) {
            (false, _) => Err(CallError::NotOpen),
            (true, false) => Err(CallError::UnknownConnection(conn)),
            (true, true) => Ok(n),
        };
        match live {
            Ok(n) if n > 0 => {
                if spliced {
                    self.output.take_back_spliced(frame, n);
                    self.stats.bytes_spliced += n as u64;
                } else {
                    self.output.take_back(frame, n);
                }
                self.sent(conn, n);
            }
            _ => self.output.take_back(frame, 0),
        }
        live
    }

    /// Octets `conn` may send now (`L_s - A_s`; 0 while frozen).
    pub fn send_window(&self, conn: ConnId) -> usize {
        match self.conns.get(conn) {
            Some(c) if !self.frozen => c.send.available() as usize,
            _ => 0,
        }
    }

    /// Stops the sending calls for an upgrade in place (design note
    /// 2026-12-03, §2 step 3): while frozen, [`Channel::send_window`]
    /// answers 0 and [`Channel::reserve`] and [`Channel::send_message`]
    /// take nothing (no stall is counted), so a shell that reads a client
    /// only into the room they lend reads nothing more. Everything else
    /// (input, credits, Fin, close, requests) goes on.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Ends [`Channel::freeze`]. Raises nothing: the shell wakes the
    /// senders it stopped.
    pub fn unfreeze(&mut self) {
        self.frozen = false;
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Octets sent on `conn` that the peer has not yet reported consumed
    /// ([`crate::credit::SendCredit::unacknowledged`]); 0 for an unknown
    /// connection.
    pub fn unacknowledged(&self, conn: ConnId) -> u64 {
        self.conns.get(conn).map_or(0, |c| c.send.unacknowledged())
    }

    /// Ends our direction of `conn` after the data queued so far.
    pub fn send_fin(&mut self, conn: ConnId) -> Result<(), CallError> {
        self.open_check()?;
        let c = self
            .conns
            .get_mut(conn)
            .ok_or(CallError::UnknownConnection(conn))?;
        if !c.fin_sent {
            c.fin_sent = true;
            self.emit(&Frame::Fin { conn });
        }
        Ok(())
    }
}

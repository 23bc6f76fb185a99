//! The io-server's side of a client connection that the node's program
//! has not accepted yet (issue 17), sans-IO.
//!
//! Until the node says `Accepted`, a connection the io-server accepted
//! for a node is still the io-server's: if the node's channel ends first,
//! the client goes to another member of the group, and that node must get
//! every octet the client sent, once. So the relay keeps a copy of what it
//! read from the client until the accept, and reads at most [`cap`] octets
//! before it (the client's TCP window holds the rest, as the kernel's
//! accept queue would). A connection given to a new node starts with the
//! copy of the old one ([`Replay`]), which is sent before anything is
//! read.
//!
//! The relay asks [`PreAccept::next`] what to do, does it, and reports
//! it; after [`Step::Done`] it drops the copy and relays as any
//! connection, splicing included.

use bytes::{Bytes, BytesMut};

/// Most client octets forwarded to a node before its program accepts the
/// connection (and kept by the io-server until then): a request of a
/// few KiB, or the start of an upload, goes to the node at once; more
/// waits in the client's TCP window for the accept. The kernel keeps a
/// connection in its accept queue with up to its receive buffer
/// (`tcp_rmem`'s default, 128 KiB).
pub const PRE_ACCEPT_MAX: usize = 64 * 1024;

/// The pre-accept cap of a connection whose receiver grants `window`.
pub fn cap(window: u64) -> usize {
    PRE_ACCEPT_MAX.min(usize::try_from(window).unwrap_or(usize::MAX))
}

/// What a client sent before a node that died could accept it: to send
/// to the next node, before anything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// The octets read from the client.
    pub data: Bytes,
    /// The client's FIN came after them.
    pub fin: bool,
}

impl Replay {
    /// Nothing was read from the client's socket: a connection that may
    /// still be handed over as a socket (a FIN read is read again).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The next thing the relay does on a pre-accept connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send this many octets of the copy ([`PreAccept::unsent`]).
    Send(usize),
    /// Send the client's FIN (everything before it is sent).
    Fin,
    /// Read at most this many octets from the client, keep and send them.
    Read(usize),
    /// Wait for credit, or for the accept (the cap is reached).
    Wait,
    /// Accepted and everything kept has been sent: drop the copy and
    /// relay as usual.
    Done,
    /// The FIN is sent: nothing more goes this way.
    Finished,
}

/// A [`PreAccept`] as plain data ([`crate::endpoint::RelaySnap::pre`]):
/// its fields, as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAcceptSnap {
    /// Everything read from the client so far (a replay first).
    pub kept: Bytes,
    /// Of `kept`, octets sent on the connection.
    pub sent: usize,
    /// The client's FIN came after `kept`.
    pub fin: bool,
    pub fin_sent: bool,
    /// The node's program accepted the connection.
    pub accepted: bool,
    /// Most octets kept.
    pub cap: usize,
}

/// One connection's client octets, kept until the program accepts it.
#[derive(Debug)]
pub struct PreAccept {
    /// Everything read from the client so far (a replay first).
    kept: BytesMut,
    /// Of `kept`, octets sent on this connection.
    sent: usize,
    /// The client's FIN came after `kept`.
    fin: bool,
    fin_sent: bool,
    accepted: bool,
    cap: usize,
}

impl PreAccept {
    /// A connection that starts with `replay`; `tracked`: kept until the
    /// accept (else only the replay is sent first, and nothing is kept).
    pub fn new(replay: Replay, tracked: bool, cap: usize) -> Self {
        PreAccept {
            kept: BytesMut::from(&replay.data[..]),
            sent: 0,
            fin: replay.fin,
            fin_sent: false,
            accepted: !tracked,
            cap,
        }
    }

    /// What to do now, with `window` octets of credit.
    pub fn next(&self, window: usize) -> Step {
        if self.sent < self.kept.len() {
            return match window {
                0 => Step::Wait,
                w => Step::Send(w.min(self.kept.len() - self.sent)),
            };
        }
        if self.fin {
            return if self.fin_sent {
                Step::Finished
            } else {
                Step::Fin
            };
        }
        if self.accepted {
            return Step::Done;
        }
        match window.min(self.cap.saturating_sub(self.kept.len())) {
            0 => Step::Wait,
            n => Step::Read(n),
        }
    }

    /// The octets [`Step::Send`] is about, from the first unsent.
    pub fn unsent(&self) -> &[u8] {
        &self.kept[self.sent..]
    }

    /// `n` octets of [`PreAccept::unsent`] went out.
    pub fn sent(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.kept.len());
    }

    /// Octets read from the client and sent in the same step.
    pub fn read(&mut self, data: &[u8]) {
        if !self.accepted {
            self.kept.extend_from_slice(data);
            self.sent = self.kept.len();
        }
    }

    /// The client's end of stream was read (and is sent next).
    pub fn eof(&mut self) {
        self.fin = true;
    }

    pub fn fin_sent(&mut self) {
        self.fin_sent = true;
    }

    /// The node said its program accepted the connection: what is kept
    /// need only be sent, no longer kept once it is.
    pub fn accept(&mut self) {
        self.accepted = true;
    }

    /// Octets kept now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// A copy as plain data, for an upgrade in place.
    pub fn snapshot(&self) -> PreAcceptSnap {
        PreAcceptSnap {
            kept: Bytes::copy_from_slice(&self.kept),
            sent: self.sent,
            fin: self.fin,
            fin_sent: self.fin_sent,
            accepted: self.accepted,
            cap: self.cap,
        }
    }

    /// The state `snap` was taken of.
    pub fn restore(snap: &PreAcceptSnap) -> PreAccept {
        PreAccept {
            kept: BytesMut::from(&snap.kept[..]),
            sent: snap.sent.min(snap.kept.len()),
            fin: snap.fin,
            fin_sent: snap.fin_sent,
            accepted: snap.accepted,
            cap: snap.cap,
        }
    }

    /// Everything the client sent, for the next node.
    pub fn into_replay(self) -> Replay {
        Replay {
            data: self.kept.freeze(),
            fin: self.fin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_kept_and_capped_until_the_accept() {
        let mut p = PreAccept::new(Replay::default(), true, 10);
        assert_eq!(p.next(100), Step::Read(10), "the cap, not the window");
        assert_eq!(p.next(4), Step::Read(4), "the window, not the cap");
        assert_eq!(p.next(0), Step::Wait);
        p.read(b"abcdef");
        assert_eq!(p.next(100), Step::Read(4));
        p.read(b"ghij");
        assert_eq!(p.next(100), Step::Wait, "the cap is reached");
        assert_eq!(p.kept(), 10);
        p.accept();
        assert_eq!(p.next(100), Step::Done);
    }

    #[test]
    fn the_copy_is_what_the_client_sent_fin_included() {
        let mut p = PreAccept::new(Replay::default(), true, 64);
        p.read(b"GET / HTTP/1.0\r\n\r\n");
        p.eof();
        assert_eq!(p.next(100), Step::Fin);
        p.fin_sent();
        assert_eq!(p.next(100), Step::Finished);
        let r = p.into_replay();
        assert_eq!(
            r,
            Replay {
                data: Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n"),
                fin: true
            }
        );
    }

    #[test]
    fn a_replay_goes_first_within_the_window_then_reads_resume() {
        let replay = Replay {
            data: Bytes::from_static(b"0123456789"),
            fin: false,
        };
        let mut p = PreAccept::new(replay, true, 16);
        assert_eq!(p.next(0), Step::Wait);
        assert_eq!(p.next(4), Step::Send(4));
        assert_eq!(p.unsent(), b"0123456789");
        p.sent(4);
        assert_eq!(p.next(100), Step::Send(6));
        assert_eq!(p.unsent(), b"456789");
        p.sent(6);
        assert_eq!(p.next(100), Step::Read(6), "the cap counts the replay");
        p.read(b"ab");
        // Dying again now hands the next node all of it, once.
        assert_eq!(&p.into_replay().data[..], b"0123456789ab");
    }

    #[test]
    fn an_accept_before_the_replay_is_out_still_sends_it_all() {
        let replay = Replay {
            data: Bytes::from_static(b"xyz"),
            fin: true,
        };
        let mut p = PreAccept::new(replay, true, 16);
        p.accept();
        assert_eq!(p.next(2), Step::Send(2));
        p.sent(2);
        assert_eq!(p.next(2), Step::Send(1));
        p.sent(1);
        assert_eq!(p.next(2), Step::Fin);
    }

    #[test]
    fn an_untracked_connection_only_sends_its_replay() {
        let p = PreAccept::new(Replay::default(), false, 16);
        assert_eq!(p.next(100), Step::Done);
        let mut p = PreAccept::new(
            Replay {
                data: Bytes::from_static(b"ab"),
                fin: false,
            },
            false,
            16,
        );
        assert_eq!(p.next(100), Step::Send(2));
        p.sent(2);
        p.read(b"not kept");
        assert_eq!(p.next(100), Step::Done);
        assert_eq!(p.kept(), 2);
    }

    #[test]
    fn the_cap_is_the_smaller_of_the_window_and_the_constant() {
        assert_eq!(cap(4096), 4096);
        assert_eq!(cap(1 << 20), PRE_ACCEPT_MAX);
    }
}

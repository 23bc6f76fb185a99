//! What a channel has for its transport, in order: frames encoded into one
//! output buffer, the headers of payloads spliced by the shell (each with
//! its length), and the room lent for a Data payload the shell reads
//! straight into the buffer ([`Reservation`]). [`Transmit`] is one piece
//! of it for the shell to write.

use super::config::MAX_DATA;
use crate::codec;
use crate::frame::{ConnId, Frame};
use bytes::buf::Limit;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;

/// Chunks at least this large are handed off as whole buffers on a
/// channel that hands off buffers ([`crate::Channel::hand_off_buffers`]);
/// for smaller ones a fresh buffer per chunk costs more than the reader's
/// copy.
pub const OWNED_MIN: usize = 16 * 1024;

/// Most capacity a new output buffer starts with after a whole buffer was
/// handed off: room for two full Data frames, so a buffer that once grew
/// large is not allocated that large for every chunk after.
pub const OWNED_CAPACITY: usize = 2 * (MAX_DATA + codec::DATA_OVERHEAD);

/// One piece of a channel's output ([`crate::Channel::poll_transmit`]):
/// `bytes` to write, then `spliced` octets of payload the shell moves from
/// the channel's pipe (0 unless the shell spliced a payload into it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transmit {
    /// Whole frames, or frames and the header of the spliced payload.
    pub bytes: Bytes,
    /// Octets of payload to move from the channel's pipe after `bytes`.
    pub spliced: usize,
}

/// Room for one Data frame's payload on a connection, lent by the channel
/// out of its output buffer ([`crate::Channel::reserve`]): the shell
/// writes (reads a socket) into [`Reservation::payload_mut`], then gives
/// it back with [`crate::Channel::commit`], or splices the payload and
/// says how much with [`crate::Channel::commit_spliced`]. Every
/// reservation is committed, with nothing written if need be: until then,
/// its room is not the connection's to send.
#[derive(Debug)]
#[must_use = "a reservation holds send room until it is committed"]
pub struct Reservation {
    pub(super) conn: ConnId,
    /// The frame: its header, then the payload written so far.
    pub(super) frame: BytesMut,
    /// Most payload octets.
    pub(super) room: usize,
}

impl Reservation {
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Most payload octets it takes.
    pub fn room(&self) -> usize {
        self.room
    }

    /// Payload octets written.
    pub fn len(&self) -> usize {
        self.frame.len() - codec::DATA_OVERHEAD
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload written so far.
    pub fn payload(&self) -> &[u8] {
        &self.frame[codec::DATA_OVERHEAD..]
    }

    /// Where the payload goes: at most the room left, in the channel's
    /// output buffer itself (its spare capacity, not initialised).
    pub fn payload_mut(&mut self) -> Limit<&mut BytesMut> {
        let left = self.room - self.len();
        (&mut self.frame).limit(left)
    }
}

/// An [`Output`] as plain data: the sealed pieces in order, then the
/// octets of the open buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OutputSnap {
    pub(super) sealed: Vec<Transmit>,
    pub(super) out: Bytes,
    pub(super) hand_off: bool,
}

/// A channel's output queue.
#[derive(Debug, Default)]
pub(super) struct Output {
    out: BytesMut,
    /// Output finished before a spliced payload, in order, ahead of `out`.
    sealed: VecDeque<Transmit>,
    /// Give chunks of [`OWNED_MIN`] or more as whole buffers.
    hand_off: bool,
}

impl Output {
    pub(super) fn hand_off_buffers(&mut self, yes: bool) {
        self.hand_off = yes;
    }

    pub(super) fn emit(&mut self, frame: &Frame) {
        codec::encode(frame, &mut self.out);
    }

    pub(super) fn encode_data(&mut self, conn: ConnId, data: &[u8]) {
        codec::encode_data(conn, data, &mut self.out);
    }

    /// Lends the room of one Data frame of at most `limit` octets.
    pub(super) fn lend(&mut self, conn: ConnId, limit: usize) -> Reservation {
        let (frame, room) = codec::split_data_frame(conn, limit, &mut self.out);
        Reservation { conn, frame, room }
    }

    /// Takes back a lent frame: its payload, when it has one, goes out in
    /// order after what was queued before; the room left rejoins the
    /// buffer (without a copy, as it is adjacent to it).
    pub(super) fn take_back(&mut self, mut frame: BytesMut, payload: usize) {
        if payload == 0 {
            frame.clear();
        } else {
            codec::seal_data_frame(&mut frame, payload);
        }
        self.out.unsplit(frame);
    }

    /// Takes back a lent frame whose `payload` octets the shell spliced
    /// into the channel's pipe: its header goes out with what came before
    /// it, then the payload.
    pub(super) fn take_back_spliced(&mut self, mut frame: BytesMut, payload: usize) {
        frame.truncate(codec::DATA_OVERHEAD);
        codec::seal_data_frame(&mut frame, payload);
        self.out.unsplit(frame);
        self.sealed.push_back(Transmit {
            bytes: self.out.split().freeze(),
            spliced: payload,
        });
    }

    /// The next piece to write.
    pub(super) fn poll(&mut self) -> Option<Transmit> {
        if let Some(t) = self.sealed.pop_front() {
            return Some(t);
        }
        if self.out.is_empty() {
            return None;
        }
        let bytes = if self.hand_off && self.out.len() >= OWNED_MIN {
            // The whole buffer: its reader owns it and decodes it in place.
            // The next one starts as large (up to OWNED_CAPACITY), so a busy
            // channel does not grow it (and copy what it holds) again.
            let next = BytesMut::with_capacity(self.out.capacity().min(OWNED_CAPACITY));
            std::mem::replace(&mut self.out, next).freeze()
        } else {
            self.out.split().freeze()
        };
        Some(Transmit { bytes, spliced: 0 })
    }

    /// Puts `rest`, the unwritten part of the piece [`Output::poll`] gave
    /// last, back in front of everything else (nothing, if it is empty).
    pub(super) fn unshift(&mut self, rest: Transmit) {
        if !rest.bytes.is_empty() || rest.spliced > 0 {
            self.sealed.push_front(rest);
        }
    }

    /// Octets queued (spliced payloads included).
    pub(super) fn pending(&self) -> usize {
        self.out.len()
            + self
                .sealed
                .iter()
                .map(|t| t.bytes.len() + t.spliced)
                .sum::<usize>()
    }

    /// The queue as plain data (the open buffer copied: it is written
    /// into in place).
    pub(super) fn snapshot(&self) -> OutputSnap {
        OutputSnap {
            sealed: self.sealed.iter().cloned().collect(),
            out: Bytes::copy_from_slice(&self.out),
            hand_off: self.hand_off,
        }
    }

    /// The queue [`Output::snapshot`] gave.
    pub(super) fn restore(snap: OutputSnap) -> Self {
        Self {
            out: BytesMut::from(&snap.out[..]),
            sealed: snap.sealed.into(),
            hand_off: snap.hand_off,
        }
    }
}

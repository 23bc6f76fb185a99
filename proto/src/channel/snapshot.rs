//! A channel as plain data, for the io-server's upgrade in place
//! (bench/notes/2026-12-03-upgrade-design.md, §1.4 and §3): the old
//! process takes a [`ChannelSnap`] of each open channel, sends its
//! [`ChannelSnap::encode`]ing, and the new process makes the channel
//! again with [`Channel::restore`], which then goes on as if nothing had
//! happened: the same bytes out, the same events, the same deadlines.
//!
//! Everything of the channel is in it: role, agreed version, the
//! connection table (credits, Fin flags, handed ids, the next id), the
//! undecoded input and the Data frame read halfway, the output not yet
//! polled (spliced counts included: their octets are in the channel's
//! pipe, which moves as a file descriptor), the events not yet polled,
//! liveness, counters, and whether it is frozen. Instants are carried as
//! ages (how long before the snapshot's `now`) and made again from the
//! restore's `now`. Not in it: the [`ChannelConfig`], which the new
//! process brings (its settings may change), except what the peer was
//! told in the handshake (our `B_r`, in the table) and the liveness of
//! the channel as it was.
//!
//! The encoding is hand-rolled like `codec.rs`: big-endian integers,
//! lengths before what they count, checked before anything is allocated,
//! and [`ChannelSnap::decode`] refuses what it does not know (another
//! [`SNAP_VERSION`], unknown tags, trailing bytes, impossible credits)
//! with an error, never a panic. Frames carried in events (requests,
//! responses, accepted connections) are in the wire codec's encoding.

use super::config::Role;
use super::conns::{ConnSnap, ConnTable, ConnsSnap};
use super::handshake::State;
use super::liveness::{Liveness, LivenessSnap};
use super::output::{Output, OutputSnap};
use super::{Channel, ChannelConfig, ChannelStats, Event, Partial, Transmit};
use crate::codec;
use crate::credit::{RecvCredit, SendCredit};
use crate::cursor::{nanos, put_bytes, put_opt, Cursor, CursorError};
use crate::frame::{ConnId, Frame, ReqId};
use bytes::{BufMut, Bytes, BytesMut};
use std::time::{Duration, Instant};

/// The version of [`ChannelSnap`]'s encoding. Any change to what is
/// encoded, or how, bumps it: a build reads only its own version
/// (`snapshot.golden` holds a sample of the current one).
pub const SNAP_VERSION: u32 = 1;

/// Why a channel could not be snapshotted, or a snapshot decoded or
/// restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapError {
    #[error("only an open channel is snapshotted, not one {0}")]
    NotOpen(&'static str),
    #[error("connection {0} has send room lent out (a reservation not committed)")]
    Reserved(ConnId),
    #[error("snapshot version {0}, this build reads version {SNAP_VERSION}")]
    Version(u32),
    #[error("snapshot truncated")]
    Truncated,
    #[error("malformed snapshot: {0}")]
    Malformed(&'static str),
    #[error("an instant of the snapshot is out of the clock's range")]
    Time,
}

/// Everything of one open channel ([`Channel::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSnap {
    pub(super) role: Role,
    pub(super) frozen: bool,
    pub(super) version: u8,
    /// Age of the handshake's deadline (negative: still ahead).
    pub(super) deadline: Option<i64>,
    pub(super) next_ping: u64,
    pub(super) next_req: ReqId,
    pub(super) unanswered: usize,
    pub(super) input: u64,
    pub(super) stats: ChannelStats,
    pub(super) conns: ConnsSnap,
    pub(super) inbuf: Bytes,
    /// The Data frame read halfway: its connection and payload still to come.
    pub(super) partial: Option<(ConnId, usize)>,
    pub(super) liveness: Option<LivenessSnap>,
    pub(super) output: OutputSnap,
    pub(super) events: Vec<Event>,
}

impl Channel {
    /// Everything of this channel, its instants as ages before `now`.
    /// Refused unless the channel is open, and while a reservation is out
    /// ([`Channel::reserve`] without its commit).
    pub fn snapshot(&self, now: Instant) -> Result<ChannelSnap, SnapError> {
        if !self.is_open() {
            return Err(SnapError::NotOpen(self.state.describe()));
        }
        Ok(ChannelSnap {
            role: self.role,
            frozen: self.frozen,
            version: self.version,
            deadline: self.deadline.map(|d| age(now, d)),
            next_ping: self.next_ping,
            next_req: self.next_req,
            unanswered: self.unanswered,
            input: self.input,
            stats: self.stats,
            conns: self.conns.snapshot()?,
            inbuf: Bytes::copy_from_slice(&self.inbuf),
            partial: self.partial.map(|p| (p.conn, p.left)),
            liveness: self.liveness.as_ref().map(|l| l.snapshot(now)),
            output: self.output.snapshot(),
            events: self.events.iter().cloned().collect(),
        })
    }

    /// The channel `snap` was taken of, open, with `config`'s settings
    /// (its token is not used: no handshake is run) and its instants made
    /// again as their ages before `now`. Nothing is queued or raised: the
    /// channel goes on where the snapshot left it (still frozen if it
    /// was).
    pub fn restore(
        config: ChannelConfig,
        snap: ChannelSnap,
        now: Instant,
    ) -> Result<Channel, SnapError> {
        let deadline = match snap.deadline {
            Some(a) => Some(at(now, a).ok_or(SnapError::Time)?),
            None => None,
        };
        let liveness = match &snap.liveness {
            Some(l) => Some(Liveness::restore(l, now).ok_or(SnapError::Time)?),
            None => None,
        };
        Ok(Channel {
            role: snap.role,
            config,
            state: State::Open,
            deadline,
            conns: ConnTable::restore(snap.conns),
            version: snap.version,
            next_ping: snap.next_ping,
            next_req: snap.next_req,
            inbuf: BytesMut::from(&snap.inbuf[..]),
            partial: snap.partial.map(|(conn, left)| Partial { conn, left }),
            output: Output::restore(snap.output),
            events: snap.events.into(),
            stats: snap.stats,
            input: snap.input,
            liveness,
            unanswered: snap.unanswered,
            frozen: snap.frozen,
        })
    }
}

/// The `state` octet of the one state a snapshot holds.
const OPEN: u8 = 1;

/// Tags of the events in a snapshot.
mod tag {
    pub const NODE_AUTHENTICATED: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const RESPONSE: u8 = 4;
    pub const CONNECTION_ACCEPTED: u8 = 5;
    pub const CONNECTION_CLOSED: u8 = 6;
    pub const ACCEPTED: u8 = 7;
    pub const MESSAGE_RECEIVED: u8 = 8;
    pub const MESSAGE_SPLICED: u8 = 9;
    pub const FIN: u8 = 10;
    pub const BUFFER_AVAILABLE: u8 = 11;
    pub const WEIGHT_CHANGED: u8 = 12;
    /// Raised on a node's channel only (protocol version 4), which an
    /// io-server's upgrade never captures: a snapshot of an io-server's
    /// channel never holds it, so the format of those is unchanged.
    pub const CONNECTING: u8 = 13;
}

impl ChannelSnap {
    /// Which end of a channel it is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Appends the encoding: `version: u32`, then every field in the
    /// order of [`ChannelSnap`], each as fixed below.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(SNAP_VERSION);
        out.put_u8(match self.role {
            Role::Node => 0,
            Role::IoServer => 1,
        });
        out.put_u8(OPEN);
        out.put_u8(self.frozen.into());
        out.put_u8(self.version);
        put_opt(out, self.deadline, |out, age| out.put_i64(age));
        out.put_u64(self.next_ping);
        out.put_u32(self.next_req);
        out.put_u64(self.unanswered as u64);
        out.put_u64(self.input);
        let s = &self.stats;
        for n in [
            s.bytes_sent,
            s.bytes_received,
            s.credit_stalls,
            s.bytes_spliced,
            s.bytes_received_spliced,
            s.creditless_dropped,
            s.pings_received,
        ] {
            out.put_u64(n);
        }
        encode_conns(&self.conns, out);
        put_bytes(out, &self.inbuf);
        put_opt(out, self.partial, |out, (conn, left)| {
            out.put_u64(conn);
            out.put_u64(left as u64);
        });
        put_opt(out, self.liveness.as_ref(), |out, l| {
            out.put_u64(nanos(l.interval));
            out.put_u64(nanos(l.timeout));
            put_opt(out, l.heard_age, |out, age| out.put_i64(age));
            out.put_u64(l.heard);
            out.put_u8(l.pinged.into());
        });
        let o = &self.output;
        out.put_u8(o.hand_off.into());
        out.put_u32(o.sealed.len() as u32);
        for t in &o.sealed {
            put_bytes(out, &t.bytes);
            out.put_u64(t.spliced as u64);
        }
        put_bytes(out, &o.out);
        out.put_u32(self.events.len() as u32);
        for e in &self.events {
            encode_event(e, out);
        }
    }

    /// Decodes what [`ChannelSnap::encode`] wrote, all of `buf`.
    pub fn decode(buf: &[u8]) -> Result<ChannelSnap, SnapError> {
        let mut r = Reader::new(buf);
        let version = r.u32()?;
        if version != SNAP_VERSION {
            return Err(SnapError::Version(version));
        }
        let role = match r.u8()? {
            0 => Role::Node,
            1 => Role::IoServer,
            _ => return Err(SnapError::Malformed("unknown role")),
        };
        if r.u8()? != OPEN {
            return Err(SnapError::Malformed("a state other than open"));
        }
        let frozen = r.bool()?;
        let version = r.u8()?;
        let deadline = r.opt(Reader::i64)?;
        let next_ping = r.u64()?;
        let next_req = r.u32()?;
        let unanswered = r.usize()?;
        let input = r.u64()?;
        let stats = ChannelStats {
            bytes_sent: r.u64()?,
            bytes_received: r.u64()?,
            credit_stalls: r.u64()?,
            bytes_spliced: r.u64()?,
            bytes_received_spliced: r.u64()?,
            creditless_dropped: r.u64()?,
            pings_received: r.u64()?,
        };
        let conns = decode_conns(&mut r)?;
        let inbuf = r.bytes()?;
        let partial = r.opt(|r| {
            let conn = r.u64()?;
            match r.usize()? {
                0 => Err(SnapError::Malformed("a partial frame with nothing to come")),
                left => Ok((conn, left)),
            }
        })?;
        let liveness = r.opt(|r| {
            Ok(LivenessSnap {
                interval: Duration::from_nanos(r.u64()?),
                timeout: Duration::from_nanos(r.u64()?),
                heard_age: r.opt(Reader::i64)?,
                heard: r.u64()?,
                pinged: r.bool()?,
            })
        })?;
        let hand_off = r.bool()?;
        let mut sealed = Vec::new();
        for _ in 0..r.u32()? {
            let bytes = r.bytes()?;
            let spliced = r.usize()?;
            sealed.push(Transmit { bytes, spliced });
        }
        let out = r.bytes()?;
        let mut events = Vec::new();
        for _ in 0..r.u32()? {
            events.push(decode_event(&mut r)?);
        }
        if !r.rest().is_empty() {
            return Err(SnapError::Malformed("trailing bytes"));
        }
        Ok(ChannelSnap {
            role,
            frozen,
            version,
            deadline,
            next_ping,
            next_req,
            unanswered,
            input,
            stats,
            conns,
            inbuf,
            partial,
            liveness,
            output: OutputSnap {
                sealed,
                out,
                hand_off,
            },
            events,
        })
    }
}

fn encode_conns(t: &ConnsSnap, out: &mut BytesMut) {
    out.put_u64(t.next);
    out.put_u64(t.peer_window);
    out.put_u64(t.window);
    out.put_u32(t.conns.len() as u32);
    for c in &t.conns {
        out.put_u64(c.conn);
        let (sent, limit, window) = c.send.parts();
        let (received, consumed, buffer, reported) = c.recv.parts();
        for n in [sent, limit, window, received, consumed, buffer, reported] {
            out.put_u64(n);
        }
        out.put_u8(u8::from(c.fin_sent) | u8::from(c.fin_received) << 1);
    }
    out.put_u32(t.handed.len() as u32);
    for &conn in &t.handed {
        out.put_u64(conn);
    }
}

fn decode_conns(r: &mut Reader<'_>) -> Result<ConnsSnap, SnapError> {
    let next = r.u64()?;
    let peer_window = r.u64()?;
    let window = r.u64()?;
    let mut conns: Vec<ConnSnap> = Vec::new();
    for _ in 0..r.u32()? {
        let conn = r.u64()?;
        if conns.last().is_some_and(|last| last.conn >= conn) {
            return Err(SnapError::Malformed("connections not in id order"));
        }
        let send = SendCredit::from_parts(r.u64()?, r.u64()?, r.u64()?)
            .ok_or(SnapError::Malformed("an impossible send credit"))?;
        let recv = RecvCredit::from_parts(r.u64()?, r.u64()?, r.u64()?, r.u64()?)
            .ok_or(SnapError::Malformed("an impossible receive credit"))?;
        let flags = r.u8()?;
        if flags > 3 {
            return Err(SnapError::Malformed("unknown connection flags"));
        }
        conns.push(ConnSnap {
            conn,
            send,
            recv,
            fin_sent: flags & 1 != 0,
            fin_received: flags & 2 != 0,
        });
    }
    let mut handed: Vec<ConnId> = Vec::new();
    for _ in 0..r.u32()? {
        let conn = r.u64()?;
        if handed.last().is_some_and(|&last| last >= conn) {
            return Err(SnapError::Malformed("handed ids not in order"));
        }
        handed.push(conn);
    }
    Ok(ConnsSnap {
        conns,
        handed,
        next,
        peer_window,
        window,
    })
}

fn encode_event(e: &Event, out: &mut BytesMut) {
    match e {
        Event::NodeAuthenticated { node, weight } => {
            out.put_u8(tag::NODE_AUTHENTICATED);
            put_bytes(out, node.as_bytes());
            out.put_u32(*weight);
        }
        Event::Welcome { node_id } => {
            out.put_u8(tag::WELCOME);
            out.put_u32(*node_id);
        }
        Event::Request { req, request } => {
            out.put_u8(tag::REQUEST);
            let frame = Frame::Request {
                req: *req,
                request: request.clone(),
            };
            codec::encode(&frame, out);
        }
        Event::Response { req, response } => {
            out.put_u8(tag::RESPONSE);
            let frame = Frame::Response {
                req: *req,
                response: response.clone(),
            };
            codec::encode(&frame, out);
        }
        &Event::ConnectionAccepted {
            listener,
            conn,
            peer,
            local,
        } => {
            out.put_u8(tag::CONNECTION_ACCEPTED);
            let frame = Frame::ConnectionAccepted {
                listener,
                conn,
                peer,
                local,
            };
            codec::encode(&frame, out);
        }
        Event::ConnectionClosed { conn, errno } => {
            out.put_u8(tag::CONNECTION_CLOSED);
            out.put_u64(*conn);
            out.put_i32(*errno);
        }
        Event::Accepted { conn } => put_conn(out, tag::ACCEPTED, *conn),
        &Event::Connecting { conn, local } => {
            out.put_u8(tag::CONNECTING);
            codec::encode(&Frame::Connecting { conn, local }, out);
        }
        Event::MessageReceived { conn, data } => {
            put_conn(out, tag::MESSAGE_RECEIVED, *conn);
            put_bytes(out, data);
        }
        Event::MessageSpliced { conn, len } => {
            put_conn(out, tag::MESSAGE_SPLICED, *conn);
            out.put_u64(*len as u64);
        }
        Event::Fin { conn } => put_conn(out, tag::FIN, *conn),
        Event::BufferAvailable { conn } => put_conn(out, tag::BUFFER_AVAILABLE, *conn),
        Event::WeightChanged { weight } => {
            out.put_u8(tag::WEIGHT_CHANGED);
            out.put_u32(*weight);
        }
        // `Closed` is raised only as the channel closes, and a closed
        // channel is not snapshotted.
        Event::Closed { .. } => unreachable!("an open channel has raised no Closed"),
    }
}

fn decode_event(r: &mut Reader<'_>) -> Result<Event, SnapError> {
    Ok(match r.u8()? {
        tag::NODE_AUTHENTICATED => Event::NodeAuthenticated {
            node: String::from_utf8(r.bytes()?.to_vec())
                .map_err(|_| SnapError::Malformed("a node name not in UTF-8"))?,
            weight: r.u32()?,
        },
        tag::WELCOME => Event::Welcome { node_id: r.u32()? },
        tag::REQUEST => match frame(r)? {
            Frame::Request { req, request } => Event::Request { req, request },
            _ => return Err(SnapError::Malformed("a Request event of another frame")),
        },
        tag::RESPONSE => match frame(r)? {
            Frame::Response { req, response } => Event::Response { req, response },
            _ => return Err(SnapError::Malformed("a Response event of another frame")),
        },
        tag::CONNECTION_ACCEPTED => match frame(r)? {
            Frame::ConnectionAccepted {
                listener,
                conn,
                peer,
                local,
            } => Event::ConnectionAccepted {
                listener,
                conn,
                peer,
                local,
            },
            _ => return Err(SnapError::Malformed("an accepted event of another frame")),
        },
        tag::CONNECTION_CLOSED => Event::ConnectionClosed {
            conn: r.u64()?,
            errno: r.i32()?,
        },
        tag::ACCEPTED => Event::Accepted { conn: r.u64()? },
        tag::CONNECTING => match frame(r)? {
            Frame::Connecting { conn, local } => Event::Connecting { conn, local },
            _ => return Err(SnapError::Malformed("a Connecting event of another frame")),
        },
        tag::MESSAGE_RECEIVED => Event::MessageReceived {
            conn: r.u64()?,
            data: r.bytes()?,
        },
        tag::MESSAGE_SPLICED => Event::MessageSpliced {
            conn: r.u64()?,
            len: r.usize()?,
        },
        tag::FIN => Event::Fin { conn: r.u64()? },
        tag::BUFFER_AVAILABLE => Event::BufferAvailable { conn: r.u64()? },
        tag::WEIGHT_CHANGED => Event::WeightChanged { weight: r.u32()? },
        _ => return Err(SnapError::Malformed("unknown event tag")),
    })
}

fn put_conn(out: &mut BytesMut, t: u8, conn: ConnId) {
    out.put_u8(t);
    out.put_u64(conn);
}

/// How long before `now` `then` is, in nanoseconds (negative: after),
/// saturated at the range of an `i64` (292 years).
pub(super) fn age(now: Instant, then: Instant) -> i64 {
    match now.checked_duration_since(then) {
        Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        None => i64::try_from(then.duration_since(now).as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The instant `age` nanoseconds before `now` (after it when negative);
/// `None` out of the clock's range.
pub(super) fn at(now: Instant, age: i64) -> Option<Instant> {
    let d = Duration::from_nanos(age.unsigned_abs());
    if age >= 0 {
        now.checked_sub(d)
    } else {
        now.checked_add(d)
    }
}

/// A checked cursor over an encoded snapshot.
type Reader<'a> = Cursor<'a, SnapError>;

impl CursorError for SnapError {
    fn truncated() -> Self {
        SnapError::Truncated
    }
    fn malformed(what: &'static str) -> Self {
        SnapError::Malformed(what)
    }
}

/// One frame in the wire codec's encoding, its length first.
fn frame(r: &mut Reader<'_>) -> Result<Frame, SnapError> {
    let len = r.u32()? as usize;
    let body = r.take(len)?;
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32(len as u32);
    buf.put_slice(body);
    match codec::decode(&mut buf, len) {
        Ok(Some(frame)) => Ok(frame),
        _ => Err(SnapError::Malformed("a frame the codec refuses")),
    }
}

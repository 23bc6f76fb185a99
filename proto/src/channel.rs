//! The channel state machine: one per node, many SAPS connections (§2.1.1, §2.2).
//!
//! Sans-IO in the style of quinn-proto: bytes from the transport go in with
//! [`Channel::handle_input`], callbacks come out of [`Channel::poll_event`]
//! (`connection_accepted`, `connection_closed`, `message_received`,
//! `buffer_available`, plus requests and responses), bytes for the
//! transport come out of [`Channel::poll_transmit`], and time goes in with
//! [`Channel::handle_timeout`] when [`Channel::poll_timeout`] says. The
//! Forwarding Protocol calls are [`Channel::make_connection`],
//! [`Channel::close_connection`] and [`Channel::send_message`], or, to read
//! a socket straight into a frame, [`Channel::reserve`] then
//! [`Channel::commit`] (or [`Channel::commit_spliced`]). Each connection
//! has its own Appendix A credit in each direction (`channel/conns.rs`), so a
//! reader that stops stalls only its own connection.

mod config;
mod conns;
mod event;
mod handshake;
mod liveness;
mod output;
mod send;
mod snapshot;

pub use config::{
    ChannelConfig, Role, ACCEPTED_VERSION, CONNECTING_VERSION, DEFAULT_PEER_TIMEOUT,
    DEFAULT_PING_INTERVAL, DEFAULT_WINDOW, HANDSHAKE_MAX_FRAME, HANDSHAKE_TIMEOUT, MAX_DATA,
    MAX_VERSION, MIN_VERSION, RESET_VERSION,
};
pub use event::{CallError, ChannelError, Event};
pub use output::{Reservation, Transmit, OWNED_CAPACITY, OWNED_MIN};
pub use snapshot::{ChannelSnap, SnapError, SNAP_VERSION};

use crate::auth;
use crate::codec;
use crate::frame::{ConnId, Frame, ReqId, Request, Response};
use bytes::{Bytes, BytesMut};
use conns::ConnTable;
use handshake::State;
pub use liveness::SILENT_PEER;
use liveness::{Due, Liveness};
use output::Output;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

/// Linux's `ECONNRESET` (the fabric carries Linux errnos): the `errno` of
/// a [`Frame::Reset`].
const ECONNRESET: i32 = 104;

/// A Data frame whose header is in and whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct Partial {
    conn: ConnId,
    /// Payload octets still to come.
    left: usize,
}

/// A Data frame at least this large is delivered piece by piece as it
/// arrives: the start of its payload is not held back (and copied into the
/// next read's buffer) until the rest is in, and the transport's reader
/// may splice the rest ([`Channel::payload_pending`]).
pub const STREAM_MIN: usize = 16 * 1024;

/// Counters of one channel, for status output.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChannelStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Times a `send_message` found no credit.
    pub credit_stalls: u64,
    /// Of `bytes_sent`, payload spliced through the channel's pipe.
    pub bytes_spliced: u64,
    /// Of `bytes_received`, payload the reader spliced into connections'
    /// receive pipes.
    pub bytes_received_spliced: u64,
    /// Frames that take no credit and were dropped: a second Fin on a
    /// connection, a Fin for an unknown one, an empty Data frame.
    pub creditless_dropped: u64,
    /// Pings answered.
    pub pings_received: u64,
}

/// One end of a node channel.
pub struct Channel {
    role: Role,
    config: ChannelConfig,
    state: State,
    /// When the handshake must be done by ([`Channel::start`]).
    deadline: Option<Instant>,
    conns: ConnTable,
    /// The protocol version agreed in the handshake (0 before).
    version: u8,
    /// The token of the last liveness `Ping`.
    next_ping: u64,
    next_req: ReqId,
    inbuf: BytesMut,
    /// The Data frame being received piece by piece, if any.
    partial: Option<Partial>,
    output: Output,
    events: VecDeque<Event>,
    stats: ChannelStats,
    /// Octets of input so far, frames of every kind (what liveness hears).
    input: u64,
    liveness: Option<Liveness>,
    /// io-server end: requests raised and not answered yet.
    unanswered: usize,
    /// The sending calls lend nothing ([`Channel::freeze`]).
    frozen: bool,
}

impl Channel {
    /// The node end; it speaks first (Hello is queued for transmission).
    pub fn node(config: ChannelConfig) -> Self {
        let nonce = auth::nonce();
        let mut ch = Self::new(Role::Node, config, State::AwaitChallenge { nonce });
        ch.emit(&Frame::Hello {
            min_version: ch.config.min_version,
            max_version: ch.config.max_version,
            node: ch.config.node_name.clone(),
            weight: ch.config.weight,
            window: ch.config.window,
            nonce,
        });
        ch
    }

    /// The io-server end; it waits for the node's Hello.
    pub fn io_server(config: ChannelConfig) -> Self {
        Self::new(Role::IoServer, config, State::AwaitHello)
    }

    fn new(role: Role, config: ChannelConfig, state: State) -> Self {
        let first = match role {
            Role::Node => 2,
            Role::IoServer => 1,
        };
        Self {
            role,
            conns: ConnTable::new(first, config.window),
            liveness: Liveness::new(&config),
            input: 0,
            config,
            state,
            deadline: None,
            version: 0,
            next_ping: 0,
            next_req: 1,
            inbuf: BytesMut::new(),
            partial: None,
            output: Output::default(),
            events: VecDeque::new(),
            stats: ChannelStats::default(),
            unanswered: 0,
            frozen: false,
        }
    }

    /// Starts the handshake's clock at `now`: a channel not open by
    /// `now` + [`ChannelConfig::handshake_timeout`] closes at the first
    /// [`Channel::handle_timeout`] from then on.
    pub fn start(&mut self, now: Instant) {
        self.deadline = Some(now + self.config.handshake_timeout);
        if let Some(l) = self.liveness.as_mut() {
            l.start(now);
        }
    }

    /// When [`Channel::handle_timeout`] is next due: the handshake's
    /// deadline while it runs; once open, the next liveness check when
    /// [`ChannelConfig::peer_timeout`] is set (`liveness.rs`); `None`
    /// otherwise, once closed, or when the clock was never started.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Open => self.liveness.as_ref().and_then(|l| l.due()),
            _ => self.deadline,
        }
    }

    /// The time is `now`: closes a channel whose handshake is past its
    /// deadline, or an open one whose peer has been silent past
    /// [`ChannelConfig::peer_timeout`] (a `GoAway` with the reason is
    /// queued); pings a peer silent for [`ChannelConfig::ping_interval`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_open() {
            let input = self.input;
            let due = match self.liveness.as_mut() {
                Some(l) => l.on_timeout(now, input),
                None => Due::Nothing,
            };
            match due {
                Due::Nothing => {}
                Due::Ping => {
                    self.next_ping = self.next_ping.wrapping_add(1);
                    self.ping(self.next_ping);
                }
                Due::Dead => {
                    let secs = self
                        .liveness
                        .as_ref()
                        .map_or(0.0, |l| l.timeout().as_secs_f64());
                    self.close(&format!("{SILENT_PEER} {secs} s"));
                }
            }
            return;
        }
        if self.poll_timeout().is_some_and(|deadline| now >= deadline) {
            let secs = self.config.handshake_timeout.as_secs();
            self.close(&format!("authentication did not complete within {secs} s"));
        }
    }

    /// Whether [`Channel::poll_transmit`] gives chunks of [`OWNED_MIN`]
    /// octets or more as whole buffers rather than views of one, for a
    /// transport that hands each chunk on as it is (in memory): its reader
    /// then owns the buffer and decodes it in place.
    pub fn hand_off_buffers(&mut self, yes: bool) {
        self.output.hand_off_buffers(yes);
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// The protocol version the handshake agreed on (0 before it did).
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Whether the peer speaks [`Frame::Accepted`]: a node that does tells
    /// the io-server when its program accepts each connection.
    pub fn notifies_accepts(&self) -> bool {
        self.version >= ACCEPTED_VERSION
    }

    /// Whether the ends speak [`Frame::Reset`]: version 3, or one build in
    /// one process ([`ChannelConfig::in_process`]).
    pub fn speaks_reset(&self) -> bool {
        self.version >= RESET_VERSION || self.config.in_process
    }

    /// Whether the ends speak [`Frame::Connecting`]: version 4, or one
    /// build in one process ([`ChannelConfig::in_process`]).
    pub fn speaks_connecting(&self) -> bool {
        self.version >= CONNECTING_VERSION || self.config.in_process
    }

    /// Number of live connections in the table.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Feeds bytes from the transport. On a protocol error the channel
    /// closes (a `GoAway` with the reason is queued) and the error returns.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), ChannelError> {
        self.handle_input_buf(&mut BytesMut::from(bytes))
    }

    /// [`Channel::handle_input`] for octets in a buffer the caller gives
    /// up: when no partial frame is pending (the common case) the buffer
    /// itself becomes the input, so the payloads of its Data frames reach
    /// the relays without being copied again. `buf` is left empty.
    pub fn handle_input_buf(&mut self, buf: &mut BytesMut) -> Result<(), ChannelError> {
        if self.is_closed() {
            buf.clear();
            return Ok(());
        }
        self.input += buf.len() as u64;
        if let Some(p) = self.partial {
            let piece = buf.split_to(p.left.min(buf.len())).freeze();
            self.payload_piece(piece);
            if buf.is_empty() {
                return Ok(());
            }
        }
        if self.inbuf.is_empty() {
            std::mem::swap(&mut self.inbuf, buf);
        } else {
            self.inbuf.extend_from_slice(buf);
        }
        buf.clear();
        self.decode_input()
    }

    fn decode_input(&mut self) -> Result<(), ChannelError> {
        loop {
            // Before the channel is open the peer is a stranger: only the
            // handshake's small frames are awaited (and buffered).
            let max = if self.is_open() {
                self.config.max_frame
            } else {
                self.config.max_frame.min(HANDSHAKE_MAX_FRAME)
            };
            let frame = match codec::decode(&mut self.inbuf, max) {
                Ok(Some(f)) => f,
                Ok(None) => return self.begin_partial(),
                Err(e) => return Err(self.fail(e.into())),
            };
            if let Err(e) = self.handle_frame(frame) {
                return Err(self.fail(e));
            }
            if self.is_closed() {
                return Ok(());
            }
        }
    }

    /// When the input ends inside a large Data frame ([`STREAM_MIN`]):
    /// its header is taken, the frame is checked against the credit as a
    /// whole, what is in of its payload is delivered, and the rest is
    /// awaited as such.
    fn begin_partial(&mut self) -> Result<(), ChannelError> {
        if !self.is_open() {
            return Ok(());
        }
        let Some((conn, len)) = codec::peek_data(&self.inbuf) else {
            return Ok(());
        };
        if len < STREAM_MIN {
            return Ok(());
        }
        // `decode` found the frame incomplete, so its payload is not all in.
        bytes::Buf::advance(&mut self.inbuf, codec::DATA_OVERHEAD);
        if let Some(c) = self.conns.get_mut(conn) {
            if let Err(violation) = c.recv.on_received(len as u64) {
                return Err(self.fail(ChannelError::Credit { conn, violation }));
            }
        }
        self.partial = Some(Partial { conn, left: len });
        let piece = self.inbuf.split().freeze();
        self.payload_piece(piece);
        Ok(())
    }

    /// Takes `n` octets of the partial frame's payload off its count; the
    /// connection, when it is still known.
    fn payload_taken(&mut self, n: usize) -> Option<ConnId> {
        let p = self.partial.as_mut().expect("a partial Data frame");
        debug_assert!(n <= p.left, "more payload than the frame has");
        p.left -= n;
        let conn = p.conn;
        if p.left == 0 {
            self.partial = None;
        }
        self.stats.bytes_received += n as u64;
        // Data for a connection we already dropped is discarded.
        self.conns.contains(conn).then_some(conn)
    }

    fn payload_piece(&mut self, data: Bytes) {
        if let Some(conn) = self.payload_taken(data.len()) {
            if !data.is_empty() {
                self.events.push_back(Event::MessageReceived { conn, data });
            }
        }
    }

    /// The connection whose Data payload the input is in the middle of,
    /// and how many of its octets are still to come (the reader may
    /// splice up to that many into the connection's pipe, then report
    /// them with [`Channel::payload_spliced`]).
    pub fn payload_pending(&self) -> Option<(ConnId, usize)> {
        self.partial
            .filter(|p| !self.is_closed() && self.conns.contains(p.conn))
            .map(|p| (p.conn, p.left))
    }

    /// The reader spliced `len` octets of the pending payload (at most
    /// what [`Channel::payload_pending`] said) into the connection's pipe:
    /// raises [`Event::MessageSpliced`].
    pub fn payload_spliced(&mut self, len: usize) {
        if len == 0 || self.partial.is_none() {
            return;
        }
        self.stats.bytes_received_spliced += len as u64;
        self.input += len as u64;
        if let Some(conn) = self.payload_taken(len) {
            self.events.push_back(Event::MessageSpliced { conn, len });
        }
    }

    /// Next callback, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// What to write to the transport next, in order: bytes, then (when
    /// the shell spliced a payload into the channel's pipe) that many
    /// octets from the pipe.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.output.poll()
    }

    /// Gives back the part of a [`Transmit`] the shell did not write (its
    /// bytes not written, then its spliced octets still in the pipe): it
    /// goes out first, before anything queued since. For a shell that
    /// stops in the middle of a write (a freeze of its tasks), so that the
    /// channel's output, snapshot included, is exactly what the peer has
    /// not been sent.
    pub fn unpoll_transmit(&mut self, rest: Transmit) {
        self.output.unshift(rest);
    }

    /// Bytes queued for the transport (spliced payloads included).
    pub fn pending_transmit(&self) -> usize {
        self.output.pending()
    }

    /// Whether more than [`ChannelConfig::output_limit`] octets wait to go
    /// to the peer: the driver then stops reading until they drain.
    pub fn output_full(&self) -> bool {
        self.output.pending() > self.config.output_limit
    }

    /// Whether the driver should stop reading the peer for now: more than
    /// [`ChannelConfig::output_limit`] octets wait to go to it, or more
    /// than [`ChannelConfig::max_unanswered`] of its requests wait for
    /// their answer. Both fall as the peer reads and requests are
    /// answered.
    pub fn input_paused(&self) -> bool {
        self.output_full() || self.unanswered > self.config.max_unanswered
    }

    /// Closes the channel locally with `reason` (sent to the peer).
    pub fn close(&mut self, reason: &str) {
        if !self.is_closed() {
            self.fail(ChannelError::Local(reason.to_string()));
        }
    }

    /// The transport ended underneath us.
    pub fn transport_closed(&mut self, reason: &str) {
        if !self.is_closed() {
            self.state = State::Closed;
            self.conns.clear();
            self.events.push_back(Event::Closed {
                error: ChannelError::Local(reason.to_string()),
            });
        }
    }

    fn fail(&mut self, error: ChannelError) -> ChannelError {
        if !matches!(error, ChannelError::GoAway(_)) {
            self.emit(&Frame::GoAway {
                reason: error.to_string(),
            });
        }
        self.state = State::Closed;
        self.conns.clear();
        self.events.push_back(Event::Closed {
            error: error.clone(),
        });
        error
    }

    fn emit(&mut self, frame: &Frame) {
        self.output.emit(frame);
    }

    fn unexpected(&self, frame: &Frame) -> ChannelError {
        ChannelError::Unexpected {
            frame: frame.name(),
            state: self.state.describe(),
        }
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), ChannelError> {
        if let Frame::GoAway { reason } = frame {
            return Err(ChannelError::GoAway(reason));
        }
        if self.is_open() {
            return self.handle_open(frame);
        }
        let step = handshake::step(&mut self.state, &self.config, frame)?;
        if let Some((version, window)) = step.agreed {
            self.version = version;
            self.conns.set_peer_window(window);
        }
        if let Some(reply) = step.reply {
            self.emit(&reply);
        }
        self.events.extend(step.event);
        Ok(())
    }

    fn handle_open(&mut self, frame: Frame) -> Result<(), ChannelError> {
        let role = self.role;
        match frame {
            Frame::Data { conn, data } if data.is_empty() => {
                // Takes no credit and carries nothing: counted, not raised.
                let _ = conn;
                self.stats.creditless_dropped += 1;
            }
            Frame::Data { conn, data } => {
                self.stats.bytes_received += data.len() as u64;
                // Data for a connection we already dropped is discarded: the
                // peer sent it before it saw our Close.
                if let Some(c) = self.conns.get_mut(conn) {
                    c.recv
                        .on_received(data.len() as u64)
                        .map_err(|violation| ChannelError::Credit { conn, violation })?;
                    self.events.push_back(Event::MessageReceived { conn, data });
                }
            }
            Frame::Credit { conn, limit } => {
                if let Some(c) = self.conns.get_mut(conn) {
                    if c.send.on_credit(limit) {
                        self.events.push_back(Event::BufferAvailable { conn });
                    }
                }
            }
            Frame::Fin { conn } => match self.conns.get_mut(conn) {
                Some(c) if !c.fin_received => {
                    c.fin_received = true;
                    self.events.push_back(Event::Fin { conn });
                }
                // A second Fin, or one for a connection not (or no longer)
                // known: takes no credit, raises nothing.
                _ => self.stats.creditless_dropped += 1,
            },
            Frame::Ping { token } => {
                self.stats.pings_received += 1;
                self.emit(&Frame::Pong { token });
            }
            Frame::Pong { .. } => {}
            Frame::Request { req, request } if role == Role::IoServer => {
                self.unanswered += 1;
                self.events.push_back(Event::Request { req, request });
            }
            Frame::Weight { weight } if role == Role::IoServer => {
                handshake::check_weight(&self.config, weight)?;
                self.events.push_back(Event::WeightChanged { weight });
            }
            Frame::Close { conn } if role == Role::IoServer => {
                if self.conns.remove(conn) || self.conns.take_handed(conn) {
                    self.events
                        .push_back(Event::ConnectionClosed { conn, errno: 0 });
                }
            }
            Frame::Reset { conn } if role == Role::IoServer && self.speaks_reset() => {
                if self.conns.remove(conn) || self.conns.take_handed(conn) {
                    self.events.push_back(Event::ConnectionClosed {
                        conn,
                        errno: ECONNRESET,
                    });
                }
            }
            frame @ Frame::Reset { .. } if role == Role::IoServer => {
                return Err(ChannelError::Unexpected {
                    frame: frame.name(),
                    state: "on a channel below version 3",
                });
            }
            Frame::Accepted { conn } if role == Role::IoServer && self.notifies_accepts() => {
                // A late one (the connection is gone already) is dropped.
                if self.conns.contains(conn) || self.conns.take_handed(conn) {
                    self.events.push_back(Event::Accepted { conn });
                }
            }
            frame @ Frame::Accepted { .. } if role == Role::IoServer => {
                return Err(ChannelError::Unexpected {
                    frame: frame.name(),
                    state: "on a version 1 channel",
                });
            }
            Frame::Connecting { conn, local } if role == Role::Node && self.speaks_connecting() => {
                // A late one (the node abandoned the connect) is dropped.
                if self.conns.contains(conn) {
                    self.events.push_back(Event::Connecting { conn, local });
                }
            }
            frame @ Frame::Connecting { .. } if role == Role::Node => {
                return Err(ChannelError::Unexpected {
                    frame: frame.name(),
                    state: "on a channel below version 4",
                });
            }
            Frame::Response { req, response } if role == Role::Node => {
                self.events.push_back(Event::Response { req, response });
            }
            Frame::ConnectionAccepted {
                listener,
                conn,
                peer,
                local,
            } if role == Role::Node => {
                self.insert(conn);
                self.events.push_back(Event::ConnectionAccepted {
                    listener,
                    conn,
                    peer,
                    local,
                });
            }
            Frame::ConnectionClosed { conn, errno } if role == Role::Node => {
                // Kept in the table until the node closes it: an error is
                // reported at the next call (§2.3), data already received
                // is still delivered.
                if self.conns.contains(conn) {
                    self.events
                        .push_back(Event::ConnectionClosed { conn, errno });
                }
            }
            other => return Err(self.unexpected(&other)),
        }
        Ok(())
    }

    fn insert(&mut self, conn: ConnId) {
        self.conns.insert(conn);
    }

    fn open_check(&self) -> Result<(), CallError> {
        if self.is_open() {
            Ok(())
        } else {
            Err(CallError::NotOpen)
        }
    }

    /// io-server end: welcome the authenticated node as `node_id`.
    pub fn welcome(&mut self, node_id: u32) {
        if self.is_open() {
            self.emit(&Frame::Welcome { node_id });
        }
    }

    /// `make_connection`: allocates a connection id with fresh credits. On a
    /// node this is the virtual socket's tag (before Connect/Listen); on the
    /// io-server it is an accepted client connection, announced with
    /// [`Channel::accept_connection`].
    pub fn make_connection(&mut self) -> Result<ConnId, CallError> {
        self.open_check()?;
        let conn = self.conns.allocate();
        self.insert(conn);
        Ok(conn)
    }

    /// io-server end: registers a node-allocated connection id (after a
    /// successful Connect) so data may flow on it.
    pub fn open_connection(&mut self, conn: ConnId) -> Result<(), CallError> {
        self.open_check()?;
        if !self.conns.contains(conn) {
            self.insert(conn);
        }
        Ok(())
    }

    /// io-server end: a client connected to a port `listener` listens on.
    pub fn accept_connection(
        &mut self,
        listener: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<ConnId, CallError> {
        let conn = self.make_connection()?;
        self.emit(&Frame::ConnectionAccepted {
            listener,
            conn,
            peer,
            local,
        });
        Ok(conn)
    }

    /// io-server end: an id for a client connection handed to the node as
    /// a socket (zero-relay), whose [`Frame::Accepted`] or `Close` the
    /// node sends with it ([`Event::Accepted`], or
    /// [`Event::ConnectionClosed`]). Ids come from the same sequence as
    /// every connection's, so they are never reused on the channel.
    pub fn hand_connection(&mut self) -> Result<ConnId, CallError> {
        self.open_check()?;
        Ok(self.conns.hand())
    }

    /// io-server end: forgets a handed-over id whose socket never left.
    pub fn forget_handed(&mut self, conn: ConnId) {
        self.conns.take_handed(conn);
    }

    /// Node end: the program accepted `conn` (a relayed connection's tag,
    /// or the io-server's id of a handed-over one). Sends
    /// [`Frame::Accepted`] where the io-server speaks it; a no-op on a
    /// version 1 or closed channel.
    pub fn accepted(&mut self, conn: ConnId) {
        if self.role == Role::Node && self.is_open() && self.notifies_accepts() {
            self.emit(&Frame::Accepted { conn });
        }
    }

    /// `close_connection`: drops `conn`. A node sends `Close`, or `Reset`
    /// for a connection ended with an error (`errno` not 0: a reset, a
    /// client its listener refused, an I/O error on the program's end)
    /// where the io-server speaks it; the
    /// io-server sends `ConnectionClosed` with `errno` (0 for a plain
    /// close).
    pub fn close_connection(&mut self, conn: ConnId, errno: i32) {
        if !self.is_open() {
            return;
        }
        let known = self.conns.remove(conn);
        match self.role {
            Role::Node if errno != 0 && self.speaks_reset() => self.emit(&Frame::Reset { conn }),
            Role::Node => self.emit(&Frame::Close { conn }),
            Role::IoServer if known => self.emit(&Frame::ConnectionClosed { conn, errno }),
            Role::IoServer => {}
        }
    }

    /// io-server end: the node's outbound connect of `conn` is in flight
    /// from `local` ([`Frame::Connecting`]), sent before its `Response`
    /// where the node speaks it; a no-op on a channel below version 4 or
    /// closed. Whether it was sent.
    pub fn connecting(&mut self, conn: ConnId, local: SocketAddr) -> bool {
        let sent = self.role == Role::IoServer && self.is_open() && self.speaks_connecting();
        if sent {
            self.emit(&Frame::Connecting { conn, local });
        }
        sent
    }

    /// io-server end: report an error on a connection the node still holds
    /// (§2.3) without forgetting it.
    pub fn report_error(&mut self, conn: ConnId, errno: i32) {
        if self.is_open() && self.conns.contains(conn) {
            self.emit(&Frame::ConnectionClosed { conn, errno });
        }
    }

    /// Whether `conn` is in the table.
    pub fn has_connection(&self, conn: ConnId) -> bool {
        self.conns.contains(conn)
    }

    /// Octets received on `conn` and not yet consumed.
    pub fn buffered(&self, conn: ConnId) -> u64 {
        self.conns.get(conn).map_or(0, |c| c.recv.buffered())
    }

    /// The application took `n` octets of `conn` out of the receive buffer;
    /// sends a `Credit` when Appendix A's rule says so.
    pub fn consumed(&mut self, conn: ConnId, n: usize) {
        if !self.is_open() {
            return;
        }
        if let Some(limit) = self
            .conns
            .get_mut(conn)
            .and_then(|c| c.recv.on_consumed(n as u64))
        {
            self.emit(&Frame::Credit { conn, limit });
        }
    }

    /// Node end: sends a Figure 3 request; the answer arrives as
    /// `Event::Response` with the returned id.
    pub fn request(&mut self, request: Request) -> Result<ReqId, CallError> {
        self.open_check()?;
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        self.emit(&Frame::Request { req, request });
        Ok(req)
    }

    /// io-server end: answers request `req`.
    pub fn respond(&mut self, req: ReqId, response: Response) {
        self.unanswered = self.unanswered.saturating_sub(1);
        if self.is_open() {
            self.emit(&Frame::Response { req, response });
        }
    }

    /// Node end: announces a new weight (0 drains this node).
    pub fn set_weight(&mut self, weight: u32) {
        if self.is_open() {
            self.config.weight = weight;
            self.emit(&Frame::Weight { weight });
        }
    }

    /// Sends a liveness probe.
    pub fn ping(&mut self, token: u64) {
        if self.is_open() {
            self.emit(&Frame::Ping { token });
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;
#[cfg(test)]
mod tests_snapshot;

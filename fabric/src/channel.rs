//! The channel state machine: one per node, many SAPS connections (§2.1.1, §2.2).
//!
//! Sans-IO in the style of quinn-proto: bytes from the transport go in with
//! [`Channel::handle_input`], callbacks come out of [`Channel::poll_event`]
//! (`connection_accepted`, `connection_closed`, `message_received`,
//! `buffer_available`, plus requests and responses), and bytes for the
//! transport come out of [`Channel::poll_transmit`]. The Forwarding Protocol
//! calls are [`Channel::make_connection`], [`Channel::close_connection`] and
//! [`Channel::send_message`]. Each connection has its own Appendix A credit in
//! each direction, so a reader that stops stalls only its own connection.

use crate::auth::{self, Prover};
use crate::codec::{self, DecodeError, DEFAULT_MAX_FRAME};
use crate::credit::{CreditViolation, RecvCredit, SendCredit};
use crate::frame::{ConnId, Frame, ReqId, Request, Response, NONCE_LEN};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

/// Protocol versions this build speaks. Version 2 adds the node's
/// `Accepted` notification (the io-server re-dispatches a node's
/// connections its program had not accepted when its channel ends) and
/// the tracked hand-off header (`handoff::side`); a version 1 peer gets
/// neither, and its connections are reset with it as before.
pub const MIN_VERSION: u8 = 1;
pub const MAX_VERSION: u8 = 2;
/// The first protocol version with [`Frame::Accepted`].
pub const ACCEPTED_VERSION: u8 = 2;
/// Default per-connection receive buffer `B_r`. A relayed stream moves at
/// most `B_r` per credit round trip (two relays and the fabric on the way
/// back); one iperf3 stream through a node moved faster with each doubling
/// up to 1 MiB (bench/notes/2026-12-01-sessions-5-to-8.md, "`B_r` 1 MiB
/// instead of 256 KiB"). It is
/// also what a stalled reader may hold in user space per direction; an
/// idle connection holds none of it.
pub const DEFAULT_WINDOW: u32 = 1024 * 1024;
/// Largest payload of one `Data` frame (the decoder's default frame limit,
/// 256 KiB + 64, holds it). A relay reads at most this much per call:
/// iperf3 -P 1 through a node over unix gave 8.6–10.3 Gbit/s with 64 KiB
/// and 9.6–11.4 with 256 KiB, the io-server spending 27 % less CPU per GiB.
pub const MAX_DATA: usize = 256 * 1024;

/// One piece of a channel's output ([`Channel::poll_transmit_any`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Whole frames, or the start of one whose payload is spliced next.
    Bytes(Bytes),
    /// This many octets of payload, to move from the channel's pipe.
    Spliced(usize),
}

/// Which end of the channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An application node (saps-run's supervisor).
    Node,
    /// The io-server.
    IoServer,
}

/// Chunks smaller than this are given as views (see
/// [`Channel::poll_transmit_owned`]).
pub const OWNED_MIN: usize = 16 * 1024;

/// Most capacity a new output buffer starts with after
/// [`Channel::poll_transmit_owned`]: room for two full Data frames, so a
/// buffer that once grew large is not allocated that large for every
/// chunk after.
pub const OWNED_CAPACITY: usize = 2 * (MAX_DATA + codec::DATA_OVERHEAD);

/// Settings of one channel end.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The shared secret both ends prove.
    pub token: Vec<u8>,
    /// `B_r` this end grants every connection.
    pub window: u32,
    /// Largest frame accepted from the peer.
    pub max_frame: usize,
    pub min_version: u8,
    pub max_version: u8,
    /// Node only: the name and weight it announces.
    pub node_name: String,
    pub weight: u32,
}

impl ChannelConfig {
    pub fn new(token: impl Into<Vec<u8>>) -> Self {
        Self {
            token: token.into(),
            window: DEFAULT_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            node_name: String::new(),
            weight: 1,
        }
    }

    pub fn node(mut self, name: impl Into<String>, weight: u32) -> Self {
        self.node_name = name.into();
        self.weight = weight;
        self
    }

    pub fn window(mut self, window: u32) -> Self {
        self.window = window;
        self
    }
}

/// Why a channel closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("authentication failed: the node did not prove the token")]
    BadToken,
    #[error("authentication failed: the io-server did not prove the token")]
    BadServerProof,
    #[error("version mismatch: node speaks {node_min}..={node_max}, io-server speaks {server_min}..={server_max}")]
    VersionMismatch {
        node_min: u8,
        node_max: u8,
        server_min: u8,
        server_max: u8,
    },
    #[error("unexpected {frame} frame {state}")]
    Unexpected {
        frame: &'static str,
        state: &'static str,
    },
    #[error("flow control violated on connection {conn}: {violation}")]
    Credit {
        conn: ConnId,
        violation: CreditViolation,
    },
    #[error("peer closed the channel: {0}")]
    GoAway(String),
    #[error("closed locally: {0}")]
    Local(String),
}

/// Errors of the Forwarding Protocol calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("no such connection {0}")]
    UnknownConnection(ConnId),
    #[error("the channel is not open")]
    NotOpen,
    #[error("connection {0} already sent FIN")]
    AfterFin(ConnId),
}

/// The callbacks of §2.1.1, plus what Figure 3 adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// io-server end: the node proved the token and is open.
    NodeAuthenticated { node: String, weight: u32 },
    /// Node end: the io-server proved the token and welcomed us.
    Welcome { node_id: u32 },
    /// io-server end: a Figure 3 request; answer with [`Channel::respond`].
    Request { req: ReqId, request: Request },
    /// Node end: the answer to [`Channel::request`].
    Response { req: ReqId, response: Response },
    /// `connection_accepted`: a client connection for one of our listeners.
    ConnectionAccepted {
        listener: ConnId,
        conn: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
    },
    /// `connection_closed`: the peer dropped the connection (`errno` 0: plain close).
    ConnectionClosed { conn: ConnId, errno: i32 },
    /// io-server end: the node's program accepted `conn` (a relayed
    /// connection, or one handed over with [`Channel::hand_connection`]).
    Accepted { conn: ConnId },
    /// `message_received`: stream bytes; call [`Channel::consumed`] once delivered.
    MessageReceived { conn: ConnId, data: Bytes },
    /// `message_received` for `len` octets the transport's reader spliced
    /// into the connection's pipe ([`Channel::payload_spliced`]); call
    /// [`Channel::consumed`] once they are delivered.
    MessageSpliced { conn: ConnId, len: usize },
    /// The peer's end of the stream: no more `MessageReceived` for `conn`.
    Fin { conn: ConnId },
    /// `buffer_available`: `conn` may send again.
    BufferAvailable { conn: ConnId },
    /// io-server end: the node changed its weight.
    WeightChanged { weight: u32 },
    /// The channel is closed; nothing more will happen on it.
    Closed { error: ChannelError },
}

#[derive(Debug)]
enum State {
    /// io-server: waiting for the node's Hello.
    AwaitHello,
    /// Node: Hello sent with this nonce.
    AwaitChallenge {
        nonce: [u8; NONCE_LEN],
    },
    /// io-server: Challenge sent; waiting for the node's proof.
    AwaitAuth {
        node_nonce: [u8; NONCE_LEN],
        server_nonce: [u8; NONCE_LEN],
        node: String,
        weight: u32,
    },
    /// Node: proof sent; waiting for Welcome.
    AwaitWelcome,
    Open,
    Closed,
}

impl State {
    fn describe(&self) -> &'static str {
        match self {
            State::AwaitHello => "before Hello",
            State::AwaitChallenge { .. } => "before Challenge",
            State::AwaitAuth { .. } => "before Auth",
            State::AwaitWelcome => "before Welcome",
            State::Open => "on an open channel",
            State::Closed => "after close",
        }
    }
}

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

/// Per-connection state: both directions' credits and the FIN flags.
#[derive(Debug)]
struct Conn {
    send: SendCredit,
    recv: RecvCredit,
    fin_sent: bool,
}

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
}

/// One end of a node channel.
pub struct Channel {
    role: Role,
    config: ChannelConfig,
    state: State,
    /// The peer's `B_r`: our initial `L_s` for every connection.
    peer_window: u64,
    conns: HashMap<ConnId, Conn>,
    /// io-server end: ids of connections handed over as sockets whose
    /// `Accepted` or `Close` has not come yet.
    handed: HashSet<ConnId>,
    /// The protocol version agreed in the handshake (0 before).
    version: u8,
    next_conn: ConnId,
    next_req: ReqId,
    inbuf: BytesMut,
    /// The Data frame being received piece by piece, if any.
    partial: Option<Partial>,
    out: BytesMut,
    /// Output finished before a spliced payload, in order, ahead of `out`
    /// (empty unless payloads are spliced: see [`crate::splice`]).
    sealed: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: ChannelStats,
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
        Self {
            role,
            config,
            state,
            peer_window: 0,
            conns: HashMap::new(),
            handed: HashSet::new(),
            version: 0,
            next_conn: match role {
                Role::Node => 2,
                Role::IoServer => 1,
            },
            next_req: 1,
            inbuf: BytesMut::new(),
            partial: None,
            out: BytesMut::new(),
            sealed: VecDeque::new(),
            events: VecDeque::new(),
            stats: ChannelStats::default(),
        }
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
            let frame = match codec::decode(&mut self.inbuf, self.config.max_frame) {
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
        if let Some(c) = self.conns.get_mut(&conn) {
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
        self.conns.contains_key(&conn).then_some(conn)
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
            .filter(|p| !self.is_closed() && self.conns.contains_key(&p.conn))
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
        if let Some(conn) = self.payload_taken(len) {
            self.events.push_back(Event::MessageSpliced { conn, len });
        }
    }

    /// Next callback, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to write to the transport, if any. Only for a channel whose
    /// payloads are never spliced (else see [`Channel::poll_transmit_any`]).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        match self.sealed.pop_front() {
            Some(Transmit::Bytes(b)) => Some(b),
            Some(Transmit::Spliced(_)) => {
                unreachable!("a spliced payload taken with poll_transmit")
            }
            None => (!self.out.is_empty()).then(|| self.out.split().freeze()),
        }
    }

    /// What to send next: bytes, or the next spliced payload's length (the
    /// writer moves that many octets from the channel's pipe). `owned` as
    /// for [`Channel::poll_transmit_owned`].
    pub fn poll_transmit_any(&mut self, owned: bool) -> Option<Transmit> {
        if let Some(t) = self.sealed.pop_front() {
            return Some(t);
        }
        let b = if owned {
            self.poll_transmit_owned()
        } else {
            self.poll_transmit()
        };
        b.map(Transmit::Bytes)
    }

    /// [`Channel::poll_transmit`], giving up the whole output buffer rather
    /// than a view of it, for a transport that hands the chunk on as it is
    /// (in memory): its reader then owns the buffer and decodes it in
    /// place. Only for chunks of [`OWNED_MIN`] octets or more: for smaller
    /// ones a fresh buffer per chunk cost more than the reader's copy (the
    /// fabric microbenchmark's 1 KiB messages in memory went from about
    /// 1 400 to 800–1 000 MB/s). The next buffer starts with the same
    /// capacity (up to [`OWNED_CAPACITY`]), so a busy channel does not grow
    /// it (and copy what it holds) again for every chunk.
    pub fn poll_transmit_owned(&mut self) -> Option<Bytes> {
        if !self.sealed.is_empty() || self.out.len() < OWNED_MIN {
            // Small: the reader's copy costs less than a new buffer.
            return self.poll_transmit();
        }
        let next = BytesMut::with_capacity(self.out.capacity().min(OWNED_CAPACITY));
        Some(std::mem::replace(&mut self.out, next).freeze())
    }

    /// Bytes queued for the transport (spliced payloads included).
    pub fn pending_transmit(&self) -> usize {
        self.out.len()
            + self
                .sealed
                .iter()
                .map(|t| match t {
                    Transmit::Bytes(b) => b.len(),
                    Transmit::Spliced(n) => *n,
                })
                .sum::<usize>()
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
            self.handed.clear();
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
        self.handed.clear();
        self.events.push_back(Event::Closed {
            error: error.clone(),
        });
        error
    }

    fn emit(&mut self, frame: &Frame) {
        codec::encode(frame, &mut self.out);
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
        match (&self.state, frame) {
            (State::Open, frame) => self.handle_open(frame),
            (
                State::AwaitHello,
                Frame::Hello {
                    min_version,
                    max_version,
                    node,
                    weight,
                    window,
                    nonce,
                },
            ) => {
                let version = max_version.min(self.config.max_version);
                if version < min_version.max(self.config.min_version) {
                    return Err(ChannelError::VersionMismatch {
                        node_min: min_version,
                        node_max: max_version,
                        server_min: self.config.min_version,
                        server_max: self.config.max_version,
                    });
                }
                self.peer_window = u64::from(window);
                self.version = version;
                let server_nonce = auth::nonce();
                let proof =
                    auth::prove(&self.config.token, Prover::IoServer, &nonce, &server_nonce);
                self.emit(&Frame::Challenge {
                    version,
                    window: self.config.window,
                    nonce: server_nonce,
                    proof,
                });
                self.state = State::AwaitAuth {
                    node_nonce: nonce,
                    server_nonce,
                    node,
                    weight,
                };
                Ok(())
            }
            (
                State::AwaitChallenge { nonce },
                Frame::Challenge {
                    version,
                    window,
                    nonce: server_nonce,
                    proof,
                },
            ) => {
                if version < self.config.min_version || version > self.config.max_version {
                    return Err(ChannelError::VersionMismatch {
                        node_min: self.config.min_version,
                        node_max: self.config.max_version,
                        server_min: version,
                        server_max: version,
                    });
                }
                let token = &self.config.token;
                if !auth::verify(token, Prover::IoServer, nonce, &server_nonce, &proof) {
                    return Err(ChannelError::BadServerProof);
                }
                let proof = auth::prove(token, Prover::Node, nonce, &server_nonce);
                self.peer_window = u64::from(window);
                self.version = version;
                self.emit(&Frame::Auth { proof });
                self.state = State::AwaitWelcome;
                Ok(())
            }
            (
                State::AwaitAuth {
                    node_nonce,
                    server_nonce,
                    ..
                },
                Frame::Auth { proof },
            ) => {
                let token = &self.config.token;
                if !auth::verify(token, Prover::Node, node_nonce, server_nonce, &proof) {
                    return Err(ChannelError::BadToken);
                }
                let State::AwaitAuth { node, weight, .. } =
                    std::mem::replace(&mut self.state, State::Open)
                else {
                    unreachable!("matched above")
                };
                self.events
                    .push_back(Event::NodeAuthenticated { node, weight });
                Ok(())
            }
            (State::AwaitWelcome, Frame::Welcome { node_id }) => {
                self.state = State::Open;
                self.events.push_back(Event::Welcome { node_id });
                Ok(())
            }
            (_, frame) => Err(self.unexpected(&frame)),
        }
    }

    fn handle_open(&mut self, frame: Frame) -> Result<(), ChannelError> {
        let role = self.role;
        match frame {
            Frame::Data { conn, data } => {
                self.stats.bytes_received += data.len() as u64;
                // Data for a connection we already dropped is discarded: the
                // peer sent it before it saw our Close.
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.recv
                        .on_received(data.len() as u64)
                        .map_err(|violation| ChannelError::Credit { conn, violation })?;
                    self.events.push_back(Event::MessageReceived { conn, data });
                }
            }
            Frame::Credit { conn, limit } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.send.on_credit(limit) {
                        self.events.push_back(Event::BufferAvailable { conn });
                    }
                }
            }
            Frame::Fin { conn } => {
                if self.conns.contains_key(&conn) {
                    self.events.push_back(Event::Fin { conn });
                }
            }
            Frame::Ping { token } => self.emit(&Frame::Pong { token }),
            Frame::Pong { .. } => {}
            Frame::Request { req, request } if role == Role::IoServer => {
                self.events.push_back(Event::Request { req, request });
            }
            Frame::Weight { weight } if role == Role::IoServer => {
                self.events.push_back(Event::WeightChanged { weight });
            }
            Frame::Close { conn } if role == Role::IoServer => {
                if self.conns.remove(&conn).is_some() || self.handed.remove(&conn) {
                    self.events
                        .push_back(Event::ConnectionClosed { conn, errno: 0 });
                }
            }
            Frame::Accepted { conn } if role == Role::IoServer && self.notifies_accepts() => {
                // A late one (the connection is gone already) is dropped.
                if self.conns.contains_key(&conn) || self.handed.remove(&conn) {
                    self.events.push_back(Event::Accepted { conn });
                }
            }
            frame @ Frame::Accepted { .. } if role == Role::IoServer => {
                return Err(ChannelError::Unexpected {
                    frame: frame.name(),
                    state: "on a version 1 channel",
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
                if self.conns.contains_key(&conn) {
                    self.events
                        .push_back(Event::ConnectionClosed { conn, errno });
                }
            }
            other => return Err(self.unexpected(&other)),
        }
        Ok(())
    }

    fn insert(&mut self, conn: ConnId) {
        let window = u64::from(self.config.window);
        self.conns.insert(
            conn,
            Conn {
                send: SendCredit::new(self.peer_window),
                recv: RecvCredit::new(window),
                fin_sent: false,
            },
        );
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
        let conn = self.next_conn;
        self.next_conn += 2;
        self.insert(conn);
        Ok(conn)
    }

    /// io-server end: registers a node-allocated connection id (after a
    /// successful Connect) so data may flow on it.
    pub fn open_connection(&mut self, conn: ConnId) -> Result<(), CallError> {
        self.open_check()?;
        if !self.conns.contains_key(&conn) {
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
        let conn = self.next_conn;
        self.next_conn += 2;
        self.handed.insert(conn);
        Ok(conn)
    }

    /// io-server end: forgets a handed-over id whose socket never left.
    pub fn forget_handed(&mut self, conn: ConnId) {
        self.handed.remove(&conn);
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

    /// `close_connection`: drops `conn`. A node sends `Close`; the
    /// io-server sends `ConnectionClosed` with `errno` (0 for a plain close).
    pub fn close_connection(&mut self, conn: ConnId, errno: i32) {
        if !self.is_open() {
            return;
        }
        let known = self.conns.remove(&conn).is_some();
        match self.role {
            Role::Node => self.emit(&Frame::Close { conn }),
            Role::IoServer if known => self.emit(&Frame::ConnectionClosed { conn, errno }),
            Role::IoServer => {}
        }
    }

    /// io-server end: report an error on a connection the node still holds
    /// (§2.3) without forgetting it.
    pub fn report_error(&mut self, conn: ConnId, errno: i32) {
        if self.is_open() && self.conns.contains_key(&conn) {
            self.emit(&Frame::ConnectionClosed { conn, errno });
        }
    }

    /// Whether `conn` is in the table.
    pub fn has_connection(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// `send_message`: queues as much of `data` as the peer's credit allows
    /// and returns how much. 0 means wait for `BufferAvailable`.
    pub fn send_message(&mut self, conn: ConnId, data: &[u8]) -> Result<usize, CallError> {
        let n = data.len().min(self.send_room(conn)?);
        if n == 0 {
            if !data.is_empty() {
                self.stats.credit_stalls += 1;
            }
            return Ok(0);
        }
        for chunk in data[..n].chunks(MAX_DATA) {
            codec::encode_data(conn, chunk, &mut self.out);
        }
        self.sent(conn, n);
        Ok(n)
    }

    /// Octets `conn` may send now; an error if it may not send at all.
    fn send_room(&self, conn: ConnId) -> Result<usize, CallError> {
        self.open_check()?;
        let c = self
            .conns
            .get(&conn)
            .ok_or(CallError::UnknownConnection(conn))?;
        if c.fin_sent {
            return Err(CallError::AfterFin(conn));
        }
        Ok(c.send.available() as usize)
    }

    /// Counts `n` octets queued on `conn` against its credit.
    fn sent(&mut self, conn: ConnId, n: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.send.on_sent(n as u64);
        }
        self.stats.bytes_sent += n as u64;
    }

    /// [`Channel::send_message`] with the payload written straight into
    /// the channel's output by `fill` (a socket's read): at most `limit`
    /// octets, the send window and [`MAX_DATA`]. `None`: the window is
    /// shut, and `fill` was not called.
    pub fn send_message_with<T>(
        &mut self,
        conn: ConnId,
        limit: usize,
        fill: impl FnOnce(&mut tokio::io::ReadBuf<'_>) -> T,
    ) -> Result<Option<(usize, T)>, CallError> {
        let Some(room) = self.frame_room(conn, limit)? else {
            return Ok(None);
        };
        let (n, t) = codec::encode_data_with(conn, room, &mut self.out, fill);
        self.sent(conn, n);
        Ok(Some((n, t)))
    }

    /// [`Channel::send_message_with`] for a payload that `fill` splices
    /// into the channel's pipe, at most `limit` octets, the window and
    /// [`MAX_DATA`]: the frame's header is queued with what came before it,
    /// then a [`Transmit::Spliced`] of the octets `fill` moved. `None`: the
    /// window is shut, and `fill` was not called.
    pub fn send_message_spliced<T>(
        &mut self,
        conn: ConnId,
        limit: usize,
        fill: impl FnOnce(usize) -> (usize, T),
    ) -> Result<Option<(usize, T)>, CallError> {
        let Some(room) = self.frame_room(conn, limit)? else {
            return Ok(None);
        };
        let (n, t) = fill(room);
        if n > 0 {
            codec::encode_data_header(conn, n, &mut self.out);
            self.sealed
                .push_back(Transmit::Bytes(self.out.split().freeze()));
            self.sealed.push_back(Transmit::Spliced(n));
            self.sent(conn, n);
            self.stats.bytes_spliced += n as u64;
        }
        Ok(Some((n, t)))
    }

    /// The most one Data frame on `conn` may carry now: `limit`, the
    /// window and [`MAX_DATA`]; `None` (a credit stall, counted) when the
    /// window is shut.
    fn frame_room(&mut self, conn: ConnId, limit: usize) -> Result<Option<usize>, CallError> {
        let room = limit.min(self.send_room(conn)?).min(MAX_DATA);
        if room == 0 {
            self.stats.credit_stalls += 1;
            return Ok(None);
        }
        Ok(Some(room))
    }

    /// Octets `conn` may send now (`L_s - A_s`).
    pub fn send_window(&self, conn: ConnId) -> usize {
        self.conns
            .get(&conn)
            .map_or(0, |c| c.send.available() as usize)
    }

    /// Octets received on `conn` and not yet consumed.
    pub fn buffered(&self, conn: ConnId) -> u64 {
        self.conns.get(&conn).map_or(0, |c| c.recv.buffered())
    }

    /// Ends our direction of `conn` after the data queued so far.
    pub fn send_fin(&mut self, conn: ConnId) -> Result<(), CallError> {
        self.open_check()?;
        let c = self
            .conns
            .get_mut(&conn)
            .ok_or(CallError::UnknownConnection(conn))?;
        if !c.fin_sent {
            c.fin_sent = true;
            self.emit(&Frame::Fin { conn });
        }
        Ok(())
    }

    /// The application took `n` octets of `conn` out of the receive buffer;
    /// sends a `Credit` when Appendix A's rule says so.
    pub fn consumed(&mut self, conn: ConnId, n: usize) {
        if !self.is_open() {
            return;
        }
        if let Some(limit) = self
            .conns
            .get_mut(&conn)
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

//! What a channel tells its owner: the callbacks of §2.1.1 ([`Event`]), why
//! it closed ([`ChannelError`]), and why a Forwarding Protocol call was
//! refused ([`CallError`]).

use crate::codec::DecodeError;
use crate::credit::CreditViolation;
use crate::frame::{ConnId, ReqId, Request, Response};
use bytes::Bytes;
use std::net::SocketAddr;

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
    #[error("{what} {asked} is above the io-server's cap of {cap} ({flag})")]
    AboveCap {
        what: &'static str,
        asked: u64,
        cap: u64,
        flag: &'static str,
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
    /// io-server end: a Figure 3 request; answer with [`Channel::respond`](crate::Channel::respond).
    Request { req: ReqId, request: Request },
    /// Node end: the answer to [`Channel::request`](crate::Channel::request).
    Response { req: ReqId, response: Response },
    /// `connection_accepted`: a client connection for one of our listeners.
    ConnectionAccepted {
        listener: ConnId,
        conn: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
    },
    /// Node end: the outbound connect of `conn` is in flight from `local`
    /// (the io-server's address and the port its socket got; protocol
    /// version 4), before its [`Event::Response`].
    Connecting { conn: ConnId, local: SocketAddr },
    /// `connection_closed`: the peer dropped the connection (`errno` 0: plain close).
    ConnectionClosed { conn: ConnId, errno: i32 },
    /// io-server end: the node's program accepted `conn` (a relayed
    /// connection, or one handed over with [`Channel::hand_connection`](crate::Channel::hand_connection)).
    Accepted { conn: ConnId },
    /// `message_received`: stream bytes; call [`Channel::consumed`](crate::Channel::consumed) once delivered.
    MessageReceived { conn: ConnId, data: Bytes },
    /// `message_received` for `len` octets the transport's reader spliced
    /// into the connection's pipe ([`Channel::payload_spliced`](crate::Channel::payload_spliced)); call
    /// [`Channel::consumed`](crate::Channel::consumed) once they are delivered.
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

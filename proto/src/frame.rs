//! Frames of the Forwarding Protocol (SAPS paper §2.1.1 and Figure 3).
//!
//! One frame type per row of the Figure 3 table in DESIGN.md, plus the
//! channel-level frames for authentication (`Hello`/`Challenge`/`Auth`/
//! `Welcome`), flow control (`Credit`, Appendix A) and orderly teardown
//! (`GoAway`). Frames are plain data; `codec.rs` turns them into bytes.

use bytes::Bytes;
use std::net::SocketAddr;

/// A SAPS connection tag. Every frame about a connection carries one.
///
/// Ids are never reused on a channel. The low bit says who allocated it:
/// 0 = the application node (`socket()`/`connect()`), 1 = the io-server
/// (accepted client connections).
pub type ConnId = u64;

/// A request id, echoed in the response (`Status`/`OptValue`).
pub type ReqId = u32;

/// Length of the random nonces and HMAC-SHA256 proofs of the handshake.
pub const NONCE_LEN: usize = 32;

/// `shutdown(2)`'s `how`, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownHow {
    Read = 0,
    Write = 1,
    Both = 2,
}

impl ShutdownHow {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Read),
            1 => Some(Self::Write),
            2 => Some(Self::Both),
            _ => None,
        }
    }
}

/// Socket options that decide how a bind behaves on the io-server.
pub mod bind_flags {
    pub const REUSEADDR: u32 = 1;
    pub const REUSEPORT: u32 = 2;
    pub const V6ONLY: u32 = 4;
    pub const ALL: u32 = REUSEADDR | REUSEPORT | V6ONLY;

    /// Whether a new socket with bind flags `flags` may bind a port (and
    /// address) a socket with `held` holds, by the kernel's reuse rules
    /// (`inet_csk_bind_conflict`): both `SO_REUSEPORT`, or both
    /// `SO_REUSEADDR` while the one held does not listen.
    pub fn reuse(flags: u32, held: u32, listening: bool) -> bool {
        let both = |f: u32| flags & f != 0 && held & f != 0;
        both(REUSEPORT) || (both(REUSEADDR) && !listening)
    }
}

/// A node's request to the io-server (Figure 3, "node → io-server").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `bind(port)`: reserve `addr` for the virtual socket `conn`.
    Bind {
        conn: ConnId,
        addr: SocketAddr,
        flags: u32,
    },
    /// `listen(backlog)`: join (or form) the listener group of the bound port.
    Listen { conn: ConnId, backlog: u32 },
    /// `connect(addr)`: open an outbound TCP connection from the single address.
    Connect { conn: ConnId, addr: SocketAddr },
    /// `shutdown(how)`.
    Shutdown { conn: ConnId, how: ShutdownHow },
    /// `setsockopt(level, name, value)` on the real TCP socket.
    SetOpt {
        conn: ConnId,
        level: i32,
        name: i32,
        value: Bytes,
    },
    /// `getsockopt(level, name)`, at most `len` bytes.
    GetOpt {
        conn: ConnId,
        level: i32,
        name: i32,
        len: u32,
    },
}

impl Request {
    pub fn conn(&self) -> ConnId {
        match self {
            Request::Bind { conn, .. }
            | Request::Listen { conn, .. }
            | Request::Connect { conn, .. }
            | Request::Shutdown { conn, .. }
            | Request::SetOpt { conn, .. }
            | Request::GetOpt { conn, .. } => *conn,
        }
    }

    /// The syscall this request stands for, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Bind { .. } => "bind",
            Request::Listen { .. } => "listen",
            Request::Connect { .. } => "connect",
            Request::Shutdown { .. } => "shutdown",
            Request::SetOpt { .. } => "setsockopt",
            Request::GetOpt { .. } => "getsockopt",
        }
    }
}

/// The io-server's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `errno` 0 means success. `addr` is the bound address (Bind, port 0
    /// resolved) or the local address of an established connection (Connect).
    Status {
        errno: i32,
        addr: Option<SocketAddr>,
    },
    /// Answer to `GetOpt`.
    OptValue { errno: i32, value: Bytes },
}

impl Response {
    pub fn errno(&self) -> i32 {
        match self {
            Response::Status { errno, .. } | Response::OptValue { errno, .. } => *errno,
        }
    }
}

/// Every frame that crosses a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Node → io-server, first frame: versions spoken, name, weight, the
    /// receive buffer it grants each connection (`B_r`), and a nonce.
    Hello {
        min_version: u8,
        max_version: u8,
        node: String,
        weight: u32,
        window: u32,
        nonce: [u8; NONCE_LEN],
    },
    /// io-server → node: chosen version, its own window and nonce, and its
    /// proof of the token (mutual authentication).
    Challenge {
        version: u8,
        window: u32,
        nonce: [u8; NONCE_LEN],
        proof: [u8; NONCE_LEN],
    },
    /// Node → io-server: the node's proof of the token.
    Auth {
        proof: [u8; NONCE_LEN],
    },
    /// io-server → node: authenticated; the node's id on this io-server.
    Welcome {
        node_id: u32,
    },
    /// Either side: the channel is closing, and why.
    GoAway {
        reason: String,
    },
    /// Node → io-server: a Figure 3 request.
    Request {
        req: ReqId,
        request: Request,
    },
    /// io-server → node: the answer to request `req`.
    Response {
        req: ReqId,
        response: Response,
    },
    /// io-server → node: a client connection for the listener `listener`.
    ConnectionAccepted {
        listener: ConnId,
        conn: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
    },
    /// io-server → node: the TCP connection ended (`errno` 0: closed), or
    /// an asynchronous error to report at the next call (§2.3).
    ConnectionClosed {
        conn: ConnId,
        errno: i32,
    },
    /// Node → io-server: the virtual socket is gone; drop the connection.
    /// For a connection handed over as a socket (zero-relay) and not yet
    /// accepted, `conn` is the io-server's id of it ([`Frame::Accepted`]):
    /// the node closed its copy, and the io-server closes its own.
    Close {
        conn: ConnId,
    },
    /// Node → io-server (protocol version 3): as [`Frame::Close`], but the
    /// connection ended abortively on the node (the program's
    /// `SO_LINGER` 0 close or `connect(AF_UNSPEC)`, a queued client its
    /// listener's close refused, an error on the program's end): the
    /// io-server resets the TCP connection (RST) instead of closing it
    /// with a FIN, as the node's kernel would have.
    Reset {
        conn: ConnId,
    },
    /// Node → io-server (protocol version 2): the program accepted `conn`
    /// (its `accept()` returned it). Until then the connection is the
    /// io-server's to give to another node if this node's channel ends;
    /// from then on it is the node's. `conn` is a relayed connection's
    /// tag, or the io-server's id of a handed-over one
    /// (`saps_fabric::handoff::HandedOff::conn`).
    Accepted {
        conn: ConnId,
    },
    /// io-server → node (protocol version 4): the outbound connect of the
    /// node's socket `conn` is in flight (its SYN sent), leaving from
    /// `local`, the address and port the io-server's kernel gave it. Sent
    /// once, before the Connect's `Response`, so that `getsockname` on the
    /// node answers while the connect is in flight as the kernel would.
    Connecting {
        conn: ConnId,
        local: SocketAddr,
    },
    /// Stream bytes, within the receiver's credit.
    Data {
        conn: ConnId,
        data: Bytes,
    },
    /// End of the stream in this direction (after all `Data`).
    Fin {
        conn: ConnId,
    },
    /// Receiver → sender: you may send until `limit` octets in total (`L_r`).
    Credit {
        conn: ConnId,
        limit: u64,
    },
    /// Node → io-server: the node's new weight (0 drains).
    Weight {
        weight: u32,
    },
    /// Liveness probe and its answer.
    Ping {
        token: u64,
    },
    Pong {
        token: u64,
    },
}

impl Frame {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Challenge { .. } => "Challenge",
            Frame::Auth { .. } => "Auth",
            Frame::Welcome { .. } => "Welcome",
            Frame::GoAway { .. } => "GoAway",
            Frame::Request { .. } => "Request",
            Frame::Response { .. } => "Response",
            Frame::ConnectionAccepted { .. } => "ConnectionAccepted",
            Frame::ConnectionClosed { .. } => "ConnectionClosed",
            Frame::Close { .. } => "Close",
            Frame::Accepted { .. } => "Accepted",
            Frame::Reset { .. } => "Reset",
            Frame::Connecting { .. } => "Connecting",
            Frame::Data { .. } => "Data",
            Frame::Fin { .. } => "Fin",
            Frame::Credit { .. } => "Credit",
            Frame::Weight { .. } => "Weight",
            Frame::Ping { .. } => "Ping",
            Frame::Pong { .. } => "Pong",
        }
    }
}

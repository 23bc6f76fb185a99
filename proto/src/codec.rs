//! The binary codec of the Forwarding Protocol.
//!
//! Every frame is `len: u32 BE | version: u8 | tag: u8 | body`, where `len`
//! counts the bytes after itself. Integers are big-endian; strings and byte
//! strings are `u16` length-prefixed; a socket address is `family: u8 (4|6) |
//! ip | port: u16 [| flowinfo: u32 | scope_id: u32]`. Decoding checks every
//! length against explicit limits before it allocates, rejects unknown tags,
//! unknown versions and trailing bytes, and never panics on any input.
//!
//! The `version` octet of every frame is the version of this framing, and
//! has stayed 1. What a peer may send is the *protocol* version that
//! `Hello`/`Challenge` negotiate ([`crate::channel::MAX_VERSION`]): version
//! 2 adds the `Accepted` frame (tag 0x36), which a channel that settled on
//! version 1 refuses as unexpected, and which a node never sends on one
//! (an older decoder would not know the tag); version 3 adds `Reset` (tag
//! 0x37) the same way, and version 4 the io-server's `Connecting` (tag
//! 0x38). This codec decodes every
//! tag it knows whatever the channel's version; the channel checks.

use crate::frame::{ConnId, Frame, Request, Response, ShutdownHow, NONCE_LEN};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// The one wire-format version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Bytes before the body: length, version, tag.
pub const HEADER_LEN: usize = 6;
/// Default largest frame (the `len` field), 256 KiB of data plus headers.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024 + 64;
/// Largest node name, reason or option value.
pub const MAX_STRING: usize = 1024;
/// Bytes of a `Data` frame besides its payload: header, conn id, length.
pub const DATA_OVERHEAD: usize = HEADER_LEN + 8;

mod tag {
    pub const HELLO: u8 = 0x01;
    pub const CHALLENGE: u8 = 0x02;
    pub const AUTH: u8 = 0x03;
    pub const WELCOME: u8 = 0x04;
    pub const GOAWAY: u8 = 0x05;
    pub const BIND: u8 = 0x10;
    pub const LISTEN: u8 = 0x11;
    pub const CONNECT: u8 = 0x12;
    pub const SHUTDOWN: u8 = 0x13;
    pub const SETOPT: u8 = 0x14;
    pub const GETOPT: u8 = 0x15;
    pub const STATUS: u8 = 0x20;
    pub const OPTVALUE: u8 = 0x21;
    pub const ACCEPTED: u8 = 0x30;
    pub const CLOSED: u8 = 0x31;
    pub const CLOSE: u8 = 0x32;
    pub const DATA: u8 = 0x33;
    pub const FIN: u8 = 0x34;
    pub const CREDIT: u8 = 0x35;
    /// Protocol version 2.
    pub const ACCEPTED_BY_PROGRAM: u8 = 0x36;
    /// Protocol version 3.
    pub const RESET: u8 = 0x37;
    /// Protocol version 4.
    pub const CONNECTING: u8 = 0x38;
    pub const WEIGHT: u8 = 0x40;
    pub const PING: u8 = 0x41;
    pub const PONG: u8 = 0x42;
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("frame of {0} bytes is shorter than its header")]
    Runt(usize),
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("unknown frame tag {0:#04x}")]
    UnknownTag(u8),
    #[error("malformed {frame} frame: {what}")]
    Malformed {
        frame: &'static str,
        what: &'static str,
    },
}

fn malformed(frame: &'static str, what: &'static str) -> DecodeError {
    DecodeError::Malformed { frame, what }
}

/// Appends the encoding of `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0); // patched below
    out.put_u8(WIRE_VERSION);
    match frame {
        Frame::Hello {
            min_version,
            max_version,
            node,
            weight,
            window,
            nonce,
        } => {
            out.put_u8(tag::HELLO);
            out.put_u8(*min_version);
            out.put_u8(*max_version);
            put_str(out, node);
            out.put_u32(*weight);
            out.put_u32(*window);
            out.put_slice(nonce);
        }
        Frame::Challenge {
            version,
            window,
            nonce,
            proof,
        } => {
            out.put_u8(tag::CHALLENGE);
            out.put_u8(*version);
            out.put_u32(*window);
            out.put_slice(nonce);
            out.put_slice(proof);
        }
        Frame::Auth { proof } => {
            out.put_u8(tag::AUTH);
            out.put_slice(proof);
        }
        Frame::Welcome { node_id } => {
            out.put_u8(tag::WELCOME);
            out.put_u32(*node_id);
        }
        Frame::GoAway { reason } => {
            out.put_u8(tag::GOAWAY);
            put_str(out, reason);
        }
        Frame::Request { req, request } => encode_request(*req, request, out),
        Frame::Response { req, response } => match response {
            Response::Status { errno, addr } => {
                out.put_u8(tag::STATUS);
                out.put_u32(*req);
                out.put_i32(*errno);
                match addr {
                    Some(a) => {
                        out.put_u8(1);
                        put_addr(out, a);
                    }
                    None => out.put_u8(0),
                }
            }
            Response::OptValue { errno, value } => {
                out.put_u8(tag::OPTVALUE);
                out.put_u32(*req);
                out.put_i32(*errno);
                put_bytes(out, value);
            }
        },
        Frame::ConnectionAccepted {
            listener,
            conn,
            peer,
            local,
        } => {
            out.put_u8(tag::ACCEPTED);
            out.put_u64(*listener);
            out.put_u64(*conn);
            put_addr(out, peer);
            put_addr(out, local);
        }
        Frame::ConnectionClosed { conn, errno } => {
            out.put_u8(tag::CLOSED);
            out.put_u64(*conn);
            out.put_i32(*errno);
        }
        Frame::Close { conn } => put_conn(out, tag::CLOSE, *conn),
        Frame::Accepted { conn } => put_conn(out, tag::ACCEPTED_BY_PROGRAM, *conn),
        Frame::Reset { conn } => put_conn(out, tag::RESET, *conn),
        Frame::Connecting { conn, local } => {
            put_conn(out, tag::CONNECTING, *conn);
            put_addr(out, local);
        }
        Frame::Data { conn, data } => {
            put_conn(out, tag::DATA, *conn);
            out.put_slice(data);
        }
        Frame::Fin { conn } => put_conn(out, tag::FIN, *conn),
        Frame::Credit { conn, limit } => {
            put_conn(out, tag::CREDIT, *conn);
            out.put_u64(*limit);
        }
        Frame::Weight { weight } => {
            out.put_u8(tag::WEIGHT);
            out.put_u32(*weight);
        }
        Frame::Ping { token } => {
            out.put_u8(tag::PING);
            out.put_u64(*token);
        }
        Frame::Pong { token } => {
            out.put_u8(tag::PONG);
            out.put_u64(*token);
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Spare room in the output buffer that [`split_data_frame`] lends without
/// asking for more.
pub const READ_FLOOR: usize = 16 * 1024;

/// Splits the spare room off the end of `out` for one `Data` frame on
/// `conn` whose payload is written (read from a socket) straight into it,
/// with no copy through a buffer of its own. Returns the frame's buffer,
/// holding its header (length to be set by [`seal_data_frame`]), and how
/// many payload octets it has room for: `limit`, or fewer when `out`
/// already has [`READ_FLOOR`] octets of room but not `limit` (reserving a
/// full `limit` for every read made a new buffer whenever the last chunk
/// was still on its way to the transport, for reads of a few hundred
/// octets). Give the buffer back with `out.unsplit(frame)`: adjacent
/// again, it rejoins `out` without a copy.
pub fn split_data_frame(conn: ConnId, limit: usize, out: &mut BytesMut) -> (BytesMut, usize) {
    let spare = out.capacity() - out.len();
    let room = if spare >= DATA_OVERHEAD + READ_FLOOR {
        limit.min(spare - DATA_OVERHEAD)
    } else {
        out.reserve(DATA_OVERHEAD + limit);
        limit
    };
    let mut frame = out.split_off(out.len());
    frame.put_u32(0);
    frame.put_u8(WIRE_VERSION);
    put_conn(&mut frame, tag::DATA, conn);
    (frame, room)
}

/// Sets the length of a `Data` frame made by [`split_data_frame`] whose
/// `payload` octets follow its header: in `frame` itself, or sent after
/// it by the transport (spliced).
pub fn seal_data_frame(frame: &mut BytesMut, payload: usize) {
    let len = (2 + 8 + payload) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
}

/// Appends the header of a `Data` frame whose `len` octets of payload
/// follow it.
pub fn encode_data_header(conn: ConnId, len: usize, out: &mut BytesMut) {
    out.reserve(DATA_OVERHEAD);
    out.put_u32((2 + 8 + len) as u32);
    out.put_u8(WIRE_VERSION);
    put_conn(out, tag::DATA, conn);
}

/// The connection and payload length of the `Data` frame `buf` starts
/// with, once its header is in; `None` for any other frame, or before.
/// (The length is checked against the frame limit by [`decode`], which
/// sees the frame first.)
pub fn peek_data(buf: &[u8]) -> Option<(ConnId, usize)> {
    let h = buf.get(..DATA_OVERHEAD)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if h[4] != WIRE_VERSION || h[5] != tag::DATA || len < 2 + 8 {
        return None;
    }
    let conn = u64::from_be_bytes(h[6..14].try_into().expect("8 octets"));
    Some((conn, len - 2 - 8))
}

/// Appends a `Data` frame without building a [`Frame`] (the hot path).
pub fn encode_data(conn: ConnId, data: &[u8], out: &mut BytesMut) {
    out.reserve(DATA_OVERHEAD + data.len());
    encode_data_header(conn, data.len(), out);
    out.put_slice(data);
}

fn encode_request(req: u32, request: &Request, out: &mut BytesMut) {
    let (t, conn) = match request {
        Request::Bind { conn, .. } => (tag::BIND, conn),
        Request::Listen { conn, .. } => (tag::LISTEN, conn),
        Request::Connect { conn, .. } => (tag::CONNECT, conn),
        Request::Shutdown { conn, .. } => (tag::SHUTDOWN, conn),
        Request::SetOpt { conn, .. } => (tag::SETOPT, conn),
        Request::GetOpt { conn, .. } => (tag::GETOPT, conn),
    };
    out.put_u8(t);
    out.put_u32(req);
    out.put_u64(*conn);
    match request {
        Request::Bind { addr, flags, .. } => {
            put_addr(out, addr);
            out.put_u32(*flags);
        }
        Request::Listen { backlog, .. } => out.put_u32(*backlog),
        Request::Connect { addr, .. } => put_addr(out, addr),
        Request::Shutdown { how, .. } => out.put_u8(*how as u8),
        Request::SetOpt {
            level, name, value, ..
        } => {
            out.put_i32(*level);
            out.put_i32(*name);
            put_bytes(out, value);
        }
        Request::GetOpt {
            level, name, len, ..
        } => {
            out.put_i32(*level);
            out.put_i32(*name);
            out.put_u32(*len);
        }
    }
}

fn put_conn(out: &mut BytesMut, t: u8, conn: ConnId) {
    out.put_u8(t);
    out.put_u64(conn);
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    let b = &b[..b.len().min(MAX_STRING)];
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn put_addr(out: &mut BytesMut, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.put_u8(4);
            out.put_slice(&a.ip().octets());
            out.put_u16(a.port());
        }
        SocketAddr::V6(a) => {
            out.put_u8(6);
            out.put_slice(&a.ip().octets());
            out.put_u16(a.port());
            out.put_u32(a.flowinfo());
            out.put_u32(a.scope_id());
        }
    }
}

/// Decodes one frame from the front of `buf`.
///
/// `Ok(None)`: more bytes are needed (nothing consumed). `Ok(Some(frame))`:
/// the frame's bytes were consumed. `Err`: the stream is corrupt; the caller
/// must close the channel.
pub fn decode(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame {
        return Err(DecodeError::Oversized {
            len,
            max: max_frame,
        });
    }
    if len < 2 {
        return Err(DecodeError::Runt(len));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len).freeze();
    decode_body(body).map(Some)
}

fn decode_body(mut b: Bytes) -> Result<Frame, DecodeError> {
    let version = b.get_u8();
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let t = b.get_u8();
    let name = tag_name(t).ok_or(DecodeError::UnknownTag(t))?;
    let mut r = Reader { b, frame: name };
    let frame = match t {
        tag::HELLO => Frame::Hello {
            min_version: r.u8()?,
            max_version: r.u8()?,
            node: r.string()?,
            weight: r.u32()?,
            window: r.u32()?,
            nonce: r.nonce()?,
        },
        tag::CHALLENGE => Frame::Challenge {
            version: r.u8()?,
            window: r.u32()?,
            nonce: r.nonce()?,
            proof: r.nonce()?,
        },
        tag::AUTH => Frame::Auth { proof: r.nonce()? },
        tag::WELCOME => Frame::Welcome { node_id: r.u32()? },
        tag::GOAWAY => Frame::GoAway {
            reason: r.string()?,
        },
        tag::BIND..=tag::GETOPT => {
            let req = r.u32()?;
            let conn = r.u64()?;
            let request = match t {
                tag::BIND => Request::Bind {
                    conn,
                    addr: r.addr()?,
                    flags: r.u32()?,
                },
                tag::LISTEN => Request::Listen {
                    conn,
                    backlog: r.u32()?,
                },
                tag::CONNECT => Request::Connect {
                    conn,
                    addr: r.addr()?,
                },
                tag::SHUTDOWN => Request::Shutdown {
                    conn,
                    how: ShutdownHow::from_u8(r.u8()?).ok_or(malformed(name, "bad how"))?,
                },
                tag::SETOPT => Request::SetOpt {
                    conn,
                    level: r.i32()?,
                    name: r.i32()?,
                    value: r.bytes()?,
                },
                _ => Request::GetOpt {
                    conn,
                    level: r.i32()?,
                    name: r.i32()?,
                    len: r.u32()?,
                },
            };
            Frame::Request { req, request }
        }
        tag::STATUS => {
            let req = r.u32()?;
            let errno = r.i32()?;
            let addr = match r.u8()? {
                0 => None,
                1 => Some(r.addr()?),
                _ => return Err(malformed(name, "bad address flag")),
            };
            Frame::Response {
                req,
                response: Response::Status { errno, addr },
            }
        }
        tag::OPTVALUE => Frame::Response {
            req: r.u32()?,
            response: Response::OptValue {
                errno: r.i32()?,
                value: r.bytes()?,
            },
        },
        tag::ACCEPTED => Frame::ConnectionAccepted {
            listener: r.u64()?,
            conn: r.u64()?,
            peer: r.addr()?,
            local: r.addr()?,
        },
        tag::CLOSED => Frame::ConnectionClosed {
            conn: r.u64()?,
            errno: r.i32()?,
        },
        tag::CLOSE => Frame::Close { conn: r.u64()? },
        tag::ACCEPTED_BY_PROGRAM => Frame::Accepted { conn: r.u64()? },
        tag::RESET => Frame::Reset { conn: r.u64()? },
        tag::CONNECTING => Frame::Connecting {
            conn: r.u64()?,
            local: r.addr()?,
        },
        tag::DATA => {
            let conn = r.u64()?;
            let data = std::mem::take(&mut r.b);
            Frame::Data { conn, data }
        }
        tag::FIN => Frame::Fin { conn: r.u64()? },
        tag::CREDIT => Frame::Credit {
            conn: r.u64()?,
            limit: r.u64()?,
        },
        tag::WEIGHT => Frame::Weight { weight: r.u32()? },
        tag::PING => Frame::Ping { token: r.u64()? },
        tag::PONG => Frame::Pong { token: r.u64()? },
        _ => return Err(DecodeError::UnknownTag(t)),
    };
    if r.b.has_remaining() {
        return Err(malformed(name, "trailing bytes"));
    }
    Ok(frame)
}

fn tag_name(t: u8) -> Option<&'static str> {
    Some(match t {
        tag::HELLO => "Hello",
        tag::CHALLENGE => "Challenge",
        tag::AUTH => "Auth",
        tag::WELCOME => "Welcome",
        tag::GOAWAY => "GoAway",
        tag::BIND..=tag::GETOPT => "Request",
        tag::STATUS | tag::OPTVALUE => "Response",
        tag::ACCEPTED => "ConnectionAccepted",
        tag::CLOSED => "ConnectionClosed",
        tag::CLOSE => "Close",
        tag::ACCEPTED_BY_PROGRAM => "Accepted",
        tag::RESET => "Reset",
        tag::CONNECTING => "Connecting",
        tag::DATA => "Data",
        tag::FIN => "Fin",
        tag::CREDIT => "Credit",
        tag::WEIGHT => "Weight",
        tag::PING => "Ping",
        tag::PONG => "Pong",
        _ => return None,
    })
}

/// A checked cursor over a frame body.
struct Reader {
    b: Bytes,
    frame: &'static str,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.b.remaining() < n {
            Err(malformed(self.frame, "truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.b.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.b.get_u32())
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.need(4)?;
        Ok(self.b.get_i32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.b.get_u64())
    }
    fn nonce(&mut self) -> Result<[u8; NONCE_LEN], DecodeError> {
        self.need(NONCE_LEN)?;
        let mut n = [0; NONCE_LEN];
        self.b.copy_to_slice(&mut n);
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        if len > MAX_STRING {
            return Err(malformed(self.frame, "string too long"));
        }
        self.need(len)?;
        Ok(self.b.split_to(len))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| malformed(self.frame, "string is not UTF-8"))
    }
    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        match self.u8()? {
            4 => {
                self.need(6)?;
                let ip = Ipv4Addr::from(self.b.get_u32());
                Ok(SocketAddr::new(IpAddr::V4(ip), self.b.get_u16()))
            }
            6 => {
                self.need(16 + 2 + 8)?;
                let ip = Ipv6Addr::from(self.b.get_u128());
                let port = self.b.get_u16();
                let flow = self.b.get_u32();
                let scope = self.b.get_u32();
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)))
            }
            _ => Err(malformed(self.frame, "bad address family")),
        }
    }
}

#[cfg(test)]
mod tests;

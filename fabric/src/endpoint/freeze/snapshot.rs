//! [`RouterSnap`] as octets, for the io-server's upgrade in place
//! (bench/notes/2026-12-03-upgrade-design.md, §5 step 4): the old process
//! sends a capture's router with [`RouterSnap::encode`], the new one reads
//! it back with [`RouterSnap::decode`] before [`Endpoint::resume`].
//!
//! The style of proto's `ChannelSnap` encoding: big-endian integers,
//! [`ROUTER_SNAP_VERSION`] first, every field in the order of its struct,
//! `usize` as `u64`, durations as nanoseconds (`u64`), options as a tag
//! `0` or `1` then the value, lists and octet strings as their length
//! (`u32` for lists, `u64` for octets) then what it counts. Canonical:
//! the same snapshot always encodes the same (its lists are in the order
//! of connection ids, as [`Endpoint::capture`] makes them). The decoder
//! checks each length against what is left before it allocates, refuses
//! what it does not know (another version, unknown tags, flags other than
//! 0 or 1, trailing octets) and what no capture makes (descriptor indices
//! named twice, lists out of connection id order, a connection both
//! relayed and held, a pre-accept copy sent past its end), with an error,
//! never a panic.
//!
//! [`Endpoint::resume`]: crate::endpoint::Endpoint::resume
//! [`Endpoint::capture`]: crate::endpoint::Endpoint::capture

use super::{HeldEvent, PipeSnap, RelaySnap, RouterSnap, StartSnap};
use crate::endpoint::preaccept::{PreAcceptSnap, Replay};
use crate::endpoint::quiet::QuietSnap;
use crate::frame::ConnId;
use bytes::{BufMut, BytesMut};
use saps_proto::cursor::{nanos, put_bytes, put_list, put_opt, Cursor, CursorError};
use std::time::Duration;

/// The version of [`RouterSnap`]'s encoding. Any change to what is
/// encoded, or how, bumps it: a build reads only its own version
/// (`router_snap.golden` holds a sample of the current one).
pub const ROUTER_SNAP_VERSION: u32 = 2;

/// Why [`RouterSnap::decode`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterSnapError {
    #[error("router snapshot version {0}, this build reads version {ROUTER_SNAP_VERSION}")]
    Version(u32),
    #[error("router snapshot truncated")]
    Truncated,
    #[error("malformed router snapshot: {0}")]
    Malformed(&'static str),
}

/// Tags of [`HeldEvent`]s.
mod tag {
    pub const DATA: u8 = 1;
    pub const FIN: u8 = 2;
    pub const CLOSED: u8 = 3;
}

impl RouterSnap {
    /// Appends the encoding: `version: u32`, then every field in the
    /// order of [`RouterSnap`] (and of what it holds), each as fixed in
    /// the module's documentation.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(ROUTER_SNAP_VERSION);
        out.put_u64(self.transport as u64);
        put_opt(out, self.pipe.as_ref(), |out, p| {
            for n in [p.read, p.write, p.held] {
                out.put_u64(n as u64);
            }
        });
        put_list(out, &self.relays, encode_relay);
        put_list(out, &self.held, |out, (conn, events)| {
            out.put_u64(*conn);
            put_list(out, events, encode_event);
        });
        put_list(out, &self.starts, |out, s| {
            out.put_u64(s.conn);
            put_bytes(out, &s.replay.data);
            out.put_u8(s.replay.fin.into());
            out.put_u8(s.tracked.into());
        });
        put_opt(out, self.node_id, |out, id| out.put_u32(id));
        put_list(out, &self.handed, |out, &(conn, theirs)| {
            out.put_u64(conn);
            put_opt(out, theirs, |out, id| out.put_u64(id));
        });
        put_opt(out, self.weight, |out, w| out.put_u32(w));
    }

    /// Decodes what [`RouterSnap::encode`] wrote, all of `buf`.
    pub fn decode(buf: &[u8]) -> Result<RouterSnap, RouterSnapError> {
        let mut r = Reader::new(buf);
        let version = r.u32()?;
        if version != ROUTER_SNAP_VERSION {
            return Err(RouterSnapError::Version(version));
        }
        let transport = r.usize()?;
        let pipe = r.opt(|r| {
            Ok(PipeSnap {
                read: r.usize()?,
                write: r.usize()?,
                held: r.usize()?,
            })
        })?;
        let relays = by_conn(
            &mut r,
            decode_relay,
            |s| s.conn,
            "relays not in connection id order",
        )?;
        let held = by_conn(
            &mut r,
            |r| Ok((r.u64()?, r.list(decode_event)?)),
            |h| h.0,
            "held connections not in connection id order",
        )?;
        let starts = by_conn(
            &mut r,
            |r| {
                Ok(StartSnap {
                    conn: r.u64()?,
                    replay: Replay {
                        data: r.bytes()?,
                        fin: r.bool()?,
                    },
                    tracked: r.bool()?,
                })
            },
            |s| s.conn,
            "starts not in connection id order",
        )?;
        let node_id = r.opt(Reader::u32)?;
        let handed = by_conn(
            &mut r,
            |r| Ok((r.u64()?, r.opt(Reader::u64)?)),
            |h| h.0,
            "handed connections not in connection id order",
        )?;
        let weight = r.opt(Reader::u32)?;
        if !r.rest().is_empty() {
            return Err(RouterSnapError::Malformed("trailing bytes"));
        }
        let snap = RouterSnap {
            transport,
            pipe,
            relays,
            held,
            starts,
            node_id,
            handed,
            weight,
        };
        snap.consistent()?;
        Ok(snap)
    }

    /// What every capture is, beyond what each field is on its own.
    fn consistent(&self) -> Result<(), RouterSnapError> {
        let mut fds = vec![self.transport];
        if let Some(p) = &self.pipe {
            fds.extend([p.read, p.write]);
        }
        fds.extend(self.relays.iter().map(|s| s.socket));
        fds.sort_unstable();
        if fds.windows(2).any(|w| w[0] == w[1]) {
            return Err(RouterSnapError::Malformed("a descriptor index named twice"));
        }
        let held = |conn: &ConnId| self.held.binary_search_by_key(conn, |h| h.0).is_ok();
        if self.relays.iter().any(|s| held(&s.conn)) {
            return Err(RouterSnapError::Malformed(
                "a connection both relayed and held",
            ));
        }
        Ok(())
    }
}

fn encode_relay(out: &mut BytesMut, s: &RelaySnap) {
    out.put_u64(s.conn);
    out.put_u64(s.socket as u64);
    out.put_u64(s.bytes_in);
    out.put_u64(s.bytes_out);
    for flag in [s.fin_sent, s.fin_written, s.tracked] {
        out.put_u8(flag.into());
    }
    put_opt(out, s.pre.as_ref(), |out, p| {
        put_bytes(out, &p.kept);
        out.put_u64(p.sent as u64);
        for flag in [p.fin, p.fin_sent, p.accepted] {
            out.put_u8(flag.into());
        }
        out.put_u64(p.cap as u64);
    });
    put_opt(out, s.quiet.as_ref(), |out, q| {
        out.put_u64(q.moved);
        out.put_u8(q.half_closed.into());
        out.put_u64(nanos(q.age));
    });
    put_list(out, &s.pending, encode_event);
}

fn decode_relay(r: &mut Reader<'_>) -> Result<RelaySnap, RouterSnapError> {
    Ok(RelaySnap {
        conn: r.u64()?,
        socket: r.usize()?,
        bytes_in: r.u64()?,
        bytes_out: r.u64()?,
        fin_sent: r.bool()?,
        fin_written: r.bool()?,
        tracked: r.bool()?,
        pre: r.opt(|r| {
            let kept = r.bytes()?;
            let sent = r.usize()?;
            if sent > kept.len() {
                return Err(RouterSnapError::Malformed(
                    "a pre-accept copy sent past its end",
                ));
            }
            Ok(PreAcceptSnap {
                kept,
                sent,
                fin: r.bool()?,
                fin_sent: r.bool()?,
                accepted: r.bool()?,
                cap: r.usize()?,
            })
        })?,
        quiet: r.opt(|r| {
            Ok(QuietSnap {
                moved: r.u64()?,
                half_closed: r.bool()?,
                age: Duration::from_nanos(r.u64()?),
            })
        })?,
        pending: r.list(decode_event)?,
    })
}

fn encode_event(out: &mut BytesMut, e: &HeldEvent) {
    match e {
        HeldEvent::Data(data) => {
            out.put_u8(tag::DATA);
            put_bytes(out, data);
        }
        HeldEvent::Fin => out.put_u8(tag::FIN),
        HeldEvent::Closed(errno) => {
            out.put_u8(tag::CLOSED);
            out.put_i32(*errno);
        }
    }
}

fn decode_event(r: &mut Reader<'_>) -> Result<HeldEvent, RouterSnapError> {
    Ok(match r.u8()? {
        tag::DATA => HeldEvent::Data(r.bytes()?),
        tag::FIN => HeldEvent::Fin,
        tag::CLOSED => HeldEvent::Closed(r.i32()?),
        _ => return Err(RouterSnapError::Malformed("unknown held event tag")),
    })
}

/// A checked cursor over an encoded [`RouterSnap`].
type Reader<'a> = Cursor<'a, RouterSnapError>;

impl CursorError for RouterSnapError {
    fn truncated() -> Self {
        RouterSnapError::Truncated
    }
    fn malformed(what: &'static str) -> Self {
        RouterSnapError::Malformed(what)
    }
}

/// A [`Cursor::list`] in strictly increasing order of connection ids.
fn by_conn<T>(
    r: &mut Reader<'_>,
    get: impl FnMut(&mut Reader<'_>) -> Result<T, RouterSnapError>,
    conn: impl Fn(&T) -> ConnId,
    unordered: &'static str,
) -> Result<Vec<T>, RouterSnapError> {
    let items = r.list(get)?;
    match items.windows(2).all(|w| conn(&w[0]) < conn(&w[1])) {
        true => Ok(items),
        false => Err(RouterSnapError::Malformed(unordered)),
    }
}

//! Fuzz targets for the Forwarding Protocol core (DESIGN.md: "Malformed
//! frames close that channel with a logged reason and touch nothing else").
//!
//! The functions here are the whole targets; `fuzz_targets/*.rs` are
//! one-line libFuzzer entry points, and `proto/tests/fuzz_smoke.rs` runs the
//! same functions on stable over generated inputs. Each panics only when an
//! invariant breaks, never because the input is bad.

#[path = "../../proto/tests/common/sans_io.rs"]
mod sans_io;

use bytes::BytesMut;
use saps_proto::codec::{self, DEFAULT_MAX_FRAME};
use saps_proto::{Channel, ChannelConfig, ConnId, Event};

/// `B_r` of the fuzzed channels: small, so credit limits are reached.
const WINDOW: u32 = 1024;

/// The decoder on arbitrary bytes. The first byte picks the frame limit.
///
/// Checks: decoding never panics; `Ok(None)` consumes nothing; every decoded
/// frame re-encodes to exactly the bytes it was decoded from (the encoding
/// is canonical, so a frame cannot be smuggled in two spellings).
pub fn decode(data: &[u8]) {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let max = if pick & 1 == 0 { DEFAULT_MAX_FRAME } else { 64 };
    let mut buf = BytesMut::from(input);
    loop {
        let start = input.len() - buf.len();
        match codec::decode(&mut buf, max) {
            Ok(Some(frame)) => {
                let mut again = BytesMut::new();
                codec::encode(&frame, &mut again);
                let end = input.len() - buf.len();
                assert_eq!(&again[..], &input[start..end], "{frame:?} is not canonical");
            }
            Ok(None) => {
                assert_eq!(input.len() - buf.len(), start, "Ok(None) consumed bytes");
                return;
            }
            Err(_) => return,
        }
    }
}

/// A channel fed arbitrary input, interleaved with API calls and with the
/// honest peer's answers.
///
/// Byte 0: bit 0 authenticates the pair first (to reach the open state),
/// bit 1 picks the fuzzed end (0 node, 1 io-server). Then `(op, arg)` pairs:
/// raw input of `arg` bytes, `send_message`, `consumed`, `send_fin`,
/// `close_connection`, `make_connection`, a ping, or a pump with the peer.
///
/// Checks: nothing panics; everything the fuzzed end transmits decodes; a
/// connection never buffers more than `B_r`; a closed channel stays silent.
pub fn channel(data: &[u8]) {
    let Some((&mode, mut input)) = data.split_first() else {
        return;
    };
    let [mut node, mut srv] = if mode & 1 == 1 {
        let (node, srv) = sans_io::open_pair(WINDOW);
        [node, srv]
    } else {
        let config = ChannelConfig::new(sans_io::TOKEN).window(WINDOW);
        [Channel::node(config.clone()), Channel::io_server(config)]
    };
    let (target, peer) = if mode & 2 == 0 {
        (&mut node, &mut srv)
    } else {
        (&mut srv, &mut node)
    };
    let mut conns: Vec<ConnId> = Vec::new();
    while let Some((&op, rest)) = input.split_first() {
        let (&arg, rest) = rest.split_first().unwrap_or((&0, &[]));
        input = rest;
        let was_closed = target.is_closed();
        let conn = match conns.len() {
            0 => ConnId::from(arg % 8),
            n => conns[usize::from(arg) % n],
        };
        match op % 8 {
            0..=2 => {
                let (chunk, rest) = input.split_at(usize::from(arg).min(input.len()));
                input = rest;
                let _ = target.handle_input(chunk);
            }
            3 => {
                let _ = target.send_message(conn, &vec![op; usize::from(arg) * 16]);
            }
            4 => {
                let n = if arg == u8::MAX {
                    usize::MAX
                } else {
                    usize::from(arg) * 97
                };
                target.consumed(conn, n);
            }
            5 if arg & 1 == 0 => {
                let _ = target.send_fin(conn);
            }
            5 => target.close_connection(conn, i32::from(arg)),
            6 => match target.make_connection() {
                Ok(c) => conns.push(c),
                Err(_) => target.ping(u64::from(arg)),
            },
            _ => sans_io::pump(target, peer),
        }
        let events = sans_io::drain(target);
        if was_closed {
            assert!(events.is_empty(), "a closed channel raised {events:?}");
            assert!(
                target.poll_transmit().is_none(),
                "a closed channel transmitted"
            );
        }
        for e in &events {
            if let Event::ConnectionAccepted { conn, .. } = e {
                conns.push(*conn);
            }
        }
        for &c in &conns {
            assert!(
                target.buffered(c) <= u64::from(WINDOW),
                "{c} buffers past B_r"
            );
        }
        if let Some(bytes) = target.poll_transmit().map(|t| t.bytes) {
            let mut buf = BytesMut::from(&bytes[..]);
            while !buf.is_empty() {
                match codec::decode(&mut buf, DEFAULT_MAX_FRAME) {
                    Ok(Some(_)) => {}
                    other => panic!("the channel emitted a bad frame: {other:?}"),
                }
            }
            let _ = peer.handle_input(&bytes);
        }
        sans_io::drain(peer);
    }
}

//! Property test of per-connection flow control (paper Appendix A, §2.2;
//! DESIGN.md "Flow control").
//!
//! A node and an io-server [`Channel`], authenticated through the handshake,
//! are wired back to back through a model transport. Random interleavings of
//! sends on several connections in both directions, partial deliveries of
//! the byte stream, partial `consumed` calls, FINs and connection closes run
//! while the transport re-injects duplicated and late copies of `Credit`
//! frames (the stream itself is reliable, so only credits are duplicated or
//! reordered). Every case checks that no byte is lost, duplicated or
//! reordered per connection and direction, that a receiver never buffers more
//! than its window `B_r`, and that once everything is consumed every live
//! sender has at least `B_r / 2` of credit again (no credit was lost).

#[path = "common/sans_io.rs"]
mod sans_io;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use saps_proto::codec;
use saps_proto::{CallError, Channel, ConnId, Event, Frame};
use std::collections::VecDeque;

/// Index of each end in the arrays below.
const NODE: usize = 0;
const SRV: usize = 1;

#[derive(Debug, Clone)]
enum Op {
    /// `send_message` of `len` pattern bytes from `side` on connection `conn`.
    Send {
        side: usize,
        conn: usize,
        len: usize,
    },
    /// The transport hands up to `bytes` octets to `side` (any frame cut).
    Deliver { side: usize, bytes: usize },
    /// `side`'s application takes up to `bytes` octets of `conn`.
    Consume {
        side: usize,
        conn: usize,
        bytes: usize,
    },
    /// An old `Credit` frame travelling to `side` arrives again, late.
    DuplicateCredit {
        side: usize,
        which: usize,
        at: usize,
    },
    /// A queued `Credit` frame travelling to `side` is overtaken by `by` frames.
    DelayCredit {
        side: usize,
        which: usize,
        by: usize,
    },
    /// `side` ends its direction of `conn`.
    Fin { side: usize, conn: usize },
    /// `side` drops `conn`.
    Close { side: usize, conn: usize },
}

fn op(conns: usize, window: usize) -> impl Strategy<Value = Op> {
    let side = 0..2usize;
    let conn = 0..conns;
    prop_oneof![
        6 => (side.clone(), conn.clone(), 0..3 * window).prop_map(|(side, conn, len)| Op::Send { side, conn, len }),
        6 => (side.clone(), 1..4 * window).prop_map(|(side, bytes)| Op::Deliver { side, bytes }),
        5 => (side.clone(), conn.clone(), 1..2 * window).prop_map(|(side, conn, bytes)| Op::Consume { side, conn, bytes }),
        2 => (side.clone(), any::<usize>(), any::<usize>()).prop_map(|(side, which, at)| Op::DuplicateCredit { side, which, at }),
        2 => (side.clone(), any::<usize>(), 1..8usize).prop_map(|(side, which, by)| Op::DelayCredit { side, which, by }),
        1 => (side.clone(), conn.clone()).prop_map(|(side, conn)| Op::Fin { side, conn }),
        1 => (side, conn).prop_map(|(side, conn)| Op::Close { side, conn }),
    ]
}

/// The byte at `offset` of the stream `from` sends on connection `idx`.
fn pattern(from: usize, idx: usize, offset: u64) -> u8 {
    ((offset + 31 * idx as u64 + 101 * from as u64) % 251) as u8
}

/// One encoded frame in flight.
struct InFlight {
    bytes: Bytes,
    credit: bool,
}

/// One direction of the model transport: whole frames, of which the front
/// one may be partly delivered already.
#[derive(Default)]
struct Wire {
    frames: VecDeque<InFlight>,
    /// Octets of the front frame already delivered.
    offset: usize,
    /// Every `Credit` frame that entered this wire, for re-injection.
    credits: Vec<Bytes>,
}

impl Wire {
    /// Splits what a channel transmitted into frames; a channel only ever
    /// emits whole, well-formed frames.
    fn push(&mut self, bytes: Bytes) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut at = 0;
        while !buf.is_empty() {
            let before = buf.len();
            let frame = codec::decode(&mut buf, usize::MAX)
                .expect("a channel emits well-formed frames")
                .expect("a channel emits whole frames");
            let end = at + before - buf.len();
            let encoded = bytes.slice(at..end);
            let credit = matches!(frame, Frame::Credit { .. });
            if credit {
                self.credits.push(encoded.clone());
            }
            self.frames.push_back(InFlight {
                bytes: encoded,
                credit,
            });
            at = end;
        }
    }

    /// Up to `n` octets from the front, possibly cutting a frame.
    fn take(&mut self, mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while n > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let k = n.min(front.bytes.len() - self.offset);
            out.extend_from_slice(&front.bytes[self.offset..self.offset + k]);
            self.offset += k;
            n -= k;
            if self.offset == front.bytes.len() {
                self.frames.pop_front();
                self.offset = 0;
            }
        }
        out
    }

    /// First queue index at a frame boundary not yet started.
    fn first_untouched(&self) -> usize {
        usize::from(self.offset > 0)
    }

    fn duplicate_credit(&mut self, which: usize, at: usize) {
        if self.credits.is_empty() {
            return;
        }
        let bytes = self.credits[which % self.credits.len()].clone();
        let lo = self.first_untouched();
        let pos = lo + at % (self.frames.len() - lo + 1);
        self.frames.insert(
            pos,
            InFlight {
                bytes,
                credit: true,
            },
        );
    }

    fn delay_credit(&mut self, which: usize, by: usize) {
        let lo = self.first_untouched();
        let queued: Vec<usize> = (lo..self.frames.len())
            .filter(|&i| self.frames[i].credit)
            .collect();
        if queued.is_empty() {
            return;
        }
        let from = queued[which % queued.len()];
        let frame = self.frames.remove(from).expect("index from the queue");
        let to = (from + by).min(self.frames.len());
        self.frames.insert(to, frame);
    }
}

/// What the model knows of one direction of one connection.
#[derive(Default, Clone)]
struct Stream {
    /// Octets `send_message` accepted (`A_s`).
    sent: u64,
    /// Octets handed to the receiving application, in order.
    delivered: u64,
    /// Octets the receiving application consumed.
    consumed: u64,
    fin_sent: bool,
    fin_seen: bool,
}

struct Model {
    window: u64,
    chans: [Channel; 2],
    /// `wires[to]` carries bytes towards end `to`.
    wires: [Wire; 2],
    ids: Vec<ConnId>,
    /// `streams[from][idx]`.
    streams: [Vec<Stream>; 2],
    /// Either end dropped the connection: bytes in flight may be discarded.
    dead: Vec<bool>,
}

impl Model {
    fn new(window: u32, conns: usize) -> Self {
        let (mut node, mut srv) = sans_io::open_pair(window);
        let local = "192.0.2.9:80".parse().unwrap();
        let ids = (0..conns)
            .map(|i| {
                if i % 2 == 0 {
                    let id = node.make_connection().unwrap();
                    srv.open_connection(id).unwrap();
                    id
                } else {
                    let peer = format!("198.51.100.{i}:4000").parse().unwrap();
                    srv.accept_connection(2, peer, local).unwrap()
                }
            })
            .collect();
        sans_io::pump(&mut node, &mut srv);
        let accepted = sans_io::drain(&mut node);
        assert_eq!(accepted.len(), conns / 2, "{accepted:?}");
        Self {
            window: u64::from(window),
            chans: [node, srv],
            wires: Default::default(),
            ids,
            streams: [
                vec![Stream::default(); conns],
                vec![Stream::default(); conns],
            ],
            dead: vec![false; conns],
        }
    }

    fn collect_transmits(&mut self) {
        for from in [NODE, SRV] {
            if let Some(bytes) = self.chans[from].poll_transmit().map(|t| t.bytes) {
                self.wires[1 - from].push(bytes);
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Send { side, conn, len } => self.send(side, conn, len),
            Op::Deliver { side, bytes } => self.deliver(side, bytes),
            Op::Consume { side, conn, bytes } => self.consume(side, conn, bytes as u64),
            Op::DuplicateCredit { side, which, at } => self.wires[side].duplicate_credit(which, at),
            Op::DelayCredit { side, which, by } => self.wires[side].delay_credit(which, by),
            Op::Fin { side, conn } => {
                let id = self.ids[conn];
                let s = &mut self.streams[side][conn];
                match self.chans[side].send_fin(id) {
                    Ok(()) => s.fin_sent = true,
                    Err(e) => assert_eq!(e, CallError::UnknownConnection(id)),
                }
            }
            Op::Close { side, conn } => {
                self.chans[side].close_connection(self.ids[conn], 0);
                self.dead[conn] = true;
            }
        }
        self.collect_transmits();
    }

    fn send(&mut self, side: usize, conn: usize, len: usize) {
        let id = self.ids[conn];
        let s = &mut self.streams[side][conn];
        let data: Vec<u8> = (s.sent..s.sent + len as u64)
            .map(|o| pattern(side, conn, o))
            .collect();
        let window = self.chans[side].send_window(id);
        match self.chans[side].send_message(id, &data) {
            Ok(n) => {
                assert!(!s.fin_sent, "send after FIN must fail");
                assert_eq!(n, len.min(window), "send_message takes exactly the credit");
                s.sent += n as u64;
            }
            Err(CallError::AfterFin(_)) => assert!(s.fin_sent),
            Err(e) => {
                assert_eq!(e, CallError::UnknownConnection(id));
                assert!(self.dead[conn], "only a closed connection is unknown");
            }
        }
    }

    fn deliver(&mut self, to: usize, n: usize) {
        let bytes = self.wires[to].take(n);
        if bytes.is_empty() {
            return;
        }
        if let Err(e) = self.chans[to].handle_input(&bytes) {
            panic!("an honest peer broke the protocol: {e}");
        }
        let from = 1 - to;
        while let Some(event) = self.chans[to].poll_event() {
            match event {
                Event::MessageReceived { conn, data } => {
                    let idx = self.index(conn);
                    let s = &mut self.streams[from][idx];
                    assert!(!s.fin_seen, "data after FIN on {conn}");
                    for (i, &b) in data.iter().enumerate() {
                        let at = s.delivered + i as u64;
                        assert_eq!(b, pattern(from, idx, at), "conn {conn} byte {at}");
                    }
                    s.delivered += data.len() as u64;
                    assert!(s.delivered <= s.sent, "more delivered than sent on {conn}");
                    let buffered = s.delivered - s.consumed;
                    assert!(
                        buffered <= self.window,
                        "{buffered} buffered > B_r {}",
                        self.window
                    );
                }
                Event::Fin { conn } => {
                    let idx = self.index(conn);
                    let s = &mut self.streams[from][idx];
                    assert!(
                        s.fin_sent && s.delivered == s.sent,
                        "FIN before the data on {conn}"
                    );
                    s.fin_seen = true;
                }
                Event::ConnectionClosed { conn, errno } => {
                    assert_eq!(errno, 0);
                    let idx = self.index(conn);
                    assert!(self.dead[idx], "{conn} closed by nobody");
                }
                Event::BufferAvailable { conn } => {
                    let ch = &self.chans[to];
                    assert!(!ch.has_connection(conn) || ch.send_window(conn) > 0);
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        // The channel's own account of its buffer agrees with the model's.
        for (idx, &id) in self.ids.iter().enumerate() {
            if self.chans[to].has_connection(id) {
                let s = &self.streams[from][idx];
                assert_eq!(self.chans[to].buffered(id), s.delivered - s.consumed);
            }
        }
        self.collect_transmits();
    }

    fn consume(&mut self, side: usize, conn: usize, n: u64) {
        let s = &mut self.streams[1 - side][conn];
        let k = n.min(s.delivered - s.consumed);
        s.consumed += k;
        self.chans[side].consumed(self.ids[conn], k as usize);
    }

    fn index(&self, conn: ConnId) -> usize {
        self.ids
            .iter()
            .position(|&c| c == conn)
            .expect("a known connection")
    }

    /// Delivers and consumes everything, then checks completeness.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            for side in [NODE, SRV] {
                for conn in 0..self.ids.len() {
                    self.consume(side, conn, u64::MAX);
                }
            }
            self.collect_transmits();
            if self.wires.iter().all(|w| w.frames.is_empty()) {
                break;
            }
            for side in [NODE, SRV] {
                self.deliver(side, usize::MAX);
            }
        }
        assert!(
            self.wires.iter().all(|w| w.frames.is_empty()),
            "the wires drain"
        );
        for (idx, &id) in self.ids.iter().enumerate() {
            if self.dead[idx] {
                continue;
            }
            for from in [NODE, SRV] {
                let s = &self.streams[from][idx];
                assert_eq!(s.delivered, s.sent, "bytes lost on {id} from end {from}");
                assert_eq!(s.fin_seen, s.fin_sent, "FIN lost on {id} from end {from}");
                if !s.fin_sent {
                    let window = self.chans[from].send_window(id) as u64;
                    assert!(
                        window >= self.window / 2,
                        "credit lost on {id}: {window} left"
                    );
                }
            }
        }
    }
}

fn case() -> impl Strategy<Value = (u32, usize, Vec<Op>)> {
    (16u32..4096, 1usize..=4).prop_flat_map(|(window, conns)| {
        let ops = prop::collection::vec(op(conns, window as usize), 1..120);
        (Just(window), Just(conns), ops)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_byte_is_lost_duplicated_or_reordered_and_buffers_stay_within_the_window(
        (window, conns, ops) in case()
    ) {
        let mut model = Model::new(window, conns);
        for op in ops {
            model.apply(op);
        }
        model.settle();
    }
}

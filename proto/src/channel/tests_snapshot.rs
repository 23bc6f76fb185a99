//! Snapshot and restore (`snapshot.rs`): an io-server channel restored
//! from its encoded snapshot goes on exactly as the one it was taken of,
//! wherever it was cut; what is not open is refused; the encoding is
//! canonical, fixed per [`SNAP_VERSION`] and safe against any input.

use super::conns::{ConnSnap, ConnsSnap};
use super::liveness::LivenessSnap;
use super::output::OutputSnap;
use super::tests::{events, pump};
use super::*;
use crate::credit::{RecvCredit, SendCredit};
use crate::frame::{Request, Response};
use bytes::BufMut;
use proptest::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// `B_r` of both ends: small, so the script's large message is most of
/// a window and the node's reads send credits.
const WINDOW: u32 = 24 * 1024;
const INTERVAL: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(6);

/// The io-server's settings; every unanswered request pauses its input
/// (so that the count of them shows in [`Seen::SrvState`]).
fn srv_config() -> ChannelConfig {
    let mut c = ChannelConfig::new("tok")
        .window(WINDOW)
        .liveness(INTERVAL, TIMEOUT);
    c.max_unanswered = 0;
    c
}

fn node_config() -> ChannelConfig {
    ChannelConfig::new("tok").node("n1", 2).window(WINDOW)
}

/// `n` octets that differ from their neighbours, and between seeds
/// (made once: the main test plays the script some 40 000 times).
fn pattern(n: usize, seed: u8) -> &'static [u8] {
    static OCTETS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let all = OCTETS.get_or_init(|| (0..64 * 1024).map(|i| (i % 251) as u8).collect());
    let from = usize::from(seed) * 7;
    &all[from..from + n]
}

/// Where a run snapshots the io-server's channel, encodes, decodes and
/// restores it (dropping the old one).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// Before the io-server's input octet at this offset, counted from
    /// the end of the handshake: the input is fed in two pieces there.
    Input(usize),
    /// Right after the io-server's output piece of this number (from 1)
    /// is polled, before the node has it.
    Drain(usize),
}

/// One thing a run saw, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Srv(Transmit),
    Node(Transmit),
    SrvEvent(Event),
    NodeEvent(Event),
    /// The io-server's `poll_timeout`, after the run's first instant.
    SrvDue(Option<Duration>),
    /// What the io-server's calls answer.
    SrvState {
        stats: ChannelStats,
        frozen: bool,
        input_paused: bool,
        pending: usize,
        payload_pending: Option<(ConnId, usize)>,
        /// Per connection: send window, octets buffered, unacknowledged.
        conns: Vec<(ConnId, usize, u64, u64)>,
    },
}

/// What the snapshots of a run held besides the table (to show the cuts
/// reach every part of the channel).
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    inbuf: usize,
    partial: usize,
    events: usize,
    sealed: usize,
    out: usize,
    frozen: usize,
    liveness_pinged: usize,
}

impl Held {
    fn add(&mut self, o: Held) {
        self.inbuf += o.inbuf;
        self.partial += o.partial;
        self.events += o.events;
        self.sealed += o.sealed;
        self.out += o.out;
        self.frozen += o.frozen;
        self.liveness_pinged += o.liveness_pinged;
    }
}

/// A node and an io-server channel, open, playing [`script`]: every
/// transmit, event and io-server deadline is logged, with the io-server's
/// channel cut at `cut` (restored, or in the reference run only split
/// there the same way).
struct Run {
    node: Channel,
    srv: Channel,
    t0: Instant,
    now: Instant,
    cut: Option<Cut>,
    restore: bool,
    /// The io-server's input octets and output pieces so far.
    fed: usize,
    polled: usize,
    /// The io-server channel's pipe: payloads it spliced, in order.
    pipe: VecDeque<u8>,
    /// Whether the node consumes what it receives at once; what it has
    /// not yet consumed, per connection.
    node_reads: bool,
    node_unread: HashMap<ConnId, usize>,
    log: Vec<Seen>,
    restored: usize,
    held: Held,
}

impl Run {
    fn play(cut: Option<Cut>, restore: bool) -> Run {
        let t0 = Instant::now();
        let mut node = Channel::node(node_config());
        let mut srv = Channel::io_server(srv_config());
        srv.start(t0);
        pump(&mut node, &mut srv);
        srv.welcome(7);
        pump(&mut node, &mut srv);
        assert!(node.is_open() && srv.is_open());
        events(&mut node);
        events(&mut srv);
        let mut run = Run {
            node,
            srv,
            t0,
            now: t0,
            cut,
            restore,
            fed: 0,
            polled: 0,
            pipe: VecDeque::new(),
            node_reads: true,
            node_unread: HashMap::new(),
            log: Vec::new(),
            restored: 0,
            held: Held::default(),
        };
        script(&mut run);
        run
    }

    /// Moves every byte between the two ends (the io-server's spliced
    /// payloads from its pipe), cutting where asked.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            if let Some(t) = self.node.poll_transmit() {
                assert_eq!(t.spliced, 0, "the node splices nothing here");
                let bytes = t.bytes.clone();
                self.log.push(Seen::Node(t));
                self.feed_srv(&bytes);
                moved = true;
            }
            if let Some(t) = self.srv.poll_transmit() {
                self.polled += 1;
                let mut wire = t.bytes.to_vec();
                wire.extend(self.pipe.drain(..t.spliced));
                self.log.push(Seen::Srv(t));
                if self.cut == Some(Cut::Drain(self.polled)) {
                    self.cut_here();
                }
                let _ = self.node.handle_input(&wire);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn feed_srv(&mut self, bytes: &[u8]) {
        let mut from = 0;
        if let Some(Cut::Input(k)) = self.cut {
            if (self.fed..self.fed + bytes.len()).contains(&k) {
                from = k - self.fed;
                let _ = self.srv.handle_input(&bytes[..from]);
                self.cut_here();
            }
        }
        let _ = self.srv.handle_input(&bytes[from..]);
        self.fed += bytes.len();
    }

    fn cut_here(&mut self) {
        let snap = self.srv.snapshot(self.now).expect("the io-server is open");
        if !self.restore {
            return;
        }
        let count = |yes: bool| usize::from(yes);
        self.held.add(Held {
            inbuf: count(!snap.inbuf.is_empty()),
            partial: count(snap.partial.is_some()),
            events: count(!snap.events.is_empty()),
            sealed: count(!snap.output.sealed.is_empty()),
            out: count(!snap.output.out.is_empty()),
            frozen: count(snap.frozen),
            liveness_pinged: count(snap.liveness.as_ref().is_some_and(|l| l.pinged)),
        });
        let mut wire = BytesMut::new();
        snap.encode(&mut wire);
        let decoded = ChannelSnap::decode(&wire).expect("decodes");
        assert_eq!(decoded, snap, "decode(encode(snap)) is snap");
        let mut again = BytesMut::new();
        decoded.encode(&mut again);
        assert_eq!(again, wire, "the encoding is canonical");
        let restored = Channel::restore(srv_config(), decoded, self.now).expect("restores");
        drop(std::mem::replace(&mut self.srv, restored));
        self.restored += 1;
    }

    /// Pumps and lets both ends take their events until all is quiet;
    /// the node consumes what it received unless told not to read.
    fn settle(&mut self) {
        loop {
            self.pump();
            let srv = events(&mut self.srv);
            let node = events(&mut self.node);
            if srv.is_empty() && node.is_empty() {
                break;
            }
            self.log.extend(srv.into_iter().map(Seen::SrvEvent));
            for e in node {
                if let Event::MessageReceived { conn, data } = &e {
                    *self.node_unread.entry(*conn).or_default() += data.len();
                }
                self.log.push(Seen::NodeEvent(e));
            }
            self.node_consume();
        }
        let due = self.srv.poll_timeout().map(|at| at - self.t0);
        self.log.push(Seen::SrvDue(due));
        let srv = &self.srv;
        // The script's ids are all below 10.
        let conns = (1..10)
            .filter(|&c| srv.has_connection(c))
            .map(|c| {
                let window = srv.send_window(c);
                (c, window, srv.buffered(c), srv.unacknowledged(c))
            })
            .collect();
        self.log.push(Seen::SrvState {
            stats: srv.stats(),
            frozen: srv.is_frozen(),
            input_paused: srv.input_paused(),
            pending: srv.pending_transmit(),
            payload_pending: srv.payload_pending(),
            conns,
        });
    }

    fn node_consume(&mut self) {
        if self.node_reads {
            for (conn, n) in self.node_unread.drain() {
                self.node.consumed(conn, n);
            }
        }
    }

    /// The io-server delivers everything it holds of `conn` to its client.
    fn srv_consume(&mut self, conn: ConnId) {
        let n = self.srv.buffered(conn);
        self.srv.consumed(conn, n as usize);
    }

    /// A relay's read of `data` from `conn`'s client, straight into a frame.
    fn client_sends(&mut self, conn: ConnId, data: &[u8]) {
        let mut r = self.srv.reserve(conn, data.len()).unwrap().unwrap();
        r.payload_mut().put_slice(data);
        assert_eq!(self.srv.commit(r).unwrap(), data.len());
    }

    /// A relay's splice of `len` octets from `conn`'s client into the
    /// channel's pipe.
    fn client_splices(&mut self, conn: ConnId, len: usize, seed: u8) {
        let r = self.srv.reserve(conn, len).unwrap().unwrap();
        self.pipe.extend(pattern(len, seed));
        assert_eq!(self.srv.commit_spliced(r, len).unwrap(), len);
    }

    /// Time passes; the io-server's clock ticks.
    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.srv.handle_timeout(self.now);
        self.settle();
    }
}

/// A scripted exchange: a listener, relayed clients, data both ways
/// (read into frames, spliced, one frame large enough to arrive piece by
/// piece), credits and a credit stall, Fin, a close and a reset, an
/// outbound connection, a handed-over one, requests, a weight, pings both
/// ways, the liveness clock, and a freeze.
fn script(r: &mut Run) {
    let listener = r.node.make_connection().unwrap();
    let req = r
        .node
        .request(Request::Listen {
            conn: listener,
            backlog: 16,
        })
        .unwrap();
    // A ping behind the request: cut inside it, the request is unanswered.
    r.node.ping(7);
    r.settle();
    let ok = Response::Status {
        errno: 0,
        addr: None,
    };
    r.srv.respond(req, ok.clone());
    r.settle();

    let local = "192.0.2.9:80".parse().unwrap();
    let mut client = |host: u8| {
        let peer = std::net::SocketAddr::from(([192, 0, 2, host], 40_000 + u16::from(host)));
        r.srv.accept_connection(listener, peer, local).unwrap()
    };
    let (a, b, c) = (client(1), client(2), client(3));
    r.settle();
    // The node's accepts come in while the io-server has spliced
    // payloads queued.
    r.client_sends(a, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    r.client_splices(b, 3000, 1);
    r.client_splices(b, 10, 5);
    r.client_sends(b, b"and after the splices");
    r.srv.send_message(c, b"hello from c").unwrap();
    r.node.accepted(a);
    r.node.accepted(b);
    r.settle();
    r.node.send_message(a, b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
    r.node
        .send_message(b, pattern(STREAM_MIN + 1500, 2))
        .unwrap();
    r.node.send_message(c, b"c's answer").unwrap();
    r.settle();
    r.tick(Duration::from_millis(500));
    r.srv_consume(a);
    r.srv_consume(b);
    r.settle();

    // Fin both ways on a, then the node closes it; b is reset.
    r.srv.send_fin(a).unwrap();
    r.settle();
    r.node.send_fin(a).unwrap();
    r.node.close_connection(a, 0);
    r.node.close_connection(b, ECONNRESET);
    r.settle();

    // A credit stall on c: the node stops reading, the io-server sends
    // past the window, the node reads again.
    r.node_reads = false;
    let big = pattern(WINDOW as usize + 700, 3);
    let first = r.srv.send_message(c, big).unwrap();
    assert!(first < big.len());
    assert_eq!(r.srv.send_message(c, &big[first..]).unwrap(), 0);
    r.settle();
    r.node_reads = true;
    r.node_consume();
    r.settle();
    r.srv.send_message(c, &big[first..]).unwrap();
    r.settle();

    // Frozen: the io-server reads no client, the node's bytes still come.
    r.srv.freeze();
    assert!(r.srv.reserve(c, 100).unwrap().is_none());
    r.node.send_message(c, pattern(1000, 4)).unwrap();
    r.node.ping(42);
    r.node.set_weight(5);
    r.settle();
    r.srv.unfreeze();
    r.srv_consume(c);
    r.client_sends(c, b"after the freeze");
    r.settle();

    // An outbound connection the node opens, and a handed-over one.
    let d = r.node.make_connection().unwrap();
    let addr = "198.51.100.1:443".parse().unwrap();
    let req = r.node.request(Request::Connect { conn: d, addr }).unwrap();
    r.settle();
    r.srv.open_connection(d).unwrap();
    r.srv.respond(
        req,
        Response::Status {
            errno: 0,
            addr: Some("192.0.2.9:50000".parse().unwrap()),
        },
    );
    r.client_sends(d, b"server hello");
    r.settle();
    r.node.send_message(d, b"client hello").unwrap();
    let h = r.srv.hand_connection().unwrap();
    r.node.accepted(h);
    r.settle();

    // Silence: the io-server's clock notes the last input, pings, and
    // hears the Pong.
    r.tick(INTERVAL);
    r.tick(INTERVAL);
    r.tick(Duration::from_millis(10));
    // Output the node does not answer: the next tick hears nothing new
    // and pings again (the next token).
    r.node_reads = false;
    r.srv.send_message(c, b"unanswered").unwrap();
    r.settle();
    r.tick(INTERVAL);
    r.node_reads = true;
    r.node_consume();
    r.settle();

    // The io-server reports an error on c, then closes c and d.
    r.srv.report_error(c, 32);
    r.srv.close_connection(c, 0);
    r.node.close_connection(d, 0);
    r.settle();
}

/// The proof that a snapshot holds everything: the io-server's channel
/// is snapshotted, encoded, decoded and restored (the old one dropped)
/// before every octet of its input, so inside frame headers and
/// payloads, and after every piece of its output; each time the bytes
/// both ends send, the events both raise and the io-server's deadlines
/// are those of a run that was only split at the same place.
#[test]
fn a_restored_channel_goes_on_exactly_as_the_original_at_every_cut() {
    let plain = Run::play(None, false);
    assert!(plain.fed > STREAM_MIN && plain.polled > 10);
    let mut held = Held::default();
    let cuts = (0..plain.fed)
        .map(Cut::Input)
        .chain((1..=plain.polled).map(Cut::Drain));
    for cut in cuts {
        let reference = Run::play(Some(cut), false);
        let restored = Run::play(Some(cut), true);
        assert_eq!(restored.restored, 1, "{cut:?} happened once");
        if let Some(i) = (0..reference.log.len().max(restored.log.len()))
            .find(|&i| reference.log.get(i) != restored.log.get(i))
        {
            panic!(
                "{cut:?}: entry {i} differs:\n  plain    {:?}\n  restored {:?}",
                reference.log.get(i),
                restored.log.get(i)
            );
        }
        if let Cut::Drain(_) = cut {
            assert!(reference.log == plain.log, "an output cut splits nothing");
        }
        held.add(restored.held);
    }
    // Every part of the channel was in some snapshot.
    let Held {
        inbuf,
        partial,
        events,
        sealed,
        out,
        frozen,
        liveness_pinged,
    } = held;
    for (what, n) in [
        ("undecoded input", inbuf),
        ("a frame read halfway", partial),
        ("pending events", events),
        ("sealed output", sealed),
        ("open output", out),
        ("frozen", frozen),
        ("a ping awaiting its answer", liveness_pinged),
    ] {
        assert!(n > 0, "no snapshot held {what}");
    }
}

/// An open pair of [`srv_config`] and [`node_config`] whose clocks
/// started at `t0`, with one client connection, and the events drained.
fn open_with_a_client(t0: Instant) -> (Channel, Channel, ConnId) {
    let mut node = Channel::node(node_config());
    let mut srv = Channel::io_server(srv_config());
    srv.start(t0);
    pump(&mut node, &mut srv);
    srv.welcome(7);
    let conn = srv
        .accept_connection(
            2,
            "192.0.2.1:1".parse().unwrap(),
            "192.0.2.9:80".parse().unwrap(),
        )
        .unwrap();
    pump(&mut node, &mut srv);
    events(&mut node);
    events(&mut srv);
    (node, srv, conn)
}

#[test]
fn only_an_open_channel_without_a_loan_is_snapshotted() {
    let now = Instant::now();
    let mut node = Channel::node(node_config());
    let mut srv = Channel::io_server(srv_config());
    let refused = |ch: &Channel| ch.snapshot(now).unwrap_err();
    assert_eq!(refused(&srv), SnapError::NotOpen("before Hello"));
    assert_eq!(refused(&node), SnapError::NotOpen("before Challenge"));
    srv.handle_input(&node.poll_transmit().unwrap().bytes)
        .unwrap();
    assert_eq!(refused(&srv), SnapError::NotOpen("before Auth"));
    node.handle_input(&srv.poll_transmit().unwrap().bytes)
        .unwrap();
    assert_eq!(refused(&node), SnapError::NotOpen("before Welcome"));
    assert_eq!(
        refused(&node).to_string(),
        "only an open channel is snapshotted, not one before Welcome"
    );

    let (_node, mut srv, conn) = open_with_a_client(now);
    let r = srv.reserve(conn, 10).unwrap().unwrap();
    assert_eq!(refused(&srv), SnapError::Reserved(conn));
    srv.commit(r).unwrap();
    assert!(srv.snapshot(now).is_ok(), "committed, it is taken");
    srv.close("going");
    assert_eq!(refused(&srv), SnapError::NotOpen("after close"));
}

/// §2 step 3 of the design: a frozen channel lends no room, so a relay
/// reads no client; the freeze moves with the snapshot; nothing is
/// counted as a stall, and unfrozen the window is as it was.
#[test]
fn a_frozen_channel_lends_no_room_and_unfreezes_with_its_window_intact() {
    let now = Instant::now();
    let (mut node, mut srv, conn) = open_with_a_client(now);
    srv.freeze();
    assert!(srv.is_frozen());
    assert_eq!(srv.send_window(conn), 0);
    assert!(srv.reserve(conn, 100).unwrap().is_none());
    assert_eq!(srv.send_message(conn, b"held").unwrap(), 0);
    assert_eq!(srv.stats().credit_stalls, 0, "a freeze is not a stall");
    assert_eq!(
        srv.send_message(99, b"x"),
        Err(CallError::UnknownConnection(99)),
        "errors are still errors"
    );
    // The node's bytes still come in, and Fin still goes out.
    node.send_message(conn, b"from the node").unwrap();
    pump(&mut node, &mut srv);
    assert_eq!(srv.buffered(conn), 13);
    let snap = srv.snapshot(now).unwrap();
    let mut srv = Channel::restore(srv_config(), snap, now).unwrap();
    assert!(srv.is_frozen(), "still frozen after a restore");
    assert_eq!(srv.send_window(conn), 0);
    srv.unfreeze();
    assert_eq!(srv.send_window(conn), WINDOW as usize);
    assert_eq!(srv.send_message(conn, b"sent").unwrap(), 4);
    srv.send_fin(conn).unwrap();
    pump(&mut node, &mut srv);
    assert_eq!(
        events(&mut node),
        vec![
            Event::MessageReceived {
                conn,
                data: Bytes::from_static(b"sent")
            },
            Event::Fin { conn }
        ]
    );
}

/// Instants are carried as ages: restored after a pause, the channel's
/// deadlines are as far ahead as they were at the snapshot, so the pause
/// does not count as the peer's silence.
#[test]
fn deadlines_are_as_far_ahead_after_a_restore_as_at_the_snapshot() {
    let t0 = Instant::now();
    let (_node, mut srv, _) = open_with_a_client(t0);
    srv.handle_timeout(t0 + Duration::from_secs(1));
    let due = srv.poll_timeout().unwrap();
    let taken = t0 + Duration::from_millis(1500);
    let snap = srv.snapshot(taken).unwrap();
    let pause = Duration::from_secs(30);
    let mut srv = Channel::restore(srv_config(), snap, taken + pause).unwrap();
    assert_eq!(srv.poll_timeout(), Some(due + pause));
    srv.handle_timeout(due + pause - Duration::from_nanos(1));
    assert_eq!(srv.pending_transmit(), 0, "no ping a nanosecond early");
    srv.handle_timeout(due + pause);
    assert!(srv.pending_transmit() > 0, "the ping is due");
    assert!(srv.is_open());
}

#[test]
fn an_instant_is_its_age_before_now_on_either_side_of_it() {
    use super::snapshot::{age, at};
    let now = Instant::now();
    for nanos in [0, 1, 1_500_000_000] {
        let d = Duration::from_nanos(nanos);
        let n = nanos as i64;
        assert_eq!((age(now, now - d), at(now, n)), (n, Some(now - d)));
        assert_eq!((age(now, now + d), at(now, -n)), (-n, Some(now + d)));
    }
}

/// A node end is restored as well, and goes on with the same ids.
#[test]
fn a_node_channel_restores_and_goes_on_with_its_ids() {
    let now = Instant::now();
    let (mut node, mut srv, conn) = open_with_a_client(now);
    let before = node.make_connection().unwrap();
    let snap = node.snapshot(now).unwrap();
    assert_eq!(snap.role(), Role::Node);
    let mut node = Channel::restore(node_config(), snap, now).unwrap();
    assert_eq!(node.make_connection().unwrap(), before + 2);
    node.send_message(conn, b"still here").unwrap();
    let req = node
        .request(Request::Listen {
            conn: before,
            backlog: 1,
        })
        .unwrap();
    pump(&mut node, &mut srv);
    let got = events(&mut srv);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(matches!(got[1], Event::Request { req: r, .. } if r == req));
}

/// A snapshot with something in every part: a busy io-server channel.
fn busy_snapshot() -> (ChannelSnap, BytesMut) {
    let mut run = Run::play(None, false);
    let srv = &mut run.srv;
    srv.hand_connection().unwrap();
    let conn = 1000;
    srv.open_connection(conn).unwrap();
    srv.send_message(conn, b"queued").unwrap();
    srv.freeze();
    let mut frames = BytesMut::new();
    codec::encode(&Frame::Ping { token: 9 }, &mut frames);
    codec::encode_data(conn, &[1; STREAM_MIN + 10], &mut frames);
    srv.handle_input(&frames[..frames.len() - 5]).unwrap();
    let snap = srv.snapshot(run.now).unwrap();
    assert!(snap.partial.is_some() && !snap.events.is_empty());
    let mut wire = BytesMut::new();
    snap.encode(&mut wire);
    (snap, wire)
}

#[test]
fn a_cut_or_padded_encoding_or_another_version_is_an_error() {
    let (_, wire) = busy_snapshot();
    for len in 0..wire.len() {
        assert_eq!(
            ChannelSnap::decode(&wire[..len]),
            Err(SnapError::Truncated),
            "cut to {len} octets"
        );
    }
    let mut padded = wire.to_vec();
    padded.push(0);
    assert_eq!(
        ChannelSnap::decode(&padded),
        Err(SnapError::Malformed("trailing bytes"))
    );
    let mut other = wire.to_vec();
    other[..4].copy_from_slice(&(SNAP_VERSION + 1).to_be_bytes());
    let err = ChannelSnap::decode(&other).unwrap_err();
    assert_eq!(err, SnapError::Version(SNAP_VERSION + 1));
    assert_eq!(
        err.to_string(),
        format!(
            "snapshot version {}, this build reads version {SNAP_VERSION}",
            SNAP_VERSION + 1
        )
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = ChannelSnap::decode(&bytes);
    }

    /// Octets of a real encoding changed: decoding is an error or a
    /// snapshot, and such a snapshot restores and runs without a panic.
    #[test]
    fn a_damaged_encoding_never_panics_decode_restore_or_the_channel(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (_, wire) = BUSY.with(|b| b.clone());
        let mut bytes = wire.to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Ok(snap) = ChannelSnap::decode(&bytes) {
            let now = Instant::now();
            let conns: Vec<ConnId> = snap.conns.conns.iter().map(|c| c.conn).collect();
            if let Ok(mut ch) = Channel::restore(srv_config(), snap, now) {
                ch.unfreeze();
                let _ = ch.handle_input(&[0, 0, 0, 10, 1, 0x34, 0, 0, 0, 0, 0, 0, 0, 3]);
                for conn in conns {
                    let _ = ch.send_message(conn, b"x");
                    ch.consumed(conn, 1 << 20);
                    let _ = ch.send_fin(conn);
                }
                ch.handle_timeout(now + Duration::from_secs(3600));
                while ch.poll_transmit().is_some() {}
                while ch.poll_event().is_some() {}
            }
        }
    }
}

thread_local! {
    static BUSY: (ChannelSnap, BytesMut) = busy_snapshot();
}

/// A small snapshot with every kind of field and event, made by hand so
/// that its encoding changes only when the format does.
fn sample() -> ChannelSnap {
    let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    ChannelSnap {
        role: Role::IoServer,
        frozen: true,
        version: 3,
        deadline: Some(-2_000_000_000),
        next_ping: 4,
        next_req: 1,
        unanswered: 1,
        input: 12_345,
        stats: ChannelStats {
            bytes_sent: 1,
            bytes_received: 2,
            credit_stalls: 3,
            bytes_spliced: 4,
            bytes_received_spliced: 5,
            creditless_dropped: 6,
            pings_received: 7,
        },
        conns: ConnsSnap {
            conns: vec![
                ConnSnap {
                    conn: 1,
                    send: SendCredit::from_parts(100, 4096, 4096).unwrap(),
                    recv: RecvCredit::from_parts(50, 20, 4096, 4096).unwrap(),
                    fin_sent: true,
                    fin_received: false,
                },
                ConnSnap {
                    conn: 4,
                    send: SendCredit::from_parts(4096, 4096, 4096).unwrap(),
                    recv: RecvCredit::from_parts(3000, 2500, 4096, 6596).unwrap(),
                    fin_sent: false,
                    fin_received: true,
                },
            ],
            handed: vec![3],
            next: 5,
            peer_window: 4096,
            window: 4096,
        },
        inbuf: Bytes::from_static(&[0, 0, 0, 10, 1, 0x33]),
        partial: Some((4, 100)),
        liveness: Some(LivenessSnap {
            interval: INTERVAL,
            timeout: TIMEOUT,
            heard_age: Some(1_500_000_000),
            heard: 12_000,
            pinged: true,
        }),
        output: OutputSnap {
            sealed: vec![Transmit {
                bytes: Bytes::from_static(b"head"),
                spliced: 600,
            }],
            out: Bytes::from_static(b"tail"),
            hand_off: false,
        },
        events: vec![
            Event::NodeAuthenticated {
                node: "n1".into(),
                weight: 2,
            },
            Event::Welcome { node_id: 7 },
            Event::Request {
                req: 1,
                request: Request::Connect {
                    conn: 4,
                    addr: addr("198.51.100.1:443"),
                },
            },
            Event::Response {
                req: 2,
                response: Response::OptValue {
                    errno: 0,
                    value: Bytes::from_static(b"v"),
                },
            },
            Event::ConnectionAccepted {
                listener: 2,
                conn: 1,
                peer: addr("[2001:db8::1]:40000"),
                local: addr("192.0.2.9:80"),
            },
            Event::ConnectionClosed {
                conn: 1,
                errno: ECONNRESET,
            },
            Event::Accepted { conn: 3 },
            Event::MessageReceived {
                conn: 4,
                data: Bytes::from_static(b"abc"),
            },
            Event::MessageSpliced { conn: 4, len: 10 },
            Event::Fin { conn: 4 },
            Event::BufferAvailable { conn: 1 },
            Event::WeightChanged { weight: 5 },
        ],
    }
}

/// The encoding of a fixed sample is the one in `snapshot.golden` for
/// this [`SNAP_VERSION`]: a format changed without a bump fails here, and
/// blessing (`SAPS_BLESS_SNAPSHOT=1`) refuses to rewrite the file of a
/// version whose encoding changed.
#[test]
fn a_sample_encodes_as_the_golden_file_of_its_version() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/channel/snapshot.golden");
    let mut wire = BytesMut::new();
    sample().encode(&mut wire);
    let golden = crate::golden::Golden {
        path: &path,
        sample: "sample() in tests_snapshot.rs",
        version_name: "SNAP_VERSION",
        version: SNAP_VERSION,
        bless_var: "SAPS_BLESS_SNAPSHOT",
        bless_cmd: "cargo test -p saps-proto",
    };
    if let Some(octets) = golden.check(&wire) {
        assert_eq!(ChannelSnap::decode(&octets), Ok(sample()));
    }
}

/// A node's channel holding a `Connecting` event (protocol version 4)
/// round trips; it is not in `sample()` (an io-server's channel, which
/// never raises it), so the golden file of this version is unchanged.
#[test]
fn a_connecting_event_of_a_node_round_trips() {
    let mut snap = sample();
    snap.role = Role::Node;
    snap.events.push(Event::Connecting {
        conn: 6,
        local: "192.0.2.1:40000".parse().unwrap(),
    });
    let mut wire = BytesMut::new();
    snap.encode(&mut wire);
    assert_eq!(ChannelSnap::decode(&wire), Ok(snap));
}

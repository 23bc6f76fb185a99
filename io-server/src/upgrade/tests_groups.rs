//! Listener groups rebuilt from their state decide exactly as the
//! originals: a differential run on real sockets for every scheduler,
//! and a property over random runs.

use super::state::*;
use crate::config::SchedulerKind;
use crate::groups::{Bind, Groups, Held, Limits, Orphan, Placement};
use crate::state::Client;
use crate::traffic::{MemberId, NodeId};
use clap::ValueEnum;
use proptest::prelude::*;
use saps_fabric::endpoint::Replay;
use saps_fabric::frame::bind_flags;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

const A: NodeId = 1;
const B: NodeId = 2;
const C: NodeId = 3;
const D: NodeId = 4;

/// How long the handover takes in the run: the restored groups live
/// this much later than the original (their instants are ages).
const PAUSE: Duration = Duration::from_secs(5);

fn member(node: NodeId, listener: u64) -> MemberId {
    MemberId { node, listener }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn web() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 80))
}

fn api() -> SocketAddr {
    "[::1]:81".parse().unwrap()
}

fn queueing() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 82))
}

fn old_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 83))
}

fn bound_only() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 84))
}

fn from(n: u32) -> IpAddr {
    IpAddr::from([198, 51, 100, (n % 250) as u8])
}

/// MWLC's bytes in flight, made up but fixed.
fn pending(node: NodeId, conn: u64) -> u64 {
    (u64::from(node) * 31 + conn) % 17
}

fn no_held(_: MemberId) -> Held {
    Held::default()
}

/// Real TCP connections on the loopback for the clients; the connecting
/// ends are kept open here.
struct Net {
    listener: TcpListener,
    ends: Vec<TcpStream>,
}

impl Net {
    fn new() -> Net {
        Net {
            listener: TcpListener::bind("127.0.0.1:0").unwrap(),
            ends: Vec::new(),
        }
    }

    /// Client `n` (its peer tells it apart) with `replay`, and a second
    /// handle on the same socket for the restored side of the run.
    fn client(&mut self, n: u32, replay: &[u8]) -> (Client, Client) {
        self.ends
            .push(TcpStream::connect(self.listener.local_addr().unwrap()).unwrap());
        let (stream, _) = self.listener.accept().unwrap();
        let peer = SocketAddr::from(([192, 0, 2, (n % 250) as u8], 30000 + n as u16));
        let make = |stream| Client {
            stream,
            peer,
            replay: Replay {
                data: bytes::Bytes::copy_from_slice(replay),
                fin: n.is_multiple_of(2),
            },
        };
        let other = stream.try_clone().unwrap();
        (make(stream), make(other))
    }
}

fn listen(g: &mut Groups<Client>, key: SocketAddr, node: NodeId, conn: u64, flags: u32) {
    if g.bind(node, conn, key, flags).unwrap() == Bind::OpenPort {
        g.open(key, node, conn, flags);
    }
    assert!(g.listen(key, node, conn, 16).unwrap());
}

fn placed(p: Placement<Client>) -> String {
    match p {
        Placement::Member(m, c) => format!("{} to {m:?}", c.peer),
        Placement::Queued { expire } => format!("queued, timer {expire}"),
        Placement::QueueFull(c) => format!("{} refused: queue full", c.peer),
        Placement::NoGroup(c) => format!("{} refused: no group", c.peer),
    }
}

fn peers(clients: impl IntoIterator<Item = Client>) -> Vec<SocketAddr> {
    clients.into_iter().map(|c| c.peer).collect()
}

/// Groups of `kind` built through their API before `t0`: four nodes
/// joined at different times (two still in their slow start, one of
/// weight 0), a group of three members, one of two (IPv6), a queue with
/// clients (with replays) and paused, an orphaned port, a port bound and
/// not listened on; traffic in the ledger; clients dispatched so the
/// schedulers keep state. The orphaned port, as `unbind` told it.
fn build(kind: SchedulerKind, t0: Instant, net: &mut Net) -> (Groups<Client>, Orphan) {
    let limits = Limits {
        per_node: 0,
        per_group: usize::MAX,
        max_queue: 3,
        queue_timeout: secs(30),
    };
    let mut g = Groups::with_limits(kind, limits);
    g.set_slow_start(secs(60));
    g.join(A, 3, t0 - secs(100));
    g.join(B, 2, t0 - secs(30));
    g.join(C, 1, t0 - secs(10));
    g.join(D, 0, t0 - secs(100));
    assert!(g.ramp(t0 - secs(1)));
    listen(&mut g, web(), A, 10, bind_flags::REUSEPORT);
    listen(&mut g, web(), B, 20, bind_flags::REUSEPORT);
    listen(&mut g, web(), C, 30, 0);
    listen(&mut g, api(), A, 11, 0);
    listen(&mut g, api(), B, 21, bind_flags::V6ONLY);
    listen(&mut g, queueing(), D, 32, 0);
    listen(&mut g, old_port(), D, 33, 0);
    assert_eq!(g.bind(B, 22, bound_only(), 0), Ok(Bind::OpenPort));
    g.open(bound_only(), B, 22, 0);
    let unbound = g.unbind(D, Some(33));
    assert_eq!(unbound.orphaned.len(), 1);
    let orphan = unbound.orphaned[0];

    g.connection_started(A, 100, Some((web(), member(A, 10))));
    g.connection_started(B, 200, Some((web(), member(B, 20))));
    g.connection_started(C, 300, Some((web(), member(C, 30))));
    g.connection_started(A, 101, None);
    g.handed_off(api(), member(B, 21));
    g.connection_finished(A, 100, (10, 20));

    let mut n = 1000;
    let mut dispatch = |g: &mut Groups<Client>, key, at| {
        n += 1;
        let (c, _) = net.client(n, format!("sent before {n}").as_bytes());
        g.dispatch(key, c, from(n), at, pending, no_held)
    };
    for _ in 0..5 {
        assert!(matches!(
            dispatch(&mut g, web(), t0 - secs(3)),
            Placement::Member(..)
        ));
    }
    for _ in 0..2 {
        dispatch(&mut g, api(), t0 - secs(3));
    }
    for age in [40, 20, 5] {
        let p = dispatch(&mut g, queueing(), t0 - secs(age));
        assert!(matches!(p, Placement::Queued { .. }), "{}", placed(p));
    }
    assert!(matches!(
        dispatch(&mut g, queueing(), t0 - secs(4)),
        Placement::QueueFull(_)
    ));
    assert!(!g.admits(queueing(), no_held), "paused");
    (g, orphan)
}

/// The same calls on the original (times from `base` = `t0`) and on the
/// restored groups (`base` = `t0 + PAUSE`): what each call answered.
fn drive(
    g: &mut Groups<Client>,
    base: Instant,
    clients: &mut VecDeque<Client>,
    orphan: Orphan,
) -> Vec<String> {
    let at = |s: u64| base + secs(s);
    let mut out = Vec::new();
    let mut conn = 500;
    let mut dispatch = |g: &mut Groups<Client>, key, t, out: &mut Vec<String>| {
        let c = clients.pop_front().expect("enough clients");
        let n = u32::from(c.peer.port());
        let p = g.dispatch(key, c, from(n), at(t), pending, no_held);
        if let Placement::Member(m, _) = &p {
            // Relayed: the least-connection schedulers see it.
            conn += 1;
            g.connection_started(m.node, conn, Some((key, *m)));
        }
        out.push(format!("{key}: {}", placed(p)));
    };
    for _ in 0..6 {
        dispatch(g, web(), 1, &mut out);
    }
    for _ in 0..3 {
        dispatch(g, api(), 1, &mut out);
    }
    let q = queueing();
    out.push(format!(
        "next {:?}",
        g.next_queued(q, no_held).map(|c| c.peer)
    ));
    out.push(format!("resume {}", g.resume(q, no_held)));
    out.push(format!("weight D {}", g.set_weight(D, 2)));
    out.push(format!("resume {}", g.resume(q, no_held)));
    out.push(format!("waiting {:?}", g.waiting()));
    for _ in 0..2 {
        out.push(format!(
            "next {:?}",
            g.next_queued(q, no_held).map(|c| c.peer)
        ));
    }
    dispatch(g, q, 2, &mut out);
    g.set_weight(D, 0);
    dispatch(g, q, 2, &mut out);
    dispatch(g, q, 3, &mut out);
    let (gone, next) = g.expire(q, at(26));
    let next = next.map(|n| n.duration_since(base));
    out.push(format!("expired {:?}, next at {next:?}", peers(gone)));
    out.push(format!("ramp {} {}", g.ramp(at(20)), g.weight(B)));
    out.push(format!("ramping {:?}", g.ramping_to(B)));
    out.push(format!("weight A {}", g.set_weight(A, 0)));
    for _ in 0..4 {
        dispatch(g, web(), 21, &mut out);
    }
    out.push(format!("leave {:?}", g.leave(B)));
    for _ in 0..3 {
        dispatch(g, web(), 22, &mut out);
    }
    for _ in 0..2 {
        dispatch(g, api(), 22, &mut out);
    }
    out.push(format!("lingers {}", g.lingers(D, old_port(), 0, at(30))));
    out.push(format!("lingers {}", g.lingers(D, old_port(), 0, at(200))));
    let closed = g.close_orphan(orphan).map(peers);
    out.push(format!("orphan closed {closed:?}"));
    g.connection_finished(C, 300, (5, 6));
    g.connection_started(A, 102, Some((web(), member(A, 10))));
    g.handed_off(web(), member(C, 30));
    out.push(format!(
        "members {:?}",
        g.iter()
            .map(|(k, g)| (k, g.members().to_vec()))
            .collect::<Vec<_>>()
    ));
    out.push(format!(
        "queues {:?}",
        g.iter()
            .map(|(k, g)| (k, g.queued(), g.paused(), g.queue_counts()))
            .collect::<Vec<_>>()
    ));
    let next = g.expire(api(), at(40)).1.map(|n| n.duration_since(base));
    out.push(format!("api queue expires at {next:?}"));
    out.push(format!("left in queues {:?}", peers(g.take_queues())));
    out
}

/// A snapshot of `g` at `now` (changed by `tamper`), through the
/// envelope, restored at `later` on copies of the descriptors. Also the snapshot, and the inode of
/// each descriptor sent.
fn hand_over(
    g: &Groups<Client>,
    now: Instant,
    later: Instant,
    tamper: impl FnOnce(&mut GroupsSnap),
) -> (Groups<Client>, GroupsSnap, Vec<u64>) {
    let mut capture = Capture::default();
    let mut snap = g.snapshot(now, &mut capture);
    tamper(&mut snap);
    let inodes: Vec<u64> = capture.fds.iter().map(|&fd| inode(fd)).collect();
    let copies: Vec<OwnedFd> = (capture.fds.iter())
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect();
    let state = StateSnap {
        server: ServerSnap {
            uptime_ns: 0,
            refused: 0,
            upgrades: 0,
            timed_out: TimedOutSnap {
                idle: 0,
                half_closed: 0,
                connect: 0,
            },
            handshakes: HandshakesSnap {
                refused: 0,
                failed: 0,
                silent_nodes: 0,
            },
        },
        tables: TablesSnap {
            next_node: 5,
            groups: snap.clone(),
            ports: Vec::new(),
            nodes: Vec::new(),
            left_behind: Vec::new(),
        },
        listeners: Vec::new(),
    };
    let fds = copies.len() as u32;
    let wire = Envelope::seal(&state, capture.blob, fds).unwrap().encode();
    let e = Envelope::decode(&wire).unwrap();
    assert_eq!(e.fds, fds);
    let mut src = Source::new(copies, e.blob.clone());
    let restored = Groups::restore(e.state().unwrap().tables.groups, &mut src, later).unwrap();
    src.finish().unwrap();
    (restored, snap, inodes)
}

/// The clients of a run, in pairs: for the original, for the restored.
fn clients(net: &mut Net) -> (VecDeque<Client>, VecDeque<Client>) {
    let (mut ours, mut theirs) = (VecDeque::new(), VecDeque::new());
    for n in 0..30 {
        let (a, b) = net.client(n, format!("replay {n}").as_bytes());
        ours.push_back(a);
        theirs.push_back(b);
    }
    (ours, theirs)
}

fn inode(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    file.metadata().unwrap().ino()
}

/// The groups rebuilt from their state, `PAUSE` later, answer every call
/// of a run (dispatches to members, queue order and expiry, pauses,
/// weight changes, slow start, a node's leaving, lingering, an orphan's
/// closing, the ledger) exactly as the original does, for every
/// scheduler; the queued clients are the same sockets; and the two
/// snapshots at the end are equal.
#[test]
fn restored_groups_decide_exactly_as_the_original_for_every_scheduler() {
    for &kind in SchedulerKind::value_variants() {
        let mut net = Net::new();
        let t0 = Instant::now();
        let (mut original, orphan) = build(kind, t0, &mut net);
        let (mut restored, snap, inodes) = hand_over(&original, t0, t0 + PAUSE, |_| {});

        let mut capture = Capture::default();
        let again = restored.snapshot(t0 + PAUSE, &mut capture);
        assert_eq!(again, snap, "{kind:?}: restored state snapshots the same");
        let restored_inodes: Vec<u64> = capture.fds.iter().map(|&fd| inode(fd)).collect();
        assert_eq!(
            restored_inodes, inodes,
            "{kind:?}: the same sockets, in order"
        );
        let q = snap.groups.iter().find(|g| g.key == queueing()).unwrap();
        assert_eq!(q.queue.len(), 3, "{kind:?}: clients queued");
        assert!(q.paused);
        assert!(!snap.ramps.is_empty(), "{kind:?}: a node ramps");
        let mut before = Capture::default();
        original.snapshot(t0, &mut before);
        assert!(!before.blob.is_empty(), "{kind:?}: replays");
        assert_eq!(capture.blob, before.blob, "{kind:?}: the same replays");
        drop((capture, before));

        let (mut ours, mut theirs) = clients(&mut net);
        let expected = drive(&mut original, t0, &mut ours, orphan);
        let found = drive(&mut restored, t0 + PAUSE, &mut theirs, orphan);
        assert_eq!(found, expected, "{kind:?}");
        let end = secs(300);
        let mut c1 = Capture::default();
        let mut c2 = Capture::default();
        assert_eq!(
            restored.snapshot(t0 + PAUSE + end, &mut c2),
            original.snapshot(t0 + end, &mut c1),
            "{kind:?}: the same state at the end"
        );
        assert_eq!(c2.blob, c1.blob, "{kind:?}: the same replays at the end");
    }
}

/// The run has teeth: groups restored with their schedulers' state
/// forgotten (as if `state()` answered `None`) decide otherwise, for the
/// two schedulers that keep one.
#[test]
fn the_run_tells_a_restore_that_forgets_scheduler_state() {
    for kind in [SchedulerKind::Rr, SchedulerKind::Wrr] {
        let mut net = Net::new();
        let t0 = Instant::now();
        let (mut original, orphan) = build(kind, t0, &mut net);
        let forget = |snap: &mut GroupsSnap| {
            for g in &mut snap.groups {
                g.scheduler = crate::scheduler::new(kind).state();
            }
        };
        let (mut restored, _, _) = hand_over(&original, t0, t0 + PAUSE, forget);
        let (mut ours, mut theirs) = clients(&mut net);
        let expected = drive(&mut original, t0, &mut ours, orphan);
        let found = drive(&mut restored, t0 + PAUSE, &mut theirs, orphan);
        assert_ne!(found, expected, "{kind:?}");
    }
}

/// A state that does not fit the groups is refused: a scheduler's state
/// of another kind, a group twice, a queued client's descriptor missing.
#[test]
fn a_state_that_does_not_fit_is_refused() {
    let mut net = Net::new();
    let t0 = Instant::now();
    let (g, _) = build(SchedulerKind::Wrr, t0, &mut net);
    let mut capture = Capture::default();
    let snap = g.snapshot(t0, &mut capture);
    let copies = || -> Vec<OwnedFd> {
        (capture.fds.iter())
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect()
    };
    let restore = |snap: GroupsSnap, fds: Vec<OwnedFd>| {
        let mut src = Source::new(fds, capture.blob.clone());
        Groups::<Client>::restore(snap, &mut src, t0).map(|_| ())
    };
    assert!(restore(snap.clone(), copies()).is_ok());

    let mut rr = snap.clone();
    rr.groups[0].scheduler = SchedState::Rr { next: 0 };
    let e = restore(rr, copies()).unwrap_err();
    assert!(e.to_string().contains("is no wrr state"), "{e}");

    let mut twice = snap.clone();
    twice.groups.push(twice.groups[0].clone());
    let e = restore(twice, copies()).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");

    let mut weights = snap.clone();
    weights.weights.push(weights.weights[0]);
    assert!(matches!(
        restore(weights, copies()),
        Err(StateError::Invalid(_))
    ));

    let mut fewer = copies();
    fewer.pop();
    assert!(matches!(
        restore(snap, fewer),
        Err(StateError::FdIndex { .. })
    ));
}

// ---- the property: any run, cut anywhere ---------------------------------

/// A queued client for the property: a descriptor (of `/dev/null`) and a
/// number, carried in its peer's port and in its replay.
struct Tagged {
    fd: OwnedFd,
    tag: u16,
}

fn tagged(tag: u16) -> Tagged {
    let fd = std::fs::File::open("/dev/null").unwrap().into();
    Tagged { fd, tag }
}

impl QueuedClient for Tagged {
    fn capture<'a>(&'a self, into: &mut Capture<'a>) -> ClientSnap {
        ClientSnap {
            fd: into.fd(self.fd.as_fd()),
            peer: SocketAddr::from(([192, 0, 2, 1], self.tag)),
            replay: into.bytes(&self.tag.to_be_bytes()),
            replay_fin: false,
        }
    }

    fn rebuild(snap: &ClientSnap, from: &mut Source) -> Result<Tagged, StateError> {
        let replay = from.bytes(snap.replay)?;
        let tag = u16::from_be_bytes(replay.try_into().unwrap());
        assert_eq!(tag, snap.peer.port(), "the replay is the client's");
        Ok(Tagged {
            fd: from.fd(snap.fd)?,
            tag,
        })
    }
}

/// One call into [`Groups`]; ports are indices into [`KEYS`], times are
/// seconds after the run's base.
#[derive(Debug, Clone)]
enum Op {
    Join(NodeId, u32, u64),
    Bind(NodeId, u64, usize, u32),
    Listen(NodeId, u64, usize, u32),
    Unbind(NodeId, Option<u64>),
    Leave(NodeId),
    SetWeight(NodeId, u32),
    Dispatch(usize, u8, u64, bool),
    NextQueued(usize),
    Expire(usize, u64),
    Admits(usize),
    Resume(usize),
    Ramp(u64),
    Started(NodeId, u64, Option<(usize, NodeId, u64)>),
    Finished(NodeId, u64, u64),
    HandedOff(usize, NodeId, u64),
    Lingers(NodeId, usize, u32, u64),
    CloseOrphan(usize),
}

const KEYS: [&str; 3] = ["127.0.0.1:80", "127.0.0.1:81", "[::1]:80"];

fn key(i: usize) -> SocketAddr {
    KEYS[i % KEYS.len()].parse().unwrap()
}

fn op() -> impl Strategy<Value = Op> {
    let node = 1..4u32;
    let conn = 1..5u64;
    let port = 0..KEYS.len();
    let at = 0..5000u64;
    let flags = prop::sample::select(vec![
        0,
        bind_flags::REUSEADDR,
        bind_flags::REUSEPORT,
        bind_flags::V6ONLY,
        crate::groups::INET,
    ]);
    prop_oneof![
        1 => (node.clone(), 0..5u32, at.clone()).prop_map(|(n, w, t)| Op::Join(n, w, t)),
        1 => (node.clone(), conn.clone(), port.clone(), flags.clone())
            .prop_map(|(n, c, p, f)| Op::Bind(n, c, p, f)),
        1 => (node.clone(), conn.clone(), port.clone(), 0..4u32)
            .prop_map(|(n, c, p, b)| Op::Listen(n, c, p, b)),
        1 => (node.clone(), proptest::option::of(conn.clone())).prop_map(|(n, c)| Op::Unbind(n, c)),
        1 => node.clone().prop_map(Op::Leave),
        1 => (node.clone(), 0..5u32).prop_map(|(n, w)| Op::SetWeight(n, w)),
        4 => (port.clone(), any::<u8>(), at.clone(), any::<bool>())
            .prop_map(|(p, f, t, r)| Op::Dispatch(p, f, t, r)),
        2 => port.clone().prop_map(Op::NextQueued),
        1 => (port.clone(), at.clone()).prop_map(|(p, t)| Op::Expire(p, t)),
        1 => port.clone().prop_map(Op::Admits),
        1 => port.clone().prop_map(Op::Resume),
        1 => at.clone().prop_map(Op::Ramp),
        1 => (
            node.clone(),
            10..20u64,
            proptest::option::of((port.clone(), node.clone(), conn.clone()))
        )
            .prop_map(|(n, c, m)| Op::Started(n, c, m)),
        1 => (node.clone(), 10..20u64, 0..100u64).prop_map(|(n, c, b)| Op::Finished(n, c, b)),
        1 => (port.clone(), node.clone(), conn.clone()).prop_map(|(p, n, c)| Op::HandedOff(p, n, c)),
        1 => (node, port, flags, at).prop_map(|(n, p, f, t)| Op::Lingers(n, p, f, t)),
        1 => any::<usize>().prop_map(Op::CloseOrphan),
    ]
}

/// Admission counts that vary by member, so backlogs and the node's
/// bound matter.
fn held(m: MemberId) -> Held {
    Held {
        relayed: (m.listener % 3) as usize,
        handed: (m.listener % 2) as usize,
        counts_accepts: m.node.is_multiple_of(2),
        node_full: m.node == 3 && m.listener == 4,
    }
}

/// A run's state beside its groups: the orphans told so far, the next
/// client's number.
struct Run {
    base: Instant,
    orphans: Vec<Orphan>,
    next: u16,
}

impl Run {
    fn tags(clients: Vec<Tagged>) -> Vec<u16> {
        clients.iter().map(|c| c.tag).collect()
    }

    /// Applies `op` to `g`: what it answered.
    fn apply(&mut self, g: &mut Groups<Tagged>, op: &Op) -> String {
        let at = |s: u64| self.base + secs(s);
        match *op {
            Op::Join(n, w, t) => {
                g.join(n, w, at(t));
                String::new()
            }
            Op::Bind(n, c, p, f) => {
                let r = g.bind(n, c, key(p), f);
                if r == Ok(Bind::OpenPort) {
                    g.open(key(p), n, c, f);
                }
                format!("{r:?}")
            }
            Op::Listen(n, c, p, b) => format!("{:?}", g.listen(key(p), n, c, b)),
            Op::Unbind(n, c) => {
                let u = g.unbind(n, c);
                self.orphans.extend(&u.orphaned);
                format!("{u:?}")
            }
            Op::Leave(n) => {
                let u = g.leave(n);
                self.orphans.extend(&u.orphaned);
                format!("{u:?}")
            }
            Op::SetWeight(n, w) => format!("{}", g.set_weight(n, w)),
            Op::Dispatch(p, from, t, again) => {
                self.next += 1;
                let (c, ip) = (tagged(self.next), IpAddr::from([10, 0, 0, from]));
                let placed = if again {
                    g.redispatch(key(p), c, ip, at(t), pending, held)
                } else {
                    g.dispatch(key(p), c, ip, at(t), pending, held)
                };
                match placed {
                    Placement::Member(m, c) => format!("{} to {m:?}", c.tag),
                    Placement::Queued { expire } => format!("queued {expire}"),
                    Placement::QueueFull(c) => format!("{} full", c.tag),
                    Placement::NoGroup(c) => format!("{} no group", c.tag),
                }
            }
            Op::NextQueued(p) => format!("{:?}", g.next_queued(key(p), held).map(|c| c.tag)),
            Op::Expire(p, t) => {
                let (gone, next) = g.expire(key(p), at(t));
                let next = next.map(|n| n.saturating_duration_since(self.base));
                format!("{:?} {next:?}", Run::tags(gone))
            }
            Op::Admits(p) => format!("{}", g.admits(key(p), held)),
            Op::Resume(p) => format!("{}", g.resume(key(p), held)),
            Op::Ramp(t) => format!("{}", g.ramp(at(t))),
            Op::Started(n, c, m) => {
                let member = m.map(|(p, node, listener)| (key(p), MemberId { node, listener }));
                g.connection_started(n, c, member);
                String::new()
            }
            Op::Finished(n, c, b) => {
                g.connection_finished(n, c, (b, 2 * b));
                String::new()
            }
            Op::HandedOff(p, node, listener) => {
                g.handed_off(key(p), MemberId { node, listener });
                String::new()
            }
            Op::Lingers(n, p, f, t) => format!("{}", g.lingers(n, key(p), f, at(t))),
            Op::CloseOrphan(i) => match self.orphans.len() {
                0 => String::new(),
                len => format!("{:?}", g.close_orphan(self.orphans[i % len]).map(Run::tags)),
            },
        }
    }
}

/// The start of every run: three nodes of weights 1 to 3 listening on
/// every port, so that clients have members to go to.
fn setup() -> Vec<Op> {
    let mut ops: Vec<Op> = (1..4).map(|n| Op::Join(n, n, 0)).collect();
    for p in 0..KEYS.len() {
        for n in 1..4 {
            let conn = p as u64 + 1;
            ops.push(Op::Bind(n, conn, p, bind_flags::REUSEPORT));
            ops.push(Op::Listen(n, conn, p, 8));
        }
    }
    ops
}

fn kind() -> impl Strategy<Value = SchedulerKind> {
    prop::sample::select(SchedulerKind::value_variants().to_vec())
}

proptest::proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any run of calls, cut anywhere: the groups restored from a snapshot
    /// taken at the cut answer the rest of the run as the original does,
    /// and end in the same state.
    #[test]
    fn groups_restored_at_any_point_of_any_run_go_on_as_the_original(
        kind in kind(),
        per_node in 0..4usize,
        per_group in 1..8usize,
        max_queue in 0..4usize,
        slow_start in prop::sample::select(vec![0u64, 600]),
        before in proptest::collection::vec(op(), 0..60),
        after in proptest::collection::vec(op(), 0..60),
    ) {
        let limits = Limits { per_node, per_group, max_queue, queue_timeout: secs(30) };
        let mut original = Groups::with_limits(kind, limits);
        original.set_slow_start(secs(slow_start));
        // Every instant of the run is before the snapshot, so each comes
        // back exactly from its age.
        let base = Instant::now() - secs(10_000);
        let mut run = Run { base, orphans: Vec::new(), next: 0 };
        for op in setup().iter().chain(&before) {
            run.apply(&mut original, op);
        }
        let now = Instant::now();
        let mut capture = Capture::default();
        let snap = original.snapshot(now, &mut capture);
        let copies = (capture.fds.iter())
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        let mut src = Source::new(copies, std::mem::take(&mut capture.blob));
        drop(capture);
        let mut restored = Groups::restore(snap, &mut src, now).unwrap();
        src.finish().unwrap();

        let mut twin = Run { base, orphans: run.orphans.clone(), next: 1000 };
        run.next = 1000;
        for op in &after {
            let expected = run.apply(&mut original, op);
            prop_assert_eq!(twin.apply(&mut restored, op), expected, "{:?}", op);
        }
        let (mut c1, mut c2) = (Capture::default(), Capture::default());
        prop_assert_eq!(restored.snapshot(now, &mut c2), original.snapshot(now, &mut c1));
        prop_assert_eq!(c2.blob, c1.blob);
    }
}

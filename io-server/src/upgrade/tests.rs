//! The upgrade's state: the envelope refuses what it cannot read and
//! never panics; the format is pinned by a golden file; and listener
//! groups rebuilt from their state decide exactly as the originals
//! (a differential run on real sockets).

use super::state::*;
use crate::config::{Config, SchedulerKind};
use crate::groups::{Bind, Groups, Held, Limits, Placement};
use crate::state::{Client, ServerState};
use crate::traffic::{MemberId, NodeId};
use clap::ValueEnum;
use proptest::prelude::*;
use saps_fabric::endpoint::Replay;
use saps_fabric::frame::bind_flags;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

// ---- the envelope ----------------------------------------------------

fn envelope() -> Envelope {
    Envelope {
        meta: br#"{"x":1}"#.to_vec(),
        blob: b"replayed octets".to_vec(),
        fds: 7,
    }
}

#[test]
fn an_envelope_decodes_as_it_was_encoded() {
    let e = envelope();
    let wire = e.encode();
    assert_eq!(&wire[..8], b"SAPSUPG\0");
    assert_eq!(wire[8..12], STATE_VERSION.to_be_bytes());
    assert_eq!(wire.len(), HEADER_LEN + e.meta.len() + e.blob.len());
    assert_eq!(Envelope::decode(&wire).unwrap(), e);
    let empty = Envelope {
        meta: Vec::new(),
        blob: Vec::new(),
        fds: 0,
    };
    assert_eq!(Envelope::decode(&empty.encode()).unwrap(), empty);
}

#[test]
fn another_version_is_refused_naming_both() {
    let mut wire = envelope().encode();
    let other = STATE_VERSION + 1;
    wire[8..12].copy_from_slice(&other.to_be_bytes());
    let e = Envelope::decode(&wire).unwrap_err();
    assert!(
        matches!(e, StateError::Version { found, expected } if found == other && expected == STATE_VERSION),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains(&format!("version {other}")), "{text}");
    assert!(text.contains(&format!("version {STATE_VERSION}")), "{text}");
    // Refused on the version alone, before the rest of the header.
    assert!(matches!(
        Envelope::decode(&wire[..12]),
        Err(StateError::Version { .. })
    ));
}

#[test]
fn a_truncated_or_overlong_envelope_is_refused() {
    let wire = envelope().encode();
    for len in 0..wire.len() {
        let e = Envelope::decode(&wire[..len]).unwrap_err();
        assert!(matches!(e, StateError::Truncated { .. }), "{len}: {e:?}");
    }
    let mut long = wire.clone();
    long.push(0);
    assert!(matches!(
        Envelope::decode(&long),
        Err(StateError::Trailing(1))
    ));
    let mut bad = wire.clone();
    bad[0] = b'X';
    assert!(matches!(Envelope::decode(&bad), Err(StateError::Magic)));
    let mut huge = wire;
    huge[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        Envelope::decode(&huge),
        Err(StateError::Truncated { need: u64::MAX, .. })
    ));
}

/// A header of this version with the given lengths and fd count.
fn header(meta_len: u64, blob_len: u64, fds: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&STATE_VERSION.to_be_bytes());
    h.extend_from_slice(&meta_len.to_be_bytes());
    h.extend_from_slice(&blob_len.to_be_bytes());
    h.extend_from_slice(&fds.to_be_bytes());
    h
}

proptest! {
    #[test]
    fn garbage_is_refused_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Envelope::decode(&bytes);
        let mut after_magic = MAGIC.to_vec();
        after_magic.extend_from_slice(&bytes);
        let _ = Envelope::decode(&after_magic);
    }

    #[test]
    fn any_lengths_in_a_header_are_checked_without_a_panic(
        meta_len in any::<u64>(),
        blob_len in any::<u64>(),
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut wire = header(meta_len, blob_len, 3);
        wire.extend_from_slice(&body);
        let fits = meta_len.checked_add(blob_len) == Some(body.len() as u64);
        prop_assert_eq!(Envelope::decode(&wire).is_ok(), fits);
    }

    #[test]
    fn garbage_metadata_is_refused_without_a_panic(meta in proptest::collection::vec(any::<u8>(), 0..200)) {
        let e = Envelope { meta, blob: Vec::new(), fds: 0 };
        let decoded = Envelope::decode(&e.encode()).unwrap();
        prop_assert!(decoded.state().is_err());
    }
}

// ---- the format: a fixed sample, its golden file, unknown fields -----

/// A sample of the format with every variant and option in it (not one
/// consistent state: its groups' scheduler states are of three kinds).
fn sample() -> (StateSnap, Vec<u8>, u32) {
    let web: SocketAddr = "127.0.0.1:80".parse().unwrap();
    let v6: SocketAddr = "[::1]:8443".parse().unwrap();
    let a10 = MemberSnap {
        node: 1,
        listener: 10,
    };
    let b20 = MemberSnap {
        node: 2,
        listener: 20,
    };
    let blob = b"GET / HTTP/1.1\r\n\r\nHELO".to_vec();
    let group = |key, scheduler, queue: Vec<QueuedSnap>, orphaned| GroupSnap {
        key,
        binds: vec![
            BindSnap {
                node: 1,
                conn: 10,
                flags: bind_flags::REUSEPORT,
            },
            BindSnap {
                node: 2,
                conn: 20,
                flags: crate::groups::INET,
            },
        ],
        members: vec![a10, b20],
        backlogs: vec![(a10, 128), (b20, 4096)],
        scheduler,
        expiring: !queue.is_empty(),
        queue,
        queued_total: 9,
        timed_out: 2,
        paused: true,
        pauses: 3,
        redispatched: 4,
        listening: true,
        orphaned,
    };
    let queued = |fd, offset, len, fin, age_ns| QueuedSnap {
        client: ClientSnap {
            fd,
            peer: SocketAddr::from(([192, 0, 2, 7], 40000 + fd as u16)),
            replay: BlobRef { offset, len },
            replay_fin: fin,
        },
        age_ns,
    };
    let state = StateSnap {
        server: ServerSnap {
            uptime_ns: 86_400_000_000_123,
            refused: 1,
            upgrades: 2,
            timed_out: TimedOutSnap {
                idle: 3,
                half_closed: 4,
                connect: 5,
            },
            handshakes: HandshakesSnap {
                refused: 6,
                failed: 7,
                silent_nodes: 8,
            },
        },
        tables: TablesSnap {
            next_node: 3,
            groups: GroupsSnap {
                scheduler: SchedulerKind::Wrr,
                limits: LimitsSnap {
                    per_node: 0,
                    per_group: u64::MAX,
                    max_queue: 1024,
                    queue_timeout_ns: 30_000_000_000,
                },
                slow_start_ns: 60_000_000_000,
                weights: vec![(1, 3), (2, 1)],
                ramps: vec![RampSnap {
                    node: 2,
                    age_ns: 1_500_000_000,
                    weight: 4,
                }],
                groups: vec![
                    group(web, SchedState::Rr { next: 1 }, Vec::new(), None),
                    group(
                        v6,
                        SchedState::Wrr {
                            credit: vec![(1 << 40 | 10, -2), (2 << 40 | 20, 2)],
                        },
                        vec![queued(0, 0, 18, false, 5), queued(1, 18, 4, true, 7)],
                        Some(1),
                    ),
                    group(
                        "127.0.0.1:9000".parse().unwrap(),
                        SchedState::None,
                        Vec::new(),
                        None,
                    ),
                ],
                ledger: LedgerSnap {
                    scopes: vec![
                        TrafficSnap {
                            scope: ScopeSnap::Node(1),
                            live: vec![(1, 100), (1, 101)],
                            total: 10,
                            handed_off: 1,
                            bytes_in: 1000,
                            bytes_out: 2000,
                        },
                        TrafficSnap {
                            scope: ScopeSnap::Group(web),
                            live: vec![(1, 100)],
                            total: 5,
                            handed_off: 0,
                            bytes_in: 10,
                            bytes_out: 20,
                        },
                        TrafficSnap {
                            scope: ScopeSnap::Member(web, a10),
                            live: vec![(1, 100)],
                            total: 5,
                            handed_off: 0,
                            bytes_in: 10,
                            bytes_out: 20,
                        },
                    ],
                    conns: vec![
                        LedgerConnSnap {
                            node: 1,
                            conn: 100,
                            member: Some((web, a10)),
                        },
                        LedgerConnSnap {
                            node: 1,
                            conn: 101,
                            member: None,
                        },
                    ],
                    connections: 42,
                },
                orphanings: 1,
                left: vec![LeftSnap {
                    key: web,
                    node: 2,
                    flags: bind_flags::REUSEADDR,
                    age_ns: 999,
                }],
            },
        },
    };
    (state, blob, 2)
}

fn sample_wire() -> Vec<u8> {
    let (state, blob, fds) = sample();
    Envelope::seal(&state, blob, fds).unwrap().encode()
}

/// The golden file: a header, `version N`, then the encoding in hex, 32
/// octets a line.
fn golden_text(wire: &[u8]) -> String {
    let mut text = String::from(
        "# The encoding of sample() in io-server/src/upgrade/tests.rs, in hex.\n\
         # A change of the format bumps STATE_VERSION; then\n\
         # SAPS_BLESS_STATE=1 cargo test -p saps-io-server --lib upgrade rewrites this file.\n",
    );
    text += &format!("version {STATE_VERSION}\n");
    for line in wire.chunks(32) {
        text.extend(line.iter().map(|b| format!("{b:02x}")));
        text.push('\n');
    }
    text
}

/// The encoding of a fixed sample is the one in `state.golden` for this
/// [`STATE_VERSION`]: a snapshot struct changed without a bump fails here,
/// and blessing (`SAPS_BLESS_STATE=1`) refuses to rewrite the file of a
/// version whose encoding changed. The file decodes to the sample.
#[test]
fn a_sample_encodes_as_the_golden_file_of_its_version() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/upgrade/state.golden");
    let text = golden_text(&sample_wire());
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    let version = golden
        .lines()
        .find_map(|l| l.strip_prefix("version "))
        .and_then(|v| v.parse::<u32>().ok());
    if std::env::var_os("SAPS_BLESS_STATE").is_some() {
        assert!(
            golden == text || version != Some(STATE_VERSION),
            "the encoding of version {STATE_VERSION} changed: bump STATE_VERSION, then bless"
        );
        std::fs::write(&path, text).unwrap();
        return;
    }
    assert_eq!(
        version,
        Some(STATE_VERSION),
        "state.golden is not of this STATE_VERSION: bless it with SAPS_BLESS_STATE=1"
    );
    assert!(
        golden == text,
        "the encoding of version {STATE_VERSION} changed: bump STATE_VERSION and bless \
         with SAPS_BLESS_STATE=1\nexpected:\n{golden}\nfound:\n{text}"
    );
    let octets: Vec<u8> = golden
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("version "))
        .flat_map(|l| {
            (0..l.len())
                .step_by(2)
                .map(move |i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
        })
        .collect();
    let e = Envelope::decode(&octets).unwrap();
    let (state, blob, fds) = sample();
    assert_eq!((e.state().unwrap(), e.blob, e.fds), (state, blob, fds));
}

/// The sample's metadata with `"surplus": 1` added to the object at
/// `path` (keys, or indices into arrays).
fn with_surplus(path: &[&str]) -> Envelope {
    let (state, blob, fds) = sample();
    let mut json = serde_json::to_value(&state).unwrap();
    let mut at = &mut json;
    for step in path {
        at = match step.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[*step],
        };
    }
    at.as_object_mut()
        .unwrap_or_else(|| panic!("{path:?} is no object"))
        .insert("surplus".into(), 1.into());
    Envelope {
        meta: serde_json::to_vec(&json).unwrap(),
        blob,
        fds,
    }
}

#[test]
fn unknown_fields_are_refused_at_every_level() {
    let (state, blob, fds) = sample();
    let e = Envelope::seal(&state, blob, fds).unwrap();
    assert_eq!(e.state().unwrap(), state, "the sample itself reads");
    let paths: &[&[&str]] = &[
        &[],
        &["server"],
        &["server", "timed_out"],
        &["server", "handshakes"],
        &["tables"],
        &["tables", "groups"],
        &["tables", "groups", "limits"],
        &["tables", "groups", "ramps", "0"],
        &["tables", "groups", "groups", "1"],
        &["tables", "groups", "groups", "1", "binds", "0"],
        &["tables", "groups", "groups", "1", "members", "0"],
        &["tables", "groups", "groups", "1", "scheduler", "Wrr"],
        &["tables", "groups", "groups", "0", "scheduler", "Rr"],
        &["tables", "groups", "groups", "1", "queue", "0"],
        &["tables", "groups", "groups", "1", "queue", "0", "client"],
        &[
            "tables", "groups", "groups", "1", "queue", "0", "client", "replay",
        ],
        &["tables", "groups", "ledger"],
        &["tables", "groups", "ledger", "scopes", "0"],
        &["tables", "groups", "ledger", "conns", "0"],
        &["tables", "groups", "left", "0"],
    ];
    for path in paths {
        let e = with_surplus(path).state().unwrap_err();
        assert!(
            matches!(&e, StateError::Meta(m) if m.to_string().contains("surplus")),
            "{path:?}: {e}"
        );
    }
}

// ---- descriptors and blob references ------------------------------------

fn pipe_fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .flat_map(|_| {
            let (r, w) = nix::unistd::pipe().unwrap();
            [r, w]
        })
        .collect()
}

#[test]
fn each_descriptor_is_taken_once_and_every_one_is_taken() {
    let mut src = Source::new(pipe_fds(1), b"abc".to_vec());
    assert!(matches!(
        src.fd(2),
        Err(StateError::FdIndex { index: 2, count: 2 })
    ));
    src.fd(1).unwrap();
    assert!(matches!(src.fd(1), Err(StateError::FdTwice(1))));
    assert_eq!(src.bytes(BlobRef { offset: 1, len: 2 }).unwrap(), b"bc");
    for bad in [(2, 2), (4, 0), (u64::MAX, 2)] {
        let r = BlobRef {
            offset: bad.0,
            len: bad.1,
        };
        assert!(
            matches!(src.bytes(r), Err(StateError::Blob { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(src.finish(), Err(StateError::FdUnused(0))));
}

#[test]
fn server_counters_and_uptime_carry_over() {
    let old = ServerState::new(Config::default(), b"token".to_vec());
    let counters = [
        &old.refused,
        &old.upgrades,
        &old.timed_out.idle,
        &old.timed_out.half_closed,
        &old.timed_out.connect,
        &old.handshakes.refused,
        &old.handshakes.failed,
        &old.handshakes.silent_nodes,
    ];
    for (i, c) in counters.iter().enumerate() {
        c.store(10 + i as u64, Ordering::Relaxed);
    }
    let now = old.started + Duration::from_secs(3600);
    let snap = ServerSnap::capture(&old, now);
    assert_eq!(snap.uptime_ns, 3_600_000_000_000);
    let mut new = ServerState::new(Config::default(), b"token".to_vec());
    let later = now + Duration::from_secs(2);
    snap.apply(&mut new, later).unwrap();
    assert_eq!(ServerSnap::capture(&new, later), snap);
    assert_eq!(new.handshakes.silent_nodes.load(Ordering::Relaxed), 17);
}

// ---- listener groups: the differential run -------------------------------

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

/// Groups of `kind` built through their API before `t0`: three nodes
/// joined at different times (one still in its slow start), a group
/// each of three members, two members (IPv6), a queue with clients and
/// paused, an orphaned port, a port bound and not listened on; traffic
/// in the ledger; clients dispatched so the schedulers keep state. The
/// orphaned port, as `unbind` told it.
fn build(
    kind: SchedulerKind,
    t0: Instant,
    net: &mut Net,
) -> (Groups<Client>, crate::groups::Orphan) {
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
        let (c, _) = net.client(n, b"");
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
    orphan: crate::groups::Orphan,
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
        server: sample().0.server,
        tables: TablesSnap {
            next_node: 5,
            groups: snap.clone(),
        },
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
        drop(capture);

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

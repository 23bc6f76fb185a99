//! The upgrade's state format: the envelope refuses what it cannot read
//! and never panics; the format is pinned by a golden file; unknown
//! fields, descriptors and blob ranges that do not fit are refused.

use super::state::*;
use crate::config::{Config, SchedulerKind};
use crate::state::ServerState;
use proptest::prelude::*;
use saps_fabric::frame::bind_flags;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

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
            ports: vec![PortSnap {
                key: "192.0.2.1:80".parse().unwrap(),
                fd: 0,
                listening: true,
                backlog: 511,
            }],
            nodes: vec![NodeSnap {
                id: 2,
                name: "web-1".into(),
                peer: "unix".into(),
                pid: Some(4242),
                notifies_accepts: true,
                transport: TransportSnap::Unix,
                channel: BlobRef { offset: 0, len: 3 },
                router: BlobRef { offset: 3, len: 2 },
                fds: vec![1, 2],
                sockets: vec![
                    SocketSnap {
                        conn: 1,
                        group: Some("192.0.2.1:80".parse().unwrap()),
                        opts: vec![(6, 1, BlobRef { offset: 5, len: 4 })],
                        relay: None,
                    },
                    SocketSnap {
                        conn: 4,
                        group: None,
                        opts: Vec::new(),
                        relay: Some(RelayedSnap::Client {
                            key: "192.0.2.1:80".parse().unwrap(),
                            listener: 1,
                            peer: "198.51.100.7:40000".parse().unwrap(),
                        }),
                    },
                    SocketSnap {
                        conn: 6,
                        group: None,
                        opts: Vec::new(),
                        relay: Some(RelayedSnap::Outbound),
                    },
                ],
                listeners: vec![1],
                handoff: Some(3),
                handed: vec![HandedSnap {
                    conn: 9,
                    key: "192.0.2.1:80".parse().unwrap(),
                    peer: "203.0.113.9:5000".parse().unwrap(),
                    fd: 4,
                }],
                connects: vec![
                    ConnectSnap {
                        req: 7,
                        conn: 12,
                        to: "198.51.100.80:443".parse().unwrap(),
                        fd: 5,
                        outcome: None,
                    },
                    ConnectSnap {
                        req: 8,
                        conn: 13,
                        to: "198.51.100.81:443".parse().unwrap(),
                        fd: 6,
                        outcome: Some(111),
                    },
                ],
            }],
            left_behind: vec![5],
        },
        listeners: vec![
            ListenerSnap {
                kind: ListenerKind::Fabric {
                    url: "unix:/run/saps/fabric.sock".into(),
                },
                fd: 2,
            },
            ListenerSnap {
                kind: ListenerKind::Handoff {
                    path: "/run/saps/fabric.sock.handoff".into(),
                },
                fd: 3,
            },
            ListenerSnap {
                kind: ListenerKind::Control {
                    path: "/run/saps/control.sock".into(),
                },
                fd: 4,
            },
            ListenerSnap {
                kind: ListenerKind::Metrics {
                    addr: "192.0.2.1:9100".into(),
                },
                fd: 5,
            },
        ],
    };
    (state, blob, 2)
}

fn sample_wire() -> Vec<u8> {
    let (state, blob, fds) = sample();
    Envelope::seal(&state, blob, fds).unwrap().encode()
}

/// The encoding of a fixed sample is the one in `state.golden` for this
/// [`STATE_VERSION`]: a snapshot struct changed without a bump fails here,
/// and blessing (`SAPS_BLESS_STATE=1`) refuses to rewrite the file of a
/// version whose encoding changed. The file decodes to the sample.
#[test]
fn a_sample_encodes_as_the_golden_file_of_its_version() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/upgrade/state.golden");
    let golden = saps_fabric::golden::Golden {
        path: &path,
        sample: "sample() in io-server/src/upgrade/tests.rs",
        version_name: "STATE_VERSION",
        version: STATE_VERSION,
        bless_var: "SAPS_BLESS_STATE",
        bless_cmd: "cargo test -p saps-io-server --lib upgrade",
    };
    if let Some(octets) = golden.check(&sample_wire()) {
        let e = Envelope::decode(&octets).unwrap();
        let (state, blob, fds) = sample();
        assert_eq!((e.state().unwrap(), e.blob, e.fds), (state, blob, fds));
    }
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

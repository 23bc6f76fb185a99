//! Tests of [`RouterSnap`]'s encoding: a sample with every field and
//! variant, and one with nothing, round-trip; every cut, a trailing
//! octet, unknown tags, another version and what no capture makes are
//! refused; arbitrary snapshots round-trip and arbitrary or damaged
//! octets never panic the decoder; the format is pinned by a golden
//! file; the router of a real frozen endpoint round-trips.

use super::tests::frozen_halfway;
use crate::endpoint::{
    HeldEvent, PipeSnap, PreAcceptSnap, QuietSnap, RelaySnap, Replay, RouterSnap, RouterSnapError,
    StartSnap, ROUTER_SNAP_VERSION,
};
use crate::frame::ConnId;
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;

fn encoded(snap: &RouterSnap) -> Vec<u8> {
    let mut out = BytesMut::new();
    snap.encode(&mut out);
    out.to_vec()
}

/// Every field set, every variant and option in it (not one consistent
/// endpoint: a node id and a weight are of different ends).
fn sample() -> RouterSnap {
    RouterSnap {
        transport: 0,
        pipe: Some(PipeSnap {
            read: 1,
            write: 2,
            held: 70_000,
        }),
        relays: vec![
            RelaySnap {
                conn: 3,
                socket: 3,
                bytes_in: 1 << 33,
                bytes_out: 12_345,
                fin_sent: true,
                fin_written: false,
                tracked: true,
                pre: Some(PreAcceptSnap {
                    kept: Bytes::from_static(b"GET / HTTP/1.0\r\n"),
                    sent: 5,
                    fin: true,
                    fin_sent: false,
                    accepted: false,
                    cap: 65_536,
                }),
                quiet: Some(QuietSnap {
                    moved: 99,
                    half_closed: true,
                    age: Duration::new(7, 123_456_789),
                }),
                pending: vec![
                    HeldEvent::Data(Bytes::from_static(b"not yet written")),
                    HeldEvent::Fin,
                ],
            },
            RelaySnap {
                conn: 9,
                socket: 4,
                bytes_in: 0,
                bytes_out: u64::MAX,
                fin_sent: false,
                fin_written: true,
                tracked: false,
                pre: None,
                quiet: None,
                pending: vec![
                    HeldEvent::Data(Bytes::from_static(b"rest")),
                    HeldEvent::Data(Bytes::from_static(b" and more")),
                    HeldEvent::Closed(-32),
                ],
            },
        ],
        held: vec![
            (
                4,
                vec![
                    HeldEvent::Data(Bytes::from_static(b"hello")),
                    HeldEvent::Fin,
                    HeldEvent::Closed(-104),
                ],
            ),
            (5, vec![]),
        ],
        starts: vec![
            StartSnap {
                conn: 5,
                replay: Replay {
                    data: Bytes::from_static(b"replayed"),
                    fin: true,
                },
                tracked: true,
            },
            StartSnap {
                conn: 6,
                replay: Replay::default(),
                tracked: false,
            },
        ],
        node_id: Some(42),
        handed: vec![(1, Some(1 << 40)), (2, None)],
        weight: Some(250),
    }
}

/// Everything empty or absent.
fn empty() -> RouterSnap {
    RouterSnap {
        transport: 0,
        pipe: None,
        relays: vec![],
        held: vec![],
        starts: vec![],
        node_id: None,
        handed: vec![],
        weight: None,
    }
}

#[test]
fn a_sample_with_every_field_and_one_with_nothing_round_trip() {
    for snap in [sample(), empty()] {
        let wire = encoded(&snap);
        assert_eq!(RouterSnap::decode(&wire), Ok(snap.clone()));
        assert_eq!(encoded(&snap), wire, "the same snapshot encodes the same");
    }
    // The version, the transport, then a tag and six empty lists or
    // absent options.
    assert_eq!(encoded(&empty()).len(), 4 + 8 + 1 + 4 + 4 + 4 + 1 + 4 + 1);
}

#[test]
fn every_cut_and_a_trailing_octet_are_refused() {
    for snap in [sample(), empty()] {
        let wire = encoded(&snap);
        for cut in 0..wire.len() {
            assert_eq!(
                RouterSnap::decode(&wire[..cut]),
                Err(RouterSnapError::Truncated),
                "cut at {cut} of {}",
                wire.len()
            );
        }
        let mut padded = wire.clone();
        padded.push(0);
        assert_eq!(
            RouterSnap::decode(&padded),
            Err(RouterSnapError::Malformed("trailing bytes"))
        );
    }
}

#[test]
fn another_version_is_refused_naming_both() {
    for other in [ROUTER_SNAP_VERSION - 1, ROUTER_SNAP_VERSION + 1] {
        let mut wire = encoded(&sample());
        wire[..4].copy_from_slice(&other.to_be_bytes());
        let err = RouterSnap::decode(&wire).unwrap_err();
        assert_eq!(err, RouterSnapError::Version(other));
        assert_eq!(
            err.to_string(),
            format!(
                "router snapshot version {other}, this build reads version {ROUTER_SNAP_VERSION}"
            )
        );
    }
}

/// `wire` with the octet at `at` set to `value`, decoded.
fn patched(wire: &[u8], at: usize, value: u8) -> Result<RouterSnap, RouterSnapError> {
    let mut wire = wire.to_vec();
    wire[at] = value;
    RouterSnap::decode(&wire)
}

#[test]
fn unknown_tags_and_flags_are_refused() {
    let malformed = RouterSnapError::Malformed;
    // The pipe's option tag follows the version and the transport.
    let wire = encoded(&empty());
    assert_eq!(
        patched(&wire, 12, 2),
        Err(malformed("an option tag neither 0 nor 1"))
    );
    // The weight's tag is the last octet.
    assert_eq!(
        patched(&wire, wire.len() - 1, 0xff),
        Err(malformed("an option tag neither 0 nor 1"))
    );
    // One held Fin: its tag comes before the starts (4), the node id
    // (1), the handed list (4) and the weight (1).
    let fin = RouterSnap {
        held: vec![(8, vec![HeldEvent::Fin])],
        ..empty()
    };
    let wire = encoded(&fin);
    let tag = wire.len() - 11;
    assert_eq!(wire[tag], 2, "the Fin's tag");
    for unknown in [0, 4, 0xff] {
        assert_eq!(
            patched(&wire, tag, unknown),
            Err(malformed("unknown held event tag"))
        );
    }
    // One relay with a pending Fin: its tag comes before the held list
    // (4), the starts (4), the node id (1), the handed list (4) and the
    // weight (1).
    let pending = RouterSnap {
        relays: vec![RelaySnap {
            conn: 1,
            socket: 1,
            bytes_in: 0,
            bytes_out: 0,
            fin_sent: false,
            fin_written: false,
            tracked: false,
            pre: None,
            quiet: None,
            pending: vec![HeldEvent::Fin],
        }],
        ..empty()
    };
    let wire = encoded(&pending);
    let tag = wire.len() - 15;
    assert_eq!(wire[tag], 2, "the pending Fin's tag");
    for unknown in [0, 4, 0xff] {
        assert_eq!(
            patched(&wire, tag, unknown),
            Err(malformed("unknown held event tag"))
        );
    }
    // One start: its two flags come before the node id (1), the handed
    // list (4) and the weight (1).
    let start = RouterSnap {
        starts: vec![StartSnap {
            conn: 1,
            replay: Replay::default(),
            tracked: true,
        }],
        ..empty()
    };
    let wire = encoded(&start);
    for at in [wire.len() - 8, wire.len() - 7] {
        assert_eq!(
            patched(&wire, at, 2),
            Err(malformed("a flag neither 0 nor 1"))
        );
    }
}

#[test]
fn what_no_capture_makes_is_refused() {
    let malformed = |snap: RouterSnap| RouterSnap::decode(&encoded(&snap)).unwrap_err();
    let s = sample();

    let mut twice = s.clone();
    twice.relays[1].socket = twice.transport;
    assert_eq!(
        malformed(twice),
        RouterSnapError::Malformed("a descriptor index named twice")
    );
    let mut pipe = s.clone();
    pipe.pipe = Some(PipeSnap {
        read: 7,
        write: 7,
        held: 0,
    });
    assert_eq!(
        malformed(pipe),
        RouterSnapError::Malformed("a descriptor index named twice")
    );

    let mut relays = s.clone();
    relays.relays.swap(0, 1);
    assert_eq!(
        malformed(relays),
        RouterSnapError::Malformed("relays not in connection id order")
    );
    let mut held = s.clone();
    held.held.swap(0, 1);
    assert_eq!(
        malformed(held),
        RouterSnapError::Malformed("held connections not in connection id order")
    );
    let mut starts = s.clone();
    starts.starts[1].conn = starts.starts[0].conn;
    assert_eq!(
        malformed(starts),
        RouterSnapError::Malformed("starts not in connection id order")
    );
    let mut handed = s.clone();
    handed.handed.reverse();
    assert_eq!(
        malformed(handed),
        RouterSnapError::Malformed("handed connections not in connection id order")
    );

    let mut both = s.clone();
    both.held[0].0 = both.relays[0].conn;
    assert_eq!(
        malformed(both),
        RouterSnapError::Malformed("a connection both relayed and held")
    );
    let mut pre = s;
    pre.relays[0].pre.as_mut().unwrap().sent = 17;
    assert_eq!(
        malformed(pre),
        RouterSnapError::Malformed("a pre-accept copy sent past its end")
    );
}

/// Hostile lengths end at the input's end: nothing is allocated for
/// them first.
#[test]
fn a_hostile_length_is_refused_before_anything_is_allocated() {
    let wire = encoded(&empty());
    // The relays' count (after the pipe's tag) set to u32::MAX.
    let mut relays = wire.clone();
    relays[13..17].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(RouterSnap::decode(&relays), Err(RouterSnapError::Truncated));
    // A start whose replay says u64::MAX octets, or just past usize.
    let start = RouterSnap {
        starts: vec![StartSnap {
            conn: 1,
            replay: Replay::default(),
            tracked: false,
        }],
        ..empty()
    };
    let wire = encoded(&start);
    let len = 4 + 8 + 1 + 4 + 4 + 4 + 8;
    assert_eq!(wire[len..len + 8], [0; 8], "the replay's length");
    let mut huge = wire.clone();
    huge[len..len + 8].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(RouterSnap::decode(&huge).is_err());
    let mut long = wire;
    long[len..len + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert_eq!(RouterSnap::decode(&long), Err(RouterSnapError::Truncated));
}

// ---- arbitrary snapshots and octets ----

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn arb_pre() -> impl Strategy<Value = PreAcceptSnap> {
    (
        arb_bytes(),
        any::<prop::sample::Index>(),
        any::<[bool; 3]>(),
        any::<usize>(),
    )
        .prop_map(
            |(kept, sent, [fin, fin_sent, accepted], cap)| PreAcceptSnap {
                sent: sent.index(kept.len() + 1),
                kept,
                fin,
                fin_sent,
                accepted,
                cap,
            },
        )
}

fn arb_quiet() -> impl Strategy<Value = QuietSnap> {
    (any::<u64>(), any::<bool>(), any::<u64>()).prop_map(|(moved, half_closed, age)| QuietSnap {
        moved,
        half_closed,
        age: Duration::from_nanos(age),
    })
}

/// A relay, its socket index set later.
fn arb_relay() -> impl Strategy<Value = RelaySnap> {
    (
        any::<(u64, u64)>(),
        any::<[bool; 3]>(),
        prop::option::of(arb_pre()),
        prop::option::of(arb_quiet()),
        prop::collection::vec(arb_event(), 0..4),
    )
        .prop_map(
            |((bytes_in, bytes_out), [fin_sent, fin_written, tracked], pre, quiet, pending)| {
                RelaySnap {
                    conn: 0,
                    socket: 0,
                    bytes_in,
                    bytes_out,
                    fin_sent,
                    fin_written,
                    tracked,
                    pre,
                    quiet,
                    pending,
                }
            },
        )
}

fn arb_event() -> impl Strategy<Value = HeldEvent> {
    prop_oneof![
        arb_bytes().prop_map(HeldEvent::Data),
        Just(HeldEvent::Fin),
        any::<i32>().prop_map(HeldEvent::Closed),
    ]
}

fn arb_start() -> impl Strategy<Value = (Replay, bool)> {
    (arb_bytes(), any::<bool>(), any::<bool>())
        .prop_map(|(data, fin, tracked)| (Replay { data, fin }, tracked))
}

/// Up to four items by distinct connection ids, in their order.
fn by_conn<T: std::fmt::Debug>(
    item: impl Strategy<Value = T>,
) -> impl Strategy<Value = BTreeMap<ConnId, T>> {
    prop::collection::btree_map(any::<ConnId>(), item, 0..5)
}

/// A snapshot as a capture makes it: lists by connection id, no
/// connection both relayed and held, each descriptor index named once
/// (in any order, from any base).
fn arb_snap() -> impl Strategy<Value = RouterSnap> {
    (
        (
            by_conn(arb_relay()),
            by_conn(prop::collection::vec(arb_event(), 0..4)),
            by_conn(arb_start()),
            by_conn(any::<Option<ConnId>>()),
        ),
        (
            any::<Option<usize>>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            0..(1usize << 48),
        ),
    )
        .prop_flat_map(
            |((relays, held, starts, handed), (pipe, node_id, weight, base))| {
                let n = 1 + if pipe.is_some() { 2 } else { 0 } + relays.len();
                let fds = Just((base..base + n).collect::<Vec<_>>()).prop_shuffle();
                (
                    Just((relays, held, starts, handed, pipe, node_id, weight)),
                    fds,
                )
            },
        )
        .prop_map(
            |((relays, held, starts, handed, pipe, node_id, weight), fds)| {
                let mut fds = fds.into_iter();
                let mut fd = || fds.next().unwrap();
                let transport = fd();
                let pipe = pipe.map(|octets| PipeSnap {
                    read: fd(),
                    write: fd(),
                    held: octets,
                });
                let held: BTreeMap<_, _> = held
                    .into_iter()
                    .filter(|(conn, _)| !relays.contains_key(conn))
                    .collect();
                RouterSnap {
                    transport,
                    pipe,
                    relays: relays
                        .into_iter()
                        .map(|(conn, r)| RelaySnap {
                            conn,
                            socket: fd(),
                            ..r
                        })
                        .collect(),
                    held: held.into_iter().collect(),
                    starts: starts
                        .into_iter()
                        .map(|(conn, (replay, tracked))| StartSnap {
                            conn,
                            replay,
                            tracked,
                        })
                        .collect(),
                    node_id,
                    handed: handed.into_iter().collect(),
                    weight,
                }
            },
        )
}

/// Decoding `bytes` either fails or gives a snapshot that encodes as
/// `bytes` again (the encoding is canonical, the decoder strict).
fn decodes_canonically(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(snap) = RouterSnap::decode(bytes) {
        prop_assert_eq!(encoded(&snap), bytes);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn an_arbitrary_snapshot_round_trips(snap in arb_snap()) {
        let wire = encoded(&snap);
        prop_assert_eq!(RouterSnap::decode(&wire), Ok(snap.clone()));
        prop_assert_eq!(encoded(&snap), wire);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        decodes_canonically(&bytes)?;
        // Behind a valid version, more of them get past its check.
        let mut versioned = ROUTER_SNAP_VERSION.to_be_bytes().to_vec();
        versioned.extend_from_slice(&bytes);
        decodes_canonically(&versioned)?;
    }

    /// Octets of an encoding changed, cut or added: an error or a
    /// snapshot (which encodes as those octets), never a panic.
    #[test]
    fn a_damaged_encoding_never_panics_the_decoder(
        snap in arb_snap(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 0..3),
    ) {
        let mut bytes = encoded(&snap);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        decodes_canonically(&bytes)?;
        bytes.truncate(cut.index(bytes.len() + 1));
        bytes.extend_from_slice(&extra);
        decodes_canonically(&bytes)?;
    }
}

/// The encoding of [`sample`] is the one in `router_snap.golden` for
/// this [`ROUTER_SNAP_VERSION`]: a format changed without a bump fails
/// here, and blessing (`SAPS_BLESS_ROUTER_SNAP=1`) refuses to rewrite the
/// file of a version whose encoding changed. The file decodes to the
/// sample.
#[test]
fn a_sample_encodes_as_the_golden_file_of_its_version() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/endpoint/freeze/router_snap.golden");
    let golden = crate::golden::Golden {
        path: &path,
        sample: "sample() in fabric/src/endpoint/freeze/tests_snapshot.rs",
        version_name: "ROUTER_SNAP_VERSION",
        version: ROUTER_SNAP_VERSION,
        bless_var: "SAPS_BLESS_ROUTER_SNAP",
        bless_cmd: "cargo test -p saps-fabric freeze::tests_snapshot",
    };
    if let Some(octets) = golden.check(&encoded(&sample())) {
        assert_eq!(RouterSnap::decode(&octets), Ok(sample()));
    }
}

/// The router of a real frozen endpoint (four relays halfway, its
/// channel's pipe holding spliced payloads) decodes to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_of_a_real_capture_round_trips() {
    let halfway = frozen_halfway().await;
    let router = &halfway.cap.router;
    assert!(router.pipe.is_some() && !router.relays.is_empty());
    let wire = encoded(router);
    assert_eq!(RouterSnap::decode(&wire).as_ref(), Ok(router));
}

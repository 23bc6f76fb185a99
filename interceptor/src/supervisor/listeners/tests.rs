//! The listener table without seccomp: listeners are socket pairs made
//! here (`L` plays the program's listener, `M` is the supervisor's end),
//! and queued connections are plain sockets.

use super::*;
use crate::supervisor::objects::pair;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), port))
}

/// A listener on `port`: the program's `L` and the table's [`Listener`].
fn listener(port: u16) -> (OwnedFd, Listener) {
    let (l, m) = pair(true).unwrap();
    let listener = Listener {
        marker: Arc::new(m),
        addr: addr(port),
        flags: 0,
        backlog: 128,
    };
    (l, listener)
}

fn arrival(port: u16) -> Arrival {
    Arrival {
        peer: addr(40000 + port),
        local: addr(80),
    }
}

/// A handed-over connection `id` arriving for `listener`, placed now.
fn hand_over(t: &ListenerTable, listener: ConnId, id: ConnId, now: Instant) -> Placement {
    let (sock, _) = pair(true).unwrap();
    t.arrive(id, arrival(id as u16), Some((sock, Kind::Handed)));
    t.place(listener, id, Kind::Handed, now)
}

/// Markers on `l`, counted without taking them off.
fn markers_on(l: &OwnedFd) -> usize {
    let mut buf = [0u8; 64];
    let flags = so_flags();
    nix::sys::socket::recv(l.as_raw_fd(), &mut buf, flags).unwrap_or(0)
}

fn so_flags() -> nix::sys::socket::MsgFlags {
    nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT
}

fn taken_ids(t: &ListenerTable, lconn: ConnId, l: &OwnedFd) -> Vec<ConnId> {
    std::iter::from_fn(|| t.take_next(lconn, l.as_fd()).unwrap())
        .map(|x| x.id)
        .collect()
}

#[test]
fn accept_takes_in_arrival_order() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    assert!(t.listen(1, lis).is_empty());
    let now = Instant::now();
    for id in [10, 11, 12] {
        assert!(matches!(hand_over(&t, 1, id, now), Placement::Queued));
    }
    let first = t.take_next(1, l.as_fd()).unwrap().unwrap();
    assert_eq!((first.id, first.kind), (10, Kind::Handed));
    assert_eq!(first.arrival, Some(arrival(10)));
    assert_eq!(taken_ids(&t, 1, &l), [11, 12]);
}

#[test]
fn l_polls_readable_exactly_while_connections_wait() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    assert_eq!(markers_on(&l), 0);
    let now = Instant::now();
    for id in 0..10 {
        hand_over(&t, 1, 100 + id, now);
    }
    // One marker per MARKER_STEP queued, at most MAX_MARKERS.
    assert_eq!(markers_on(&l), markers_for(10));
    for left in (0..10).rev() {
        assert!(t.take_next(1, l.as_fd()).unwrap().is_some());
        assert!(markers_on(&l) <= left, "never more markers than queued");
        assert_eq!(markers_on(&l) > 0, left > 0, "{left} left");
    }
    assert!(t.take_next(1, l.as_fd()).unwrap().is_none());
}

#[test]
fn a_failed_accept_goes_back_to_the_head_of_the_queue() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    let now = Instant::now();
    hand_over(&t, 1, 10, now);
    hand_over(&t, 1, 11, now);
    let first = t.take_next(1, l.as_fd()).unwrap().unwrap();
    assert!(matches!(t.requeue(1, first), Placement::Queued));
    let again = t.take_next(1, l.as_fd()).unwrap().unwrap();
    assert_eq!(again.id, 10);
    assert_eq!(
        again.arrival,
        Some(arrival(10)),
        "its addresses came back with it"
    );
    assert_eq!(taken_ids(&t, 1, &l), [11]);
}

#[test]
fn a_listener_installed_again_keeps_its_queue() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis.clone());
    hand_over(&t, 1, 10, Instant::now());
    assert!(t.listen(1, lis).is_empty());
    assert_eq!(taken_ids(&t, 1, &l), [10]);
}

#[test]
fn a_relayed_connection_asks_for_its_socket_pair_before_it_queues() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    let now = Instant::now();
    t.arrive(10, arrival(10), None);
    assert!(matches!(
        t.place(1, 10, Kind::Relayed, now),
        Placement::NeedsSocket(1)
    ));
    assert_eq!(markers_on(&l), 0, "nothing to accept yet");
    let (program_end, _relay_end) = pair(true).unwrap();
    t.attach(10, program_end);
    assert!(matches!(
        t.place(1, 10, Kind::Relayed, now),
        Placement::Queued
    ));
    let taken = t.take_next(1, l.as_fd()).unwrap().unwrap();
    assert_eq!((taken.id, taken.kind), (10, Kind::Relayed));
}

#[test]
fn closing_a_listener_resets_its_queued_connections() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    let now = Instant::now();
    hand_over(&t, 1, 10, now);
    hand_over(&t, 1, 11, now);
    assert!(t.reap(None).closed.is_empty(), "L is still held");
    drop(l);
    let reaped = t.reap(Some(80));
    assert_eq!(reaped.closed, [1]);
    let refused: Vec<_> = reaped.refused.iter().map(|r| (r.id, r.kind)).collect();
    assert_eq!(refused, [(10, Kind::Handed), (11, Kind::Handed)]);
    assert!(reaped.refused.iter().all(|r| r.socket.is_some()));
    assert!(!t.is_listening(1));
}

#[test]
fn queued_clients_follow_a_relisten_within_the_grace() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    drop(l);
    t.reap(None);
    // The io-server had sent these before it learnt of the close.
    let now = Instant::now();
    assert_eq!(
        hand_over(&t, 1, 10, now).awaits(),
        Some(Awaits::Address(addr(80)))
    );
    assert!(t.expire(now + RELISTEN_GRACE / 2).is_empty());
    // The program listens on the same address again.
    let (l2, lis2) = listener(80);
    assert_eq!(t.listen(2, lis2), [(10, Kind::Handed)]);
    assert!(matches!(
        t.place(2, 10, Kind::Handed, now),
        Placement::Queued
    ));
    // One sent to the closed listener now goes straight to the new one.
    assert!(matches!(hand_over(&t, 1, 11, now), Placement::Queued));
    assert_eq!(taken_ids(&t, 2, &l2), [10, 11]);
}

#[test]
fn retired_listener_queue_is_released_after_the_grace() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    drop(l);
    t.reap(None);
    let now = Instant::now();
    hand_over(&t, 1, 10, now);
    let later = now + Duration::from_millis(10);
    hand_over(&t, 1, 11, later);
    assert!(t
        .expire(now + RELISTEN_GRACE - Duration::from_millis(1))
        .is_empty());
    let expired = t.expire(now + RELISTEN_GRACE);
    assert_eq!(expired.len(), 1, "only the first waited the whole grace");
    let (awaits, refused) = &expired[0];
    assert_eq!(*awaits, Awaits::Address(addr(80)));
    assert_eq!((refused.id, refused.kind), (10, Kind::Handed));
    assert!(
        refused.socket.is_some(),
        "its socket is handed back to close"
    );
    let expired = t.expire(later + RELISTEN_GRACE);
    assert_eq!(expired.iter().map(|e| e.1.id).collect::<Vec<_>>(), [11]);
    // A listener on the address now finds nothing left to adopt.
    let (_l2, lis2) = listener(80);
    assert!(t.listen(2, lis2).is_empty());
}

#[test]
fn a_connection_for_a_listener_not_made_yet_waits_for_it() {
    let t = ListenerTable::new();
    let now = Instant::now();
    assert_eq!(
        hand_over(&t, 7, 10, now).awaits(),
        Some(Awaits::Listener(7))
    );
    let (_l, lis) = listener(80);
    assert!(
        t.listen(8, lis).is_empty(),
        "another listener does not take it"
    );
    let (_l, lis) = listener(81);
    assert_eq!(t.listen(7, lis), [(10, Kind::Handed)]);
}

#[test]
fn dormant_listener_keeps_its_marker_end_until_closed() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    let m = Arc::downgrade(&lis.marker);
    t.go_dormant([lis]);
    t.reap(None);
    assert!(m.upgrade().is_some(), "M kept while the program holds L");
    drop(l);
    t.reap(None);
    assert!(m.upgrade().is_none(), "M closed once L is");
}

#[test]
fn a_marker_refused_by_a_closed_l_hands_back_the_queue() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    drop(l);
    let Placement::MarkerFailed(f) = hand_over(&t, 1, 10, Instant::now()) else {
        panic!("the marker cannot reach a closed L");
    };
    assert_eq!(
        (f.listener, f.addr, f.errno),
        (1, addr(80), libc::ECONNREFUSED)
    );
    assert_eq!(f.queued, [10]);
    assert_eq!(t.kind_of(10), Kind::Handed, "its socket is still held");
}

#[test]
fn markers_the_program_read_are_put_back() {
    let t = ListenerTable::new();
    let (l, lis) = listener(80);
    t.listen(1, lis);
    hand_over(&t, 1, 10, Instant::now());
    assert_eq!(markers_on(&l), 1);
    assert!(crate::supervisor::markers::take_one(l.as_fd()).unwrap());
    assert_eq!(markers_on(&l), 0);
    t.repair_markers();
    assert_eq!(markers_on(&l), 1);
    assert_eq!(taken_ids(&t, 1, &l), [10]);
    assert_eq!(markers_on(&l), 0);
}

#[test]
fn a_rejoin_forgets_queues_and_returns_the_listeners() {
    let t = ListenerTable::new();
    let (_l, lis) = listener(80);
    t.listen(1, lis);
    let now = Instant::now();
    hand_over(&t, 1, 10, now);
    hand_over(&t, 9, 11, now);
    let (listeners, closed) = t.drain_for_rejoin();
    assert_eq!(listeners.iter().map(|x| x.0).collect::<Vec<_>>(), [1]);
    assert_eq!(closed.len(), 2, "the queued and the waiting connection");
    assert!(!t.is_listening(1));
    assert!(t.expire(now + RELISTEN_GRACE).is_empty());
}

#[test]
fn retired_listeners_are_kept_up_to_a_bound() {
    let t = ListenerTable::new();
    for conn in 0..RETIRED_KEPT as u64 + 1 {
        let (l, lis) = listener(1000);
        t.listen(conn, lis);
        drop(l);
        t.reap(None);
    }
    let now = Instant::now();
    // The oldest is forgotten: a connection for it awaits the tag itself.
    assert_eq!(
        hand_over(&t, 0, 10, now).awaits(),
        Some(Awaits::Listener(0))
    );
    assert_eq!(
        hand_over(&t, 1, 11, now).awaits(),
        Some(Awaits::Address(addr(1000)))
    );
}

impl Placement {
    fn awaits(&self) -> Option<Awaits> {
        match self {
            Placement::Parked(a) => Some(*a),
            _ => None,
        }
    }
}

/// Out of descriptors: a relayed connection that got no socket pair waits
/// unplaced, with no marker on `L`, and is handed back in order to be
/// placed again; one retry task at a time.
#[test]
fn connections_short_of_descriptors_wait_unplaced_and_come_back_in_order() {
    let t = ListenerTable::new();
    let (l, lst) = listener(80);
    assert!(t.listen(7, lst).is_empty());
    for id in [11, 12] {
        t.arrive(id, arrival(id as u16), None);
        assert!(matches!(
            t.place(7, id, Kind::Relayed, Instant::now()),
            Placement::NeedsSocket(7)
        ));
        t.short_of_descriptors(7, id);
    }
    assert!(t.is_short());
    assert_eq!(markers_on(&l), 0, "nothing to accept yet");
    assert!(t.arm_retry(), "the first arms the retry task");
    assert!(!t.arm_retry(), "one task at a time");
    assert_eq!(t.take_short(), vec![(7, 11), (7, 12)], "oldest first");
    assert!(!t.is_short());
    assert_eq!(t.take_short(), vec![], "taken once");
    // Its socket pair made now, the first is queued and `L` polls readable.
    let (program_end, _relay_end) = pair(true).unwrap();
    t.attach(11, program_end);
    assert!(matches!(
        t.place(7, 11, Kind::Relayed, Instant::now()),
        Placement::Queued
    ));
    assert_eq!(markers_on(&l), 1);
    t.disarm_retry();
    assert!(t.arm_retry(), "armed again after the task ended");
}

//! [`Groups`] driven with no socket and no runtime: clients are numbers.

use super::*;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// A client: just a number.
type Client = u32;

const A: NodeId = 1;
const B: NodeId = 2;

fn port(p: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p))
}

fn from() -> IpAddr {
    IpAddr::from([192, 0, 2, 1])
}

fn no_pending(_: NodeId, _: ConnId) -> u64 {
    0
}

fn no_held(_: MemberId) -> Held {
    Held::default()
}

fn now() -> Instant {
    Instant::now()
}

fn member(node: NodeId, listener: ConnId) -> MemberId {
    MemberId { node, listener }
}

/// Groups scheduling with `kind`, nodes A and B joined with weight 1.
fn two_nodes(kind: SchedulerKind) -> Groups<Client> {
    let mut g = Groups::new(kind);
    g.join(A, 1, Instant::now());
    g.join(B, 1, Instant::now());
    g
}

/// `node`'s socket `conn` binds `key` and listens, opening the port if new.
fn listen(g: &mut Groups<Client>, key: SocketAddr, node: NodeId, conn: ConnId) {
    if g.bind(node, conn, key, 0).unwrap() == Bind::OpenPort {
        g.open(key, node, conn, 0);
    }
    assert!(g.listen(key, node, conn, 128).unwrap());
}

/// Where client `c` of `key` goes: the member's node, or `None` if queued.
fn place(g: &mut Groups<Client>, key: SocketAddr, c: Client) -> Option<NodeId> {
    match g.dispatch(key, c, from(), now(), no_pending, no_held) {
        Placement::Member(m, back) => {
            assert_eq!(back, c, "the client comes back with its member");
            Some(m.node)
        }
        Placement::Queued { .. } => None,
        other => panic!("{other:?}"),
    }
}

#[test]
fn members_join_and_leave_and_round_robin_alternates_between_them() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    listen(&mut g, key, A, 10);
    assert_eq!(place(&mut g, key, 1), Some(A));
    listen(&mut g, key, B, 20);
    let picks: Vec<_> = (0..4).map(|c| place(&mut g, key, c)).collect();
    assert_eq!(picks, [Some(B), Some(A), Some(B), Some(A)]);
    let u = g.leave(A);
    assert_eq!(u, Unbound::default(), "B still holds the port");
    assert_eq!(g.iter().next().unwrap().1.members(), [member(B, 20)]);
    assert!((0..3).all(|c| place(&mut g, key, c) == Some(B)));
    assert_eq!(g.group_of(member(B, 20)), Some(key));
    assert_eq!(g.group_of(member(A, 10)), None);
}

#[test]
fn a_weight_of_0_drains_and_queued_clients_go_when_a_member_is_eligible() {
    let mut g = two_nodes(SchedulerKind::Wrr);
    let key = port(80);
    listen(&mut g, key, A, 10);
    listen(&mut g, key, B, 20);
    assert!(g.set_weight(A, 0));
    assert!((0..5).all(|c| place(&mut g, key, c) == Some(B)));
    assert!(g.set_weight(B, 0));
    assert_eq!(place(&mut g, key, 7), None);
    assert_eq!(place(&mut g, key, 8), None);
    assert_eq!(g.iter().next().unwrap().1.queued(), 2);
    assert_eq!(
        g.next_queued(key, no_held),
        None,
        "nobody eligible: they stay"
    );
    assert!(g.set_weight(A, 3));
    assert_eq!(g.next_queued(key, no_held), Some(7), "oldest first");
    assert_eq!(g.next_queued(key, no_held), Some(8));
    assert_eq!(g.next_queued(key, no_held), None);
    assert!(!g.set_weight(9, 1), "no such node");
}

#[test]
fn a_node_leaving_sends_its_clients_to_the_other_members_then_to_the_queue() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    listen(&mut g, key, A, 10);
    listen(&mut g, key, B, 20);
    let _ = g.leave(A);
    // The clients A had not accepted come back, one by one.
    for c in 0..3 {
        match g.redispatch(key, c, from(), now(), no_pending, no_held) {
            Placement::Member(m, _) => assert_eq!(m, member(B, 20)),
            other => panic!("{other:?}"),
        }
    }
    let u = g.leave(B);
    assert_eq!(u.closed, []);
    assert_eq!(u.orphaned.len(), 1, "the port waits for a listener");
    assert_eq!(
        g.redispatch(key, 9, from(), now(), no_pending, no_held),
        Placement::Queued { expire: true }
    );
    let (_, group) = g.iter().next().unwrap();
    assert_eq!(group.redispatched(), 4);
    assert_eq!(group.queued(), 1);
}

#[test]
fn a_port_left_by_its_last_listener_keeps_its_queue_for_whoever_takes_it_over() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(5201);
    listen(&mut g, key, A, 10);
    let u = g.unbind(A, Some(10));
    let [orphan] = u.orphaned[..] else {
        panic!("{u:?}");
    };
    assert_eq!(orphan.key, key);
    assert_eq!(place(&mut g, key, 1), None, "waits in the queue");
    // Another node binds the port within the grace: the group is its.
    assert_eq!(g.bind(B, 30, key, 0), Ok(Bind::Joined(key)));
    assert_eq!(g.close_orphan(orphan), None, "taken over: stays open");
    assert!(g.listen(key, B, 30, 128).unwrap());
    assert_eq!(g.next_queued(key, no_held), Some(1));
    // Left again, and nobody comes: closed with its waiting clients.
    let orphan = g.unbind(B, None).orphaned[0];
    assert_eq!(place(&mut g, key, 2), None);
    assert_eq!(g.close_orphan(orphan), Some(vec![2]));
    assert!(!g.contains(key));
    match g.dispatch(key, 3, from(), now(), no_pending, no_held) {
        Placement::NoGroup(3) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_second_bind_of_a_port_by_one_node_needs_reuseport_on_both_and_two_nodes_share_it() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    assert_eq!(g.bind(A, 10, key, 0), Ok(Bind::OpenPort));
    g.open(key, A, 10, 0);
    assert_eq!(g.bind(A, 11, key, 0), Err(libc::EADDRINUSE));
    let reuse = bind_flags::REUSEPORT;
    assert_eq!(
        g.bind(A, 11, key, reuse),
        Err(libc::EADDRINUSE),
        "first lacks it"
    );
    assert_eq!(
        g.bind(B, 20, key, 0),
        Ok(Bind::Joined(key)),
        "another node shares it"
    );
    assert_eq!(g.bind(B, 21, key, reuse), Err(libc::EADDRINUSE));
    assert_eq!(
        g.bind(A, 0, port(0), 0),
        Ok(Bind::OpenPort),
        "port 0: a new one"
    );
    // Bound, never listening: the port closes with its last bind.
    assert_eq!(g.unbind(A, Some(10)), Unbound::default());
    let u = g.unbind(B, Some(20));
    assert_eq!((u.closed, u.orphaned), (vec![key], vec![]));
    assert!(!g.contains(key));
    // Two sockets of one node with SO_REUSEPORT both.
    let key = port(81);
    assert_eq!(g.bind(A, 12, key, reuse), Ok(Bind::OpenPort));
    g.open(key, A, 12, reuse);
    assert_eq!(g.bind(A, 13, key, reuse), Ok(Bind::Joined(key)));
}

#[test]
fn two_reuseaddr_binds_of_one_node_share_a_port_until_one_listens() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    let addr = bind_flags::REUSEADDR;
    assert_eq!(g.bind(A, 10, key, addr), Ok(Bind::OpenPort));
    g.open(key, A, 10, addr);
    assert_eq!(
        g.bind(A, 11, key, 0),
        Err(libc::EADDRINUSE),
        "one side only"
    );
    assert_eq!(g.bind(A, 11, key, addr), Ok(Bind::Joined(key)));
    assert_eq!(g.listen(key, A, 10, 4), Ok(true));
    assert_eq!(
        g.listen(key, A, 11, 4),
        Err(libc::EADDRINUSE),
        "the first listens"
    );
    assert_eq!(
        g.bind(A, 12, key, addr),
        Err(libc::EADDRINUSE),
        "a listener's port is not shared by SO_REUSEADDR"
    );
    // SO_REUSEPORT on both lets two listen.
    let key = port(81);
    let both = bind_flags::REUSEADDR | bind_flags::REUSEPORT;
    assert_eq!(g.bind(A, 20, key, both), Ok(Bind::OpenPort));
    g.open(key, A, 20, both);
    assert_eq!(g.bind(A, 21, key, both), Ok(Bind::Joined(key)));
    assert_eq!(g.listen(key, A, 20, 4), Ok(true));
    assert_eq!(g.listen(key, A, 21, 4), Ok(true));
}

#[test]
fn listen_twice_is_one_member_and_listen_on_no_group_is_einval() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    listen(&mut g, key, A, 10);
    assert_eq!(g.listen(key, A, 10, 128), Ok(false));
    assert_eq!(g.iter().next().unwrap().1.members().len(), 1);
    assert_eq!(g.listen(port(81), A, 11, 128), Err(libc::EINVAL));
}

#[test]
fn the_queue_holds_at_most_max_queued_clients() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    g.open(key, A, 10, 0);
    for c in 0..MAX_QUEUED as Client {
        assert_eq!(place(&mut g, key, c), None);
    }
    match g.dispatch(key, 9999, from(), now(), no_pending, no_held) {
        Placement::QueueFull(9999) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(g.take_queues().len(), MAX_QUEUED);
    assert_eq!(g.iter().next().unwrap().1.queued(), 0);
}

#[test]
fn only_a_scheduler_that_needs_bytes_in_flight_has_them_computed() {
    let key = port(80);
    for kind in [SchedulerKind::Rr, SchedulerKind::Wlc, SchedulerKind::Mwlc] {
        let mut g = two_nodes(kind);
        listen(&mut g, key, A, 10);
        listen(&mut g, key, B, 20);
        // A has two live connections with few bytes in flight, B one
        // with many.
        g.connection_started(A, 100, Some((key, member(A, 10))));
        g.connection_started(A, 101, Some((key, member(A, 10))));
        g.connection_started(B, 200, Some((key, member(B, 20))));
        let calls = Cell::new(0);
        let pending = |node: NodeId, _: ConnId| {
            calls.set(calls.get() + 1);
            if node == A {
                10
            } else {
                1 << 20
            }
        };
        let picked = g.pick(key, from(), pending, no_held).unwrap();
        match kind {
            SchedulerKind::Mwlc => {
                assert_eq!(calls.get(), 3, "once per live connection");
                assert_eq!(picked.node, A, "fewer bytes to deliver");
            }
            SchedulerKind::Wlc => {
                assert_eq!(calls.get(), 0);
                assert_eq!(picked.node, B, "fewer live connections");
            }
            _ => assert_eq!(calls.get(), 0),
        }
    }
}

#[test]
fn traffic_is_counted_for_node_group_and_member_and_forgotten_with_them() {
    let mut g = two_nodes(SchedulerKind::Wlc);
    let key = port(80);
    listen(&mut g, key, A, 10);
    let m = member(A, 10);
    g.connection_started(A, 100, Some((key, m)));
    g.connection_started(A, 101, None);
    g.handed_off(key, m);
    let t = g.traffic();
    assert_eq!(t.get(Scope::Node(A)).unwrap().total(), 3);
    assert_eq!(t.get(Scope::Group(key)).unwrap().total(), 2);
    assert_eq!(t.get(Scope::Member(key, m)).unwrap().active(), 1);
    assert_eq!(t.live_connections(), 2);
    g.connection_finished(A, 100, (3, 4));
    assert_eq!(g.traffic().get(Scope::Group(key)).unwrap().bytes(), (3, 4));
    // wlc sees A's live connections through the ledger.
    listen(&mut g, key, B, 20);
    g.connection_started(A, 102, Some((key, m)));
    assert_eq!(
        g.pick(key, from(), no_pending, no_held),
        Some(member(B, 20))
    );
    let _ = g.leave(A);
    let t = g.traffic();
    assert!(t.get(Scope::Node(A)).is_none());
    assert!(t.get(Scope::Member(key, m)).is_none());
    assert_eq!(t.get(Scope::Group(key)).unwrap().total(), 3);
}

/// Groups of `kind` admitting within `limits`, nodes A and B joined.
fn limited(limits: Limits) -> Groups<Client> {
    let mut g = Groups::with_limits(SchedulerKind::Rr, limits);
    g.join(A, 1, Instant::now());
    g.join(B, 1, Instant::now());
    g
}

/// A node of protocol version 2 holding `unaccepted` relayed clients.
fn holding(unaccepted: usize) -> Held {
    Held {
        relayed: unaccepted,
        counts_accepts: true,
        ..Held::default()
    }
}

#[test]
fn a_member_whose_program_holds_its_backlog_unaccepted_gets_no_more_clients() {
    let mut g = limited(Limits::default());
    let key = port(80);
    for (node, conn) in [(A, 10), (B, 20)] {
        if g.bind(node, conn, key, 0).unwrap() == Bind::OpenPort {
            g.open(key, node, conn, 0);
        }
        assert!(g.listen(key, node, conn, 8).unwrap());
    }
    // A holds 9 unaccepted (a kernel listener of backlog 8 holds 9): only
    // B is eligible, whatever the round robin's turn.
    let full_a = |m: MemberId| holding(if m.node == A { 9 } else { 0 });
    for c in 0..4 {
        match g.dispatch(key, c, from(), now(), no_pending, full_a) {
            Placement::Member(m, _) => assert_eq!(m.node, B),
            other => panic!("{other:?}"),
        }
    }
    // 8 unaccepted: room for one more, as in the kernel.
    let eight = |_: MemberId| holding(8);
    assert!(g.pick(key, from(), no_pending, eight).is_some());
    // Both full: queued, and the queue's room is what admits more.
    let full = |_: MemberId| holding(9);
    let placed = g.dispatch(key, 7, from(), now(), no_pending, full);
    assert_eq!(placed, Placement::Queued { expire: true });
    assert!(g.admits(key, full), "the queue has room");
    assert_eq!(g.next_queued(key, full), None, "nobody eligible: it waits");
    assert_eq!(g.next_queued(key, eight), Some(7), "a place freed: it goes");
    // A node that does not tell of accepts (version 1) is not bounded so.
    let v1 = |_: MemberId| Held {
        relayed: 100,
        ..Held::default()
    };
    assert!(g.pick(key, from(), no_pending, v1).is_some());
    // Nor one keeping all it may for re-dispatch.
    let node_full = |_: MemberId| Held {
        node_full: true,
        ..holding(0)
    };
    assert_eq!(g.pick(key, from(), no_pending, node_full), None);
}

#[test]
fn max_conn_per_node_and_per_group_count_live_and_handed_clients() {
    let limits = Limits {
        per_node: 2,
        per_group: 3,
        ..Limits::default()
    };
    let mut g = limited(limits);
    let key = port(80);
    listen(&mut g, key, A, 10);
    listen(&mut g, key, B, 20);
    let (a, b) = (member(A, 10), member(B, 20));
    // A has two live relayed connections: at its bound.
    g.connection_started(A, 100, Some((key, a)));
    g.connection_started(A, 101, Some((key, a)));
    for c in 0..3 {
        assert_eq!(place(&mut g, key, c), Some(B));
    }
    // B has one handed over, not accepted yet: the group holds 3, its bound.
    let handed_b = |m: MemberId| Held {
        handed: usize::from(m == b),
        counts_accepts: true,
        ..Held::default()
    };
    let placed = g.dispatch(key, 9, from(), now(), no_pending, handed_b);
    assert_eq!(placed, Placement::Queued { expire: true });
    // One of A's ends: A is below both bounds again.
    g.connection_finished(A, 100, (0, 0));
    assert_eq!(g.next_queued(key, handed_b), Some(9));
    assert_eq!(g.pick(key, from(), no_pending, handed_b), Some(a));
}

#[test]
fn a_full_queue_pauses_the_group_until_a_place_or_room_frees() {
    let limits = Limits {
        max_queue: 2,
        ..Limits::default()
    };
    let mut g = limited(limits);
    let key = port(80);
    listen(&mut g, key, A, 10);
    let full = |_: MemberId| holding(2);
    let free = |_: MemberId| holding(0);
    g.listen(key, A, 10, 1).unwrap(); // backlog 1: 2 unaccepted is full
    let t0 = now();
    for c in 0..2 {
        assert!(matches!(
            g.dispatch(key, c, from(), t0, no_pending, full),
            Placement::Queued { .. }
        ));
    }
    assert!(!g.admits(key, full), "queue full, nobody eligible");
    assert_eq!(g.iter().next().unwrap().1.paused(), (true, 1));
    assert_eq!(g.waiting(), vec![key]);
    assert!(!g.resume(key, full), "still nothing");
    assert!(g.resume(key, free), "a member is eligible again");
    assert_eq!(g.iter().next().unwrap().1.paused(), (false, 1));
    assert!(!g.resume(key, free), "resumed once");
}

#[test]
fn clients_queued_past_the_queue_timeout_are_given_back_to_close_and_counted() {
    let limits = Limits {
        queue_timeout: Duration::from_secs(5),
        ..Limits::default()
    };
    let mut g = limited(limits);
    let key = port(80);
    g.open(key, A, 10, 0);
    let t0 = now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut expires = Vec::new();
    for (c, t) in [(1, 0), (2, 1), (3, 3)] {
        match g.dispatch(key, c, from(), at(t), no_pending, no_held) {
            Placement::Queued { expire } => expires.push(expire),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(expires, [true, false, false], "one timer for the queue");
    assert_eq!(g.expire(key, at(4)), (vec![], Some(at(5))));
    assert_eq!(g.expire(key, at(6)), (vec![1, 2], Some(at(8))));
    assert_eq!(g.expire(key, at(8)), (vec![3], None));
    let (_, group) = g.iter().next().unwrap();
    assert_eq!(group.queue_counts(), (3, 3));
    // The timer ended with the queue: the next client sets one again.
    assert_eq!(
        g.dispatch(key, 4, from(), at(9), no_pending, no_held),
        Placement::Queued { expire: true }
    );
}

#[test]
fn the_bounds_come_from_the_flags_and_the_group_bound_from_the_descriptor_limit() {
    let config = crate::config::Config {
        max_conn_per_node: 10,
        max_queue: 50,
        queue_timeout: 7,
        ..Default::default()
    };
    let l = Limits::new(&config, 20_000);
    assert_eq!((l.per_node, l.max_queue), (10, 50));
    assert_eq!(l.queue_timeout, Duration::from_secs(7));
    assert_eq!(l.per_group, 20_000 - RESERVED_FDS as usize, "derived");
    assert_eq!(Limits::new(&config, 100).per_group, 64, "at least 64");
    let set = crate::config::Config {
        max_conn_per_group: 300,
        ..config
    };
    assert_eq!(Limits::new(&set, 20_000).per_group, 300, "as set");
}

#[test]
fn a_node_in_its_slow_start_gets_a_share_that_ramps_up_to_its_weight() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let mut g = Groups::<Client>::new(SchedulerKind::Wrr);
    g.set_slow_start(10 * s);
    g.join(A, 10, t0 - 60 * s); // long warm
    g.join(B, 10, t0); // just joined
    let key = port(80);
    listen(&mut g, key, A, 10);
    listen(&mut g, key, B, 20);
    // Of 300 clients, how many B got.
    let share_of_b = |g: &mut Groups<Client>| {
        let picks: Vec<_> = (0..300).map(|c| place(g, key, c)).collect();
        picks.iter().filter(|&&n| n == Some(B)).count()
    };
    assert!(g.ramp(t0), "A's ramp is over: its full weight");
    assert_eq!((g.weight(B), g.ramping_to(B)), (1, Some(10)));
    let b = share_of_b(&mut g);
    assert!((25..=30).contains(&b), "1 of 11: {b}");
    assert!(g.ramp(t0 + 5 * s), "raised");
    assert_eq!(g.weight(B), 5);
    let b = share_of_b(&mut g);
    assert!((98..=102).contains(&b), "5 of 15: {b}");
    // The operator's weight change holds for the rest of the ramp.
    assert!(g.set_weight(B, 20));
    assert!(g.ramp(t0 + 5 * s));
    assert_eq!((g.weight(B), g.ramping_to(B)), (10, Some(20)));
    assert!(g.ramp(t0 + 10 * s));
    assert_eq!((g.weight(B), g.ramping_to(B)), (20, None), "over");
    assert!(!g.ramp(t0 + 11 * s));
    assert_eq!(g.weight(A), 10, "A was never ramped (it was warm)");
}

#[test]
fn a_v6only_socket_and_an_inet_one_of_one_node_share_a_port_and_the_inet_one_gets_its_clients() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    let v6only = bind_flags::V6ONLY;
    assert_eq!(g.bind(A, 10, key, v6only), Ok(Bind::OpenPort));
    g.open(key, A, 10, v6only);
    assert_eq!(g.listen(key, A, 10, 4), Ok(true));
    assert_eq!(
        place(&mut g, key, 1),
        Some(A),
        "alone, the v6only listener serves the one address"
    );
    assert_eq!(
        g.bind(A, 11, key, 0),
        Err(libc::EADDRINUSE),
        "a dual-stack one takes the IPv4 addresses too"
    );
    assert_eq!(g.bind(A, 11, key, INET), Ok(Bind::Joined(key)));
    assert_eq!(g.listen(key, A, 11, 4), Ok(true));
    assert_eq!(
        g.bind(A, 12, key, INET),
        Err(libc::EADDRINUSE),
        "two AF_INET ones conflict"
    );
    // Its clients are IPv4 ones: all for the AF_INET listener now.
    let picks: Vec<_> = (0..4)
        .map(
            |c| match g.dispatch(key, c, from(), now(), no_pending, no_held) {
                Placement::Member(m, _) => m,
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert_eq!(picks, [member(A, 11); 4]);
    // Not IPV6_V6ONLY: an AF_INET6 socket takes the IPv4 addresses.
    let key = port(81);
    assert_eq!(g.bind(A, 20, key, INET), Ok(Bind::OpenPort));
    g.open(key, A, 20, INET);
    assert_eq!(g.bind(A, 21, key, 0), Err(libc::EADDRINUSE));
    assert_eq!(g.bind(A, 21, key, v6only), Ok(Bind::Joined(key)));
    assert_eq!(g.listen(key, A, 21, 4), Ok(true));
    assert_eq!(g.listen(key, A, 20, 4), Ok(true), "no conflict at listen");
    assert_eq!(place(&mut g, key, 1), Some(A));
}

#[test]
fn a_listener_that_left_lingers_against_binds_it_would_not_share_its_port_with() {
    let mut g = two_nodes(SchedulerKind::Rr);
    let key = port(80);
    let addr = bind_flags::REUSEADDR;
    assert_eq!(g.bind(A, 10, key, addr), Ok(Bind::OpenPort));
    g.open(key, A, 10, addr);
    assert_eq!(g.listen(key, A, 10, 4), Ok(true));
    let t = now();
    assert!(
        !g.lingers(A, key, 0, t),
        "listening still: the bind rules say"
    );
    let _ = g.unbind(A, Some(10));
    assert!(g.lingers(A, key, 0, t), "without SO_REUSEADDR");
    assert!(!g.lingers(A, key, addr, t), "SO_REUSEADDR on both");
    assert!(!g.lingers(B, key, 0, t), "another node");
    assert!(!g.lingers(A, port(81), 0, t), "another port");
    assert!(!g.lingers(A, port(0), 0, t), "port 0");
    assert!(
        !g.lingers(A, key, 0, now() + LINGER),
        "forgotten after LINGER"
    );
    // A bound socket that never listened was given no connection.
    assert_eq!(g.bind(A, 11, port(82), 0), Ok(Bind::OpenPort));
    g.open(port(82), A, 11, 0);
    let _ = g.unbind(A, Some(11));
    assert!(!g.lingers(A, port(82), 0, now()));
}

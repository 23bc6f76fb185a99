//! Issue 4, "must show": two nodes listen on one port behind one io-server
//! and 1000 client connections are spread as each scheduler promises.

mod common;
use common::*;
use saps_io_server::SchedulerKind;
use std::net::IpAddr;

const CLIENTS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rr_alternates_exactly_over_1000_connections() {
    let server = server(config(SchedulerKind::Rr)).await;
    let (a, b, addr) = two_nodes(&server, (1, App::Close), (5, App::Close)).await;
    for _ in 0..CLIENTS {
        drop(connect_one(addr, None, &[&a, &b]).await);
    }
    let order = a.order.lock().unwrap().clone();
    assert_eq!(order.len(), CLIENTS);
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "rr must alternate: {pair:?}");
    }
    assert_eq!((a.count(), b.count()), (500, 500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrr_three_to_one_gives_750_and_250() {
    let server = server(config(SchedulerKind::Wrr)).await;
    let (a, b, addr) = two_nodes(&server, (3, App::Close), (1, App::Close)).await;
    for _ in 0..CLIENTS {
        drop(connect_one(addr, None, &[&a, &b]).await);
    }
    assert_eq!((a.count(), b.count()), (750, 250));
    let status = server.status();
    let g = &status.groups[0];
    assert_eq!(g.counters.total, CLIENTS as u64);
    let totals: Vec<_> = g
        .members
        .iter()
        .map(|m| (m.node.as_str(), m.weight, m.counters.total))
        .collect();
    assert_eq!(totals, [("a", 3, 750), ("b", 1, 250)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sh_keeps_each_client_address_on_one_node() {
    let server = server(config(SchedulerKind::Sh)).await;
    let (a, b, addr) = two_nodes(&server, (1, App::Close), (1, App::Close)).await;
    let mut home = std::collections::HashMap::new();
    for i in 0..CLIENTS {
        let ip: IpAddr = [127, 0, 1, (i % 50) as u8 + 1].into();
        drop(connect_one(addr, Some(ip), &[&a, &b]).await);
        let node = a.order.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            home.entry(ip).or_insert_with(|| node.clone()),
            &node,
            "{ip} moved"
        );
    }
    assert!(
        a.count() > 100 && b.count() > 100,
        "both nodes serve: {} / {}",
        a.count(),
        b.count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_drains_a_node_and_its_open_connections_finish() {
    let server = server(config(SchedulerKind::Rr)).await;
    let (a, b, addr) = two_nodes(&server, (1, App::Echo), (1, App::Echo)).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(connect_one(addr, None, &[&a, &b]).await);
    }
    assert_eq!((a.count(), b.count()), (1, 1));
    assert!(server.set_weight("a", 0));
    for _ in 0..CLIENTS - 2 {
        drop(connect_one(addr, None, &[&a, &b]).await);
    }
    assert_eq!(
        (a.count(), b.count()),
        (1, CLIENTS - 1),
        "no new connection for a drained node"
    );
    // The drained node's open connection still works.
    for s in &mut open {
        echoes(s, b"still here").await;
    }
    assert!(server.set_weight("a", 1));
    drop(connect_one(addr, None, &[&a, &b]).await);
    drop(connect_one(addr, None, &[&a, &b]).await);
    assert_eq!(a.count(), 2, "weight restored: a is picked again");
}

/// lc and wlc count live connections: a node whose connections stay open
/// gets fewer new ones than a node that finishes them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lc_and_wlc_follow_live_load() {
    for kind in [SchedulerKind::Lc, SchedulerKind::Wlc] {
        let server = server(config(kind)).await;
        // a keeps every connection open; b closes each at once.
        let (a, b, addr) = two_nodes(&server, (3, App::Stall), (1, App::Close)).await;
        let mut held = Vec::new();
        for _ in 0..CLIENTS / 2 {
            held.push(connect_one(addr, None, &[&a, &b]).await);
            let a_live = a.count() as u64;
            // Let b's closed connections leave the live count before the next pick.
            wait_until("b's connections to finish", || {
                server.status().groups[0].counters.active == a_live
            })
            .await;
        }
        // lc: a gets one (the first tie); wlc with weight 3: at most three.
        let max_a = if kind == SchedulerKind::Lc { 1 } else { 3 };
        assert!(
            a.count() <= max_a,
            "{kind:?}: a got {} connections",
            a.count()
        );
        assert_eq!(a.count() + b.count(), CLIENTS / 2);
    }
}

/// mwlc counts bytes still to deliver, not connections: a node with a
/// backlog of unread data gets no new connection while the other has none,
/// even when the other has more connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mwlc_follows_bytes_still_to_deliver() {
    use tokio::io::AsyncWriteExt;
    let server = server(config(SchedulerKind::Mwlc)).await;
    let (a, b, addr) = two_nodes(&server, (1, App::Stall), (1, App::Stall)).await;
    let mut first = connect_one(addr, None, &[&a, &b]).await;
    let loaded = if a.count() == 1 { "a" } else { "b" };
    first.write_all(&[1u8; 100_000]).await.unwrap();
    wait_until("the backlog to show", || {
        server.status().groups[0].counters.in_flight >= 100_000
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(connect_one(addr, None, &[&a, &b]).await);
    }
    let order = a.order.lock().unwrap().clone();
    assert!(
        order[1..].iter().all(|n| n != loaded),
        "new connections avoid the loaded node: {order:?}"
    );
}

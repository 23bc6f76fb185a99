//! Issue 17: clients given to a node whose program had not accepted them
//! when the node left go to another member of the group, with no octet
//! lost or repeated; clients its program had accepted do not.

mod common;
use common::*;
use saps_fabric::handoff::{side, HandedOff};
use saps_fabric::transport::connect_stream;
use saps_fabric::{Channel, ChannelConfig, Endpoint, EndpointEvent, PRE_ACCEPT_MAX};
use saps_io_server::{IoServer, SchedulerKind};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Client `i`'s request: the first two (one of them goes to each node
/// under rr) are larger than what is forwarded before an accept, so part
/// of one is replayed and part read afresh.
fn request(i: usize) -> Vec<u8> {
    let len = if i < 2 {
        3 * PRE_ACCEPT_MAX + 17
    } else {
        40 + i
    };
    (0..len).map(|j| (j * 31 + i * 7) as u8).collect()
}

/// Opens a client, sends its request (in a task: a large one may not fit
/// the socket buffers), and waits until some node got the connection.
async fn client(addr: SocketAddr, i: usize, nodes: &[&TestNode]) -> (TcpStream, Vec<u8>) {
    let s = connect_one(addr, None, nodes).await;
    let msg = request(i);
    let (r, mut w) = s.into_split();
    let m = msg.clone();
    let w = tokio::spawn(async move {
        w.write_all(&m).await.unwrap();
        w
    })
    .await
    .unwrap();
    (r.reunite(w).unwrap(), msg)
}

/// Reads the echo of `msg` on `s`.
async fn echoed(s: &mut TcpStream, msg: &[u8]) {
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut buf))
        .await
        .expect("the echo within the limit")
        .expect("no reset");
    assert!(buf == msg, "echoed intact, once");
}

fn node<'a>(
    server: &'a saps_io_server::Status,
    name: &str,
) -> &'a saps_io_server::status::NodeStatus {
    server.nodes.iter().find(|n| n.name == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_clients_of_a_node_that_dies_unaccepted_are_served_by_another() {
    let server = server(config(SchedulerKind::Rr)).await;
    let (a, b, addr) = two_nodes(&server, (1, App::Unaccepted), (1, App::Echo)).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(client(addr, i, &[&a, &b]).await);
    }
    assert_eq!((a.count(), b.count()), (3, 3), "rr alternates");
    // What a's relays may forward before an accept reached it.
    let to_a: u64 = a
        .order
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, n)| *n == "a")
        .map(|(i, _)| request(i).len().min(PRE_ACCEPT_MAX) as u64)
        .sum();
    wait_until("a to be sent its clients' first octets", || {
        let st = server.status();
        let n = node(&st, "a");
        n.counters.bytes_in == to_a && n.unaccepted == 3
    })
    .await;
    // b's clients were accepted: nothing kept for them.
    assert_eq!(node(&server.status(), "b").unaccepted, 0);
    a.ep.handle().with(|ch| ch.close("node killed"));
    for (s, msg) in &mut clients {
        echoed(s, msg).await;
    }
    assert_eq!(b.count(), 6, "b took a's three");
    let st = server.status();
    assert_eq!(st.groups[0].redispatched, 3);
    assert_eq!(st.nodes.len(), 1);
}

/// A zero-relay node joined like saps-run over a `unix:` fabric, with its
/// hand-off socket claimed: handed sockets are recorded with the endpoint
/// (as the supervisor's `deliver_handoff` does) and held; its program
/// accepts none unless told.
struct HandedNode {
    ep: Endpoint,
    held: Arc<Mutex<Vec<(u64, HandedOff)>>>,
}

/// An io-server with a `unix:` fabric in `dir` (and its hand-off socket).
async fn unix_server(dir: &std::path::Path) -> (Arc<IoServer>, std::path::PathBuf) {
    let sock = dir.join("fabric.sock");
    let mut cfg = config(SchedulerKind::Rr);
    cfg.fabric = vec![format!("unix:{}", sock.display())];
    (server(cfg).await, sock)
}

async fn handed_node(sock: &std::path::Path, name: &str) -> (HandedNode, Pending) {
    let url = format!("unix:{}", sock.display()).parse().unwrap();
    let (r, w) = connect_stream(&url).await.unwrap();
    let ch = Channel::node(ChannelConfig::new(TOKEN).node(name, 1));
    let (ep, mut events) = Endpoint::spawn(ch, r, w);
    let node_id = match tokio::time::timeout(LIMIT, events.recv()).await {
        Ok(Some(EndpointEvent::Welcome { node_id })) => node_id,
        other => panic!("no welcome: {other:?}"),
    };
    let side = side::SideSocket::connect(&side::path_for(sock)).unwrap();
    side.send_hello(u64::from(node_id)).await.unwrap();
    assert!(side.recv_ack().await.unwrap(), "the claim is accepted");
    let held = Arc::new(Mutex::new(Vec::new()));
    let (h2, ep2) = (held.clone(), ep.clone());
    tokio::spawn(async move {
        let mut next = 1u64 << 62;
        while let Ok(Some(h)) = side.recv().await {
            assert_ne!(h.conn, 0, "kept by the io-server");
            assert!(ep2.handed(next, h.conn, h.node));
            h2.lock().unwrap().push((next, h));
            next += 1;
        }
    });
    (
        HandedNode {
            ep: ep.clone(),
            held,
        },
        Pending { ep, events },
    )
}

/// An io-server on a unix fabric with two members on one port: `a`, a
/// zero-relay node whose program never accepts (it holds the sockets
/// handed to it), and `b`, a relayed echo node.
async fn handed_and_echo(
    dir: &std::path::Path,
) -> (Arc<IoServer>, HandedNode, TestNode, SocketAddr) {
    let (server, sock) = unix_server(dir).await;
    let (a, a_pending) = handed_node(&sock, "a").await;
    let (_, addr) = a_pending.listen(0, 0).await.unwrap();
    let b = attach(&server, "b", 1, TOKEN).await.unwrap();
    b.listen(addr.port(), 0).await.unwrap();
    let b = b.run("b", App::Echo, Default::default());
    (server, a, b, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_clients_of_a_node_that_dies_unaccepted_are_served_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let (server, a, b, addr) = handed_and_echo(dir.path()).await;
    let mut clients = Vec::new();
    for i in 1..=4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&request(i)).await.unwrap();
        clients.push((s, request(i)));
        wait_until("the client to be given", || {
            a.held.lock().unwrap().len() + b.count() == i
        })
        .await;
    }
    assert_eq!(a.held.lock().unwrap().len(), 2);
    assert_eq!(node(&server.status(), "a").unaccepted, 2);
    // The node dies: its copies of the sockets and its channel go.
    a.held.lock().unwrap().clear();
    a.ep.handle().with(|ch| ch.close("node killed"));
    for (s, msg) in &mut clients {
        echoed(s, msg).await;
    }
    assert_eq!(b.count(), 4);
    assert_eq!(server.status().groups[0].redispatched, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_program_accepted_stays_with_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let (server, a, b, addr) = handed_and_echo(dir.path()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"processed once").await.unwrap();
    wait_until("a to get it", || a.held.lock().unwrap().len() == 1).await;
    let (local, h) = a.held.lock().unwrap().pop().unwrap();
    assert!(a.ep.may_accept(local, true));
    a.ep.accepted(local, true);
    wait_until("the io-server to close its copy", || {
        node(&server.status(), "a").unaccepted == 0
    })
    .await;
    a.ep.handle().with(|ch| ch.close("node killed"));
    wait_until("a to leave", || server.status().nodes.len() == 1).await;
    // The program has the connection: it reads the request once, answers,
    // and nobody else does.
    let mut mine = TcpStream::from_std(std::net::TcpStream::from(h.socket)).unwrap();
    let mut req = [0u8; 14];
    tokio::time::timeout(LIMIT, mine.read_exact(&mut req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&req, b"processed once");
    mine.write_all(b"from a").await.unwrap();
    drop(mine);
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"from a");
    assert_eq!(b.count(), 0);
    assert_eq!(server.status().groups[0].redispatched, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_member_left_they_wait_in_the_queue_like_any_client() {
    let server = server(config(SchedulerKind::Rr)).await;
    let a = attach(&server, "a", 1, TOKEN).await.unwrap();
    let (_, addr) = a.listen(0, 0).await.unwrap();
    let a = a.run("a", App::Unaccepted, Default::default());
    // b holds the port, drained: no eligible member once a is gone.
    let b = attach(&server, "b", 0, TOKEN).await.unwrap();
    b.listen(addr.port(), 0).await.unwrap();
    let b = b.run("b", App::Echo, Default::default());
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(client(addr, i, &[&a, &b]).await);
    }
    assert_eq!(a.count(), 3);
    a.ep.handle().with(|ch| ch.close("node killed"));
    wait_until("a's clients to be queued", || {
        let st = server.status();
        st.nodes.len() == 1 && st.groups[0].queued == 3
    })
    .await;
    assert!(server.set_weight("b", 1));
    for (s, msg) in &mut clients {
        echoed(s, msg).await;
    }
    assert_eq!(b.count(), 3);
}

/// A node of the io-server's own process (saps-run's embedded mode) cannot
/// leave without it: its channel speaks protocol version 1, so no
/// `Accepted` is sent per connection and nothing is kept.
#[tokio::test]
async fn an_embedded_node_speaks_version_1() {
    let server = server(config(SchedulerKind::Rr)).await;
    let ((sr, sw), (nr, nw)) = saps_fabric::transport::memory_pair();
    let s = server.clone();
    tokio::spawn(async move { s.attach(sr, sw).await });
    let ch = Channel::node(ChannelConfig::new(TOKEN).node("embedded", 1));
    let (ep, mut events) = Endpoint::spawn(ch, nr, nw);
    assert!(matches!(
        tokio::time::timeout(LIMIT, events.recv()).await,
        Ok(Some(EndpointEvent::Welcome { .. }))
    ));
    assert_eq!(ep.handle().with(|ch| ch.version()), 1);
    assert!(!ep.notifies_accepts());
}

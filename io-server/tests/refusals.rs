//! Issue 4, "must show": a node that announces a wrong token, binds a port
//! outside --allow-ports, or sends garbage is refused with a clear reason,
//! and other nodes are unaffected. Also the per-node EADDRINUSE rule.

mod common;
use common::*;
use saps_fabric::frame::bind_flags;
use saps_fabric::transport::FabricUrl;
use saps_io_server::SchedulerKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The good node still serves clients.
async fn still_serves(node: &TestNode, addr: std::net::SocketAddr) {
    let mut s = connect_one(addr, None, &[node]).await;
    echoes(&mut s, b"ok?").await;
}

async fn good_node(
    server: &std::sync::Arc<saps_io_server::IoServer>,
) -> (TestNode, std::net::SocketAddr) {
    let p = attach(server, "good", 1, TOKEN).await.unwrap();
    let (_, addr) = p.listen(0, 0).await.unwrap();
    (p.run("good", App::Echo, Default::default()), addr)
}

#[tokio::test]
async fn wrong_token_is_refused_and_other_nodes_are_unaffected() {
    let server = server(config(SchedulerKind::Rr)).await;
    let (good, addr) = good_node(&server).await;
    let err = attach(&server, "intruder", 1, "wrong-token")
        .await
        .err()
        .expect("refused");
    assert!(err.contains("did not prove the token"), "{err}");
    still_serves(&good, addr).await;
    let names: Vec<_> = server.status().nodes.into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["good"]);
}

#[tokio::test]
async fn port_outside_allow_ports_gets_eacces() {
    let cfg = saps_io_server::Config {
        allow_ports: Some("1-1023".parse().unwrap()),
        ..config(SchedulerKind::Rr)
    };
    let server = server(cfg).await;
    let node = attach(&server, "n", 1, TOKEN).await.unwrap();
    assert_eq!(node.listen(8080, 0).await.unwrap_err(), libc::EACCES);
    // listen() on a port the kernel picks is refused too when it is not allowed.
    assert_eq!(node.listen(0, 0).await.unwrap_err(), libc::EACCES);
    assert!(server.status().groups.is_empty());
}

#[tokio::test]
async fn garbage_from_a_node_closes_only_its_channel_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_fabric_server(dir.path()).await;
    assert_eq!(server.fabric_urls(), [FabricUrl::Unix(sock.clone())]);
    let (good, addr) = good_node(&server).await;
    let mut bad = tokio::net::UnixStream::connect(&sock).await.unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(LIMIT, bad.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("wire version") || text.contains("frame"),
        "GoAway carries the reason: {text:?}"
    );
    still_serves(&good, addr).await;
    assert_eq!(server.status().nodes.len(), 1);
}

#[tokio::test]
async fn second_bind_on_one_node_needs_reuseport_but_other_nodes_share_the_port() {
    let server = server(config(SchedulerKind::Rr)).await;
    let a = attach(&server, "a", 1, TOKEN).await.unwrap();
    let b = attach(&server, "b", 1, TOKEN).await.unwrap();
    let (_, addr) = a.listen(0, 0).await.unwrap();
    let port = addr.port();
    assert_eq!(a.listen(port, 0).await.unwrap_err(), libc::EADDRINUSE);
    b.listen(port, 0)
        .await
        .expect("another node joins the group");
    let c = attach(&server, "c", 1, TOKEN).await.unwrap();
    c.listen(port, bind_flags::REUSEPORT).await.unwrap();
    c.listen(port, bind_flags::REUSEPORT)
        .await
        .expect("SO_REUSEPORT on both: allowed");
    // A port a host program holds answers the real EADDRINUSE.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = host.local_addr().unwrap().port();
    assert_eq!(a.listen(taken, 0).await.unwrap_err(), libc::EADDRINUSE);
    let g = &server.status().groups[0];
    assert_eq!(g.members.len(), 4);
}

#[tokio::test]
async fn a_dead_node_leaves_its_group_and_queued_clients_go_to_the_next() {
    let server = server(config(SchedulerKind::Rr)).await;
    let a = attach(&server, "a", 1, TOKEN).await.unwrap();
    let (_, addr) = a.listen(0, 0).await.unwrap();
    let a = a.run("a", App::Echo, Default::default());
    // A second node keeps the port bound but drains: clients wait in the queue.
    let b = attach(&server, "b", 0, TOKEN).await.unwrap();
    b.listen(addr.port(), 0).await.unwrap();
    a.ep.handle().with(|ch| ch.close("node crashed"));
    wait_until("a to leave", || server.status().nodes.len() == 1).await;
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    wait_until("the client to queue", || {
        server.status().groups[0].queued == 1
    })
    .await;
    let b = b.run("b", App::Echo, Default::default());
    assert!(server.set_weight("b", 1));
    wait_until("the queued client to reach b", || b.count() == 1).await;
    echoes(&mut client, b"hi").await;
}

/// A node whose only listener of a port has just been closed.
async fn listener_closed(
    server: &std::sync::Arc<saps_io_server::IoServer>,
) -> (Pending, std::net::SocketAddr) {
    let a = attach(server, "a", 1, TOKEN).await.unwrap();
    let (old, addr) = a.listen(0, 0).await.unwrap();
    a.ep.close_connection(old, 0);
    wait_until("the closed listener to leave its group", || {
        server.status().groups.iter().all(|g| g.members.is_empty())
    })
    .await;
    (a, addr)
}

/// A program that closes its listener and opens a new one on the same port
/// (iperf3 does between tests): a client that arrives in between is not
/// refused; it waits and the new listener serves it.
#[tokio::test]
async fn a_client_arriving_while_a_listener_is_recreated_is_served_by_the_new_one() {
    let server = server(config(SchedulerKind::Rr)).await;
    let (a, addr) = listener_closed(&server).await;
    let mut client = tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .expect("the port still takes clients between the two listeners");
    a.listen(addr.port(), 0)
        .await
        .expect("the new listener takes the port over");
    let node = a.run("a", App::Echo, Default::default());
    echoes(&mut client, b"waited").await;
    assert_eq!(node.count(), 1);
}

/// When no listener takes the port over within the grace, the port
/// closes: the client that waited is closed and new clients are refused.
#[tokio::test]
async fn a_port_nobody_listens_on_again_closes_after_the_grace() {
    let server = server(config(SchedulerKind::Rr)).await;
    let (_node, addr) = listener_closed(&server).await;
    let mut waiting = tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .expect("accepted within the grace");
    let mut buf = [0u8; 1];
    let got = tokio::time::timeout(LIMIT, waiting.read(&mut buf))
        .await
        .expect("the waiting client is closed after the grace");
    assert!(matches!(got, Ok(0) | Err(_)), "no data for it: {got:?}");
    assert!(server.status().groups.is_empty());
    let err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// A same-host hand-off socket (zero-relay over a unix fabric) is given
/// only to the process whose unix fabric connection got the claimed node
/// id: here node 1 joined in memory, so a claim for it is refused and the
/// socket closed, and the node stays relayed.
#[tokio::test]
async fn a_handoff_claim_from_another_process_is_refused() {
    use saps_fabric::handoff::side;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fabric.sock");
    let mut cfg = config(SchedulerKind::Rr);
    cfg.fabric = vec![format!("unix:{}", sock.display())];
    let server = server(cfg).await;
    let _a = attach(&server, "a", 1, TOKEN).await.unwrap();
    let claim = side::SideSocket::connect(&side::path_for(&sock)).expect("hand-off socket");
    claim.send_hello(1).await.unwrap();
    let answer = tokio::time::timeout(LIMIT, claim.recv())
        .await
        .expect("the io-server answers the claim");
    assert!(matches!(answer, Ok(None)), "closed: {answer:?}");
    assert!(!server.status().nodes[0].zero_relay);
}

//! Issue 24, an authenticated but hostile or broken node: a weight or
//! window above the caps is refused with a clear GoAway, `SetOpt(SO_MARK)`
//! and other options off the allow-list answer EPERM, and `Connect` to
//! the io-server's own metrics address answers EACCES (to another port of
//! the gateway no group serves, ECONNREFUSED) unless
//! `--allow-connect-local`.

mod common;
use common::*;
use saps_fabric::{Request, Response};
use saps_io_server::SchedulerKind;

#[tokio::test]
async fn a_weight_or_window_above_the_cap_is_refused_with_a_clear_reason() {
    let server = server(config(SchedulerKind::Rr)).await;
    let err = attach(&server, "heavy", 100_000, TOKEN)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        err,
        "peer closed the channel: the node's weight 100000 is above the io-server's cap of 256 (--max-weight)"
    );
    attach(&server, "at-cap", 256, TOKEN)
        .await
        .expect("256 is allowed");
    // A window above --max-window, through a raw channel.
    let ((sr, sw), (nr, nw)) = saps_fabric::transport::memory_pair();
    let s = server.clone();
    tokio::spawn(async move { s.attach_remote(sr, sw, "wide").await });
    let cfg = saps_fabric::ChannelConfig::new(TOKEN)
        .node("wide", 1)
        .window(u32::MAX);
    let (_ep, mut events) = saps_fabric::Endpoint::spawn(saps_fabric::Channel::node(cfg), nr, nw);
    match tokio::time::timeout(LIMIT, events.recv()).await.unwrap() {
        Some(saps_fabric::EndpointEvent::Closed { error }) => assert!(
            error.to_string().ends_with(
                "window 4294967295 is above the io-server's cap of 16777216 (--max-window)"
            ),
            "{error}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let names: Vec<_> = server.status().nodes.into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["at-cap"]);
}

async fn set_opt(node: &Pending, level: i32, name: i32, value: i32) -> i32 {
    let conn = node.ep.make_connection().unwrap();
    let value = value.to_ne_bytes().to_vec().into();
    let r = node.ep.request(Request::SetOpt {
        conn,
        level,
        name,
        value,
    });
    r.await.unwrap().errno()
}

#[tokio::test]
async fn options_off_the_allow_list_answer_eperm() {
    let server = server(config(SchedulerKind::Rr)).await;
    let node = attach(&server, "n", 1, TOKEN).await.unwrap();
    let eperm = [
        (libc::SOL_SOCKET, libc::SO_MARK, 7),
        (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 1 << 30),
        (libc::SOL_SOCKET, libc::SO_PRIORITY, 7),
        (libc::IPPROTO_IP, libc::IP_TRANSPARENT, 1),
    ];
    for (level, name, value) in eperm {
        assert_eq!(
            set_opt(&node, level, name, value).await,
            libc::EPERM,
            "{level}/{name}"
        );
    }
    // What a TCP server sets passes (kept until the socket connects).
    assert_eq!(
        set_opt(&node, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).await,
        0
    );
    assert_eq!(
        set_opt(&node, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 5000).await,
        0
    );
    let conn = node.ep.make_connection().unwrap();
    let get = Request::GetOpt {
        conn,
        level: libc::SOL_SOCKET,
        name: libc::SO_MARK,
        len: 4,
    };
    assert!(matches!(
        node.ep.request(get).await.unwrap(),
        Response::OptValue {
            errno: libc::EPERM,
            ..
        }
    ));
    // Counted, and shown by `io-server status`.
    let status = server.status();
    assert_eq!(status.limits.refused_requests, 5);
    assert!(
        status.to_string().ends_with(
            "Limits per node: window 16777216 weight 256 output 16777216 requests 1024; refused requests 5\n"
        ),
        "{status}"
    );
}

async fn connect(node: &Pending, to: std::net::SocketAddr) -> i32 {
    let conn = node.ep.make_connection().unwrap();
    let r = node.ep.request(Request::Connect { conn, addr: to });
    r.await.unwrap().errno()
}

/// A port of this host's loopback that a plain (non-SAPS) listener holds.
fn host_listener() -> (std::net::TcpListener, std::net::SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[tokio::test]
async fn connect_to_the_metrics_address_or_a_local_port_is_refused() {
    let (_held, metrics) = host_listener();
    drop(_held);
    let cfg = saps_io_server::Config {
        metrics: Some(metrics),
        ..config(SchedulerKind::Rr)
    };
    let server = server(cfg).await;
    let node = attach(&server, "n", 1, TOKEN).await.unwrap();
    assert_eq!(connect(&node, metrics).await, libc::EACCES);
    let wild = std::net::SocketAddr::from(([0, 0, 0, 0], metrics.port()));
    assert_eq!(connect(&node, wild).await, libc::EACCES);
    // A service of the gateway host on its loopback: as if closed.
    let (_service, at) = host_listener();
    assert_eq!(connect(&node, at).await, libc::ECONNREFUSED);
    // Another node's listener on the single address is the cluster's own.
    let other = attach(&server, "web", 1, TOKEN).await.unwrap();
    let (_, group) = other.listen(0, 0).await.unwrap();
    let _web = other.run("web", App::Echo, Default::default());
    assert_eq!(connect(&node, group).await, 0);
    // With --allow-connect-local, the host's service is reached.
    let cfg = saps_io_server::Config {
        allow_connect_local: true,
        ..config(SchedulerKind::Rr)
    };
    let open = common::server(cfg).await;
    let node = attach(&open, "n", 1, TOKEN).await.unwrap();
    assert_eq!(connect(&node, at).await, 0);
}

//! Test harness: an io-server on 127.0.0.1 and application nodes built from
//! `Endpoint` + `Channel::node`, attached in memory or over the fabric.
#![allow(dead_code)] // each test file uses its own part of the harness

use saps_fabric::transport::memory_pair;
use saps_fabric::{Channel, ChannelConfig, ConnId, Endpoint, EndpointEvent, Request, Response};
use saps_io_server::{Config, IoServer, SchedulerKind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub const TOKEN: &str = "test-token";
pub const LIMIT: Duration = Duration::from_secs(15);

pub fn config(scheduler: SchedulerKind) -> Config {
    Config {
        address: "127.0.0.1".parse().unwrap(),
        scheduler,
        token: Some(TOKEN.into()),
        ..Config::default()
    }
}

pub async fn server(config: Config) -> Arc<IoServer> {
    Arc::new(IoServer::start(config).await.expect("io-server starts"))
}

/// An io-server (`rr`) that also takes nodes over the `unix:` fabric
/// `DIR/fabric.sock`; the server and that path.
pub async fn unix_fabric_server(dir: &std::path::Path) -> (Arc<IoServer>, std::path::PathBuf) {
    let sock = dir.join("fabric.sock");
    let cfg = Config {
        fabric: vec![format!("unix:{}", sock.display())],
        ..config(SchedulerKind::Rr)
    };
    (server(cfg).await, sock)
}

/// Polls `cond` until it holds, failing after [`LIMIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What a test node's application does with an accepted connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// Echo everything back, close when the client does.
    Echo,
    /// Accept, then close at once.
    Close,
    /// Accept and never read (the connection stays open).
    Stall,
    /// Like saps-run's supervisor before the program's accept: the
    /// connection is relayed into a socket nobody reads, and the node
    /// never says its program accepted it.
    Unaccepted,
}

/// An application node.
pub struct TestNode {
    pub name: String,
    pub ep: Endpoint,
    /// Accepted connection ids, in order.
    pub accepted: Arc<Mutex<Vec<ConnId>>>,
    /// Every node's accepts, in order, shared by the test (node names).
    pub order: Arc<Mutex<Vec<String>>>,
}

/// Events of a node before the accept loop takes them.
pub struct Pending {
    pub ep: Endpoint,
    pub events: mpsc::UnboundedReceiver<EndpointEvent>,
}

/// Connects a node to `server` in memory (the embedded path) and waits for Welcome.
pub async fn attach(
    server: &Arc<IoServer>,
    name: &str,
    weight: u32,
    token: &str,
) -> Result<Pending, String> {
    let ((sr, sw), (nr, nw)) = memory_pair();
    let s = server.clone();
    // As a node of another process: what it has not accepted when it
    // leaves goes to another member.
    tokio::spawn(async move { s.attach_remote(sr, sw, "test").await });
    let ch = Channel::node(ChannelConfig::new(token).node(name, weight));
    let (ep, mut events) = Endpoint::spawn(ch, nr, nw);
    match tokio::time::timeout(LIMIT, events.recv()).await {
        Ok(Some(EndpointEvent::Welcome { .. })) => Ok(Pending { ep, events }),
        Ok(Some(EndpointEvent::Closed { error })) => Err(error.to_string()),
        other => Err(format!("unexpected {other:?}")),
    }
}

impl Pending {
    /// bind + listen on 127.0.0.1:`port`; the errno on failure.
    pub async fn listen(&self, port: u16, flags: u32) -> Result<(ConnId, SocketAddr), i32> {
        let conn = self.ep.make_connection().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let bound = match self
            .ep
            .request(Request::Bind { conn, addr, flags })
            .await
            .unwrap()
        {
            Response::Status {
                errno: 0,
                addr: Some(a),
            } => a,
            r => return Err(r.errno()),
        };
        match self
            .ep
            .request(Request::Listen { conn, backlog: 128 })
            .await
            .unwrap()
            .errno()
        {
            0 => Ok((conn, bound)),
            e => Err(e),
        }
    }

    /// Runs the node's application: every accepted connection gets `app`.
    pub fn run(self, name: &str, app: App, order: Arc<Mutex<Vec<String>>>) -> TestNode {
        let node = TestNode {
            name: name.into(),
            ep: self.ep.clone(),
            accepted: Default::default(),
            order,
        };
        let (ep, accepted, order, name) = (
            self.ep,
            node.accepted.clone(),
            node.order.clone(),
            name.to_string(),
        );
        let mut events = self.events;
        tokio::spawn(async move {
            let mut stalled = HashMap::new();
            while let Some(ev) = events.recv().await {
                let EndpointEvent::ConnectionAccepted { conn, .. } = ev else {
                    continue;
                };
                // `order` first: tests wait on `accepted`, then read `order`.
                order.lock().unwrap().push(name.clone());
                accepted.lock().unwrap().push(conn);
                // The program accepted it (as saps-run's supervisor says).
                if app != App::Unaccepted {
                    ep.accepted(conn, false);
                }
                match app {
                    App::Close => ep.close_connection(conn, 0),
                    App::Echo => {
                        let ep = ep.clone();
                        let (a, b) = tokio::io::duplex(64 * 1024);
                        tokio::spawn(async move { ep.relay(conn, a).await });
                        tokio::spawn(async move {
                            let (mut r, mut w) = tokio::io::split(b);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                        });
                    }
                    App::Stall | App::Unaccepted => {
                        let ep = ep.clone();
                        let (a, b) = tokio::io::duplex(64 * 1024);
                        stalled.insert(conn, b);
                        tokio::spawn(async move { ep.relay(conn, a).await });
                    }
                }
            }
        });
        node
    }
}

impl TestNode {
    pub fn count(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

/// Two nodes `a` and `b` listening on one port with the given apps and
/// weights; returns them and the group's address.
pub async fn two_nodes(
    server: &Arc<IoServer>,
    (wa, app_a): (u32, App),
    (wb, app_b): (u32, App),
) -> (TestNode, TestNode, SocketAddr) {
    let order = Arc::new(Mutex::new(Vec::new()));
    let a = attach(server, "a", wa, TOKEN).await.unwrap();
    let b = attach(server, "b", wb, TOKEN).await.unwrap();
    let (_, addr) = a.listen(0, 0).await.expect("a listens");
    b.listen(addr.port(), 0).await.expect("b joins the group");
    (
        a.run("a", app_a, order.clone()),
        b.run("b", app_b, order),
        addr,
    )
}

/// Writes `msg` on `s` and reads it back within [`LIMIT`] (the node
/// behind it echoes).
pub async fn echoes(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut buf))
        .await
        .expect("the echo within the limit")
        .unwrap();
    assert_eq!(buf, msg);
}

/// Opens one client connection and waits until some node has accepted it.
pub async fn connect_one(
    addr: SocketAddr,
    from: Option<std::net::IpAddr>,
    nodes: &[&TestNode],
) -> tokio::net::TcpStream {
    let before: usize = nodes.iter().map(|n| n.count()).sum();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let s = tokio::time::timeout(LIMIT, sock.connect(addr))
        .await
        .unwrap()
        .unwrap();
    wait_until("the connection to be accepted", || {
        nodes.iter().map(|n| n.count()).sum::<usize>() > before
    })
    .await;
    s
}

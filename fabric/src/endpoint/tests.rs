//! Tests of the endpoint's protocol calls and routing: requests and
//! responses, events held for a relay, handed-over connections. Their
//! helpers (an authenticated pair of endpoints) serve the relay tests too.

use super::*;
use crate::channel::ChannelConfig;
use crate::transport::memory_pair;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

pub(crate) const WINDOW: u32 = 64 * 1024;
/// How long a test waits for what must happen (a bound for a failure,
/// never a pause: generous, for a loaded machine).
pub(crate) const LIMIT: Duration = Duration::from_secs(30);

pub(crate) struct Pair {
    pub(crate) server: Endpoint,
    pub(crate) server_rx: mpsc::UnboundedReceiver<EndpointEvent>,
    pub(crate) node: Endpoint,
    pub(crate) node_rx: mpsc::UnboundedReceiver<EndpointEvent>,
}

pub(crate) async fn next(rx: &mut mpsc::UnboundedReceiver<EndpointEvent>) -> EndpointEvent {
    timeout(LIMIT, rx.recv())
        .await
        .expect("event in time")
        .expect("event")
}

/// An io-server and a node endpoint, authenticated, over memory.
pub(crate) async fn pair() -> Pair {
    pair_over(memory_pair(), WINDOW).await
}

pub(crate) async fn pair_over(
    ((sr, sw), (nr, nw)): (
        (impl TransportRead, impl TransportWrite),
        (impl TransportRead, impl TransportWrite),
    ),
    window: u32,
) -> Pair {
    let server_ch = Channel::io_server(ChannelConfig::new("t").window(window));
    let node_ch = Channel::node(ChannelConfig::new("t").node("n1", 1).window(window));
    let (server, mut server_rx) = Endpoint::spawn(server_ch, sr, sw);
    let (node, mut node_rx) = Endpoint::spawn(node_ch, nr, nw);
    assert!(matches!(
        next(&mut server_rx).await,
        EndpointEvent::NodeAuthenticated { ref node, weight: 1 } if node == "n1"
    ));
    server.handle().with(|ch| ch.welcome(7));
    assert_eq!(
        next(&mut node_rx).await,
        EndpointEvent::Welcome { node_id: 7 }
    );
    Pair {
        server,
        server_rx,
        node,
        node_rx,
    }
}

pub(crate) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The io-server accepts a client connection for listener 2; returns
/// (io-server conn, node conn).
pub(crate) async fn accept(p: &mut Pair) -> ConnId {
    let conn = p
        .server
        .accept_connection(2, addr(40000), addr(80))
        .unwrap();
    match next(&mut p.node_rx).await {
        EndpointEvent::ConnectionAccepted {
            listener: 2,
            conn: c,
            ..
        } => assert_eq!(c, conn),
        other => panic!("expected ConnectionAccepted, got {other:?}"),
    }
    conn
}

/// Writes `data` to `w` and shuts it down while reading `r` to its end;
/// returns what `r` gave.
pub(crate) async fn send_and_read_all<W, R>(mut w: W, data: &[u8], mut r: R) -> Vec<u8>
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    timeout(LIMIT, async { tokio::join!(write, read) })
        .await
        .unwrap()
        .1
        .unwrap();
    got
}

/// The node sends `Listen { conn: 4, backlog: 8 }` in a task.
pub(crate) fn ask_listen(p: &Pair) -> tokio::task::JoinHandle<Result<Response, EndpointError>> {
    let node = p.node.clone();
    tokio::spawn(async move {
        node.request(Request::Listen {
            conn: 4,
            backlog: 8,
        })
        .await
    })
}

pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn request_gets_its_response() {
    let mut p = pair().await;
    let asked = ask_listen(&p);
    let EndpointEvent::Request { req, request } = next(&mut p.server_rx).await else {
        panic!("expected a request");
    };
    assert_eq!(
        request,
        Request::Listen {
            conn: 4,
            backlog: 8
        }
    );
    let answer = Response::Status {
        errno: 98,
        addr: None,
    };
    p.server.respond(req, answer.clone());
    assert_eq!(asked.await.unwrap().unwrap(), answer);
}

#[tokio::test]
async fn request_fails_when_the_channel_closes() {
    let mut p = pair().await;
    let asked = ask_listen(&p);
    assert!(matches!(
        next(&mut p.server_rx).await,
        EndpointEvent::Request { .. }
    ));
    p.server.handle().with(|ch| ch.close("test over"));
    let err = timeout(LIMIT, asked).await.unwrap().unwrap().unwrap_err();
    assert!(
        matches!(err, EndpointError::Closed(ref r) if r.contains("test over")),
        "{err}"
    );
    assert!(matches!(
        next(&mut p.node_rx).await,
        EndpointEvent::Closed { .. }
    ));
}

#[tokio::test]
async fn connection_closed_errno_reaches_the_relay() {
    let mut p = pair().await;
    let conn = accept(&mut p).await;
    let (mut app, app_side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    let node_relay = tokio::spawn(async move { n.relay(conn, app_side).await });
    p.server.close_connection(conn, errno::ECONNRESET);
    let out = timeout(LIMIT, node_relay).await.unwrap().unwrap();
    assert_eq!(out.errno, errno::ECONNRESET);
    let mut buf = [0u8; 16];
    assert_eq!(
        timeout(LIMIT, app.read(&mut buf)).await.unwrap().unwrap(),
        0,
        "app sees the end"
    );
    assert_eq!(
        p.node.handle().with(|ch| ch.connection_count()),
        0,
        "node closed it too"
    );
}

#[tokio::test]
async fn data_before_the_relay_attaches_is_held() {
    let mut p = pair().await;
    let conn = accept(&mut p).await;
    p.server
        .handle()
        .with(|ch| ch.send_message(conn, b"hello"))
        .unwrap();
    p.server.handle().with(|ch| ch.send_fin(conn)).unwrap();
    // Let the router see the data before attaching.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while p.node.handle().with(|ch| ch.buffered(conn)) < 5 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    let (mut app, app_side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    let relay = tokio::spawn(async move { n.relay(conn, app_side).await });
    let mut got = Vec::new();
    timeout(LIMIT, app.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello");
    drop(app);
    p.server.close_connection(conn, 0);
    let out = timeout(LIMIT, relay).await.unwrap().unwrap();
    assert_eq!((out.bytes_out, out.errno), (5, 0));
}

/// The node's side of a handed-over socket: recorded for this channel
/// only, accepted or closed once, never after the channel ended.
#[tokio::test]
async fn a_handed_connection_is_accepted_or_refused_once_and_only_on_its_channel() {
    let mut p = pair().await;
    let (a, b, c) = (
        p.server.hand_connection().unwrap(),
        p.server.hand_connection().unwrap(),
        p.server.hand_connection().unwrap(),
    );
    let local = 1 << 62;
    assert!(!p.node.handed(local, a, 8), "another node id (an old join)");
    assert!(p.node.handed(local, a, 7));
    assert!(p.node.handed(local + 1, b, 7));
    assert!(p.node.handed(local + 2, 0, 0), "not kept by the io-server");
    assert!(p.node.may_accept(local, true));
    assert!(!p.node.may_accept(local + 9, true), "recorded nowhere");
    p.node.accepted(local, true);
    p.node.accepted(local, true);
    p.node.close_handed(local + 1);
    p.node.close_handed(local + 2);
    assert_eq!(
        next(&mut p.server_rx).await,
        EndpointEvent::Accepted { conn: a }
    );
    assert_eq!(
        next(&mut p.server_rx).await,
        EndpointEvent::ConnectionClosed { conn: b, errno: 0 }
    );
    // The node's channel ends: what the io-server keeps is its own.
    assert!(p.node.handed(local + 3, c, 7));
    p.node.handle().with(|ch| ch.close("rejoining"));
    assert!(!p.node.may_accept(local + 3, true));
    assert!(!p.node.may_accept(2, false), "nor a relayed one");
    assert!(!p.node.may_accept(local + 2, true), "closed already");
    assert!(!p.node.handed(local + 4, c + 2, 7));
}

/// Handed-over accepts are coalesced: the first goes at once, those
/// right after it wait for the window's end (`driver::COALESCE`) and
/// go together; none is lost.
#[tokio::test]
async fn handed_accepts_go_at_once_then_together() {
    let mut p = pair().await;
    let ids: Vec<ConnId> = (0..3)
        .map(|_| p.server.hand_connection().unwrap())
        .collect();
    for (i, &c) in ids.iter().enumerate() {
        assert!(p.node.handed(100 + i as u64, c, 7));
    }
    p.node.accepted(100, true);
    assert_eq!(
        next(&mut p.server_rx).await,
        EndpointEvent::Accepted { conn: ids[0] }
    );
    let start = std::time::Instant::now();
    p.node.accepted(101, true);
    p.node.accepted(102, true);
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let pending = p.node.handle().with(|ch| ch.pending_transmit());
    // (Only when this thread was not held up past the window.)
    if start.elapsed() < crate::driver::COALESCE / 2 {
        assert!(pending > 0, "held for the window");
    }
    for &c in &ids[1..] {
        assert_eq!(
            next(&mut p.server_rx).await,
            EndpointEvent::Accepted { conn: c }
        );
    }
}

/// Issue 24: Weight frames are merged: however many a node sends, its
/// io-server has one event to handle and the latest weight to take.
#[tokio::test]
async fn many_weight_frames_cost_one_pending_update() {
    let mut p = pair().await;
    for w in 0..10_000u32 {
        p.node.handle().with(|ch| ch.set_weight(w % 200 + 1));
    }
    // A request after them: routed once every Weight before it was.
    let listen = ask_listen(&p);
    assert_eq!(next(&mut p.server_rx).await, EndpointEvent::WeightChanged);
    assert!(matches!(
        next(&mut p.server_rx).await,
        EndpointEvent::Request { .. }
    ));
    assert_eq!(
        p.server.take_weight(),
        Some(200),
        "the last: 9999 % 200 + 1"
    );
    assert_eq!(p.server.take_weight(), None, "taken");
    p.node.handle().with(|ch| ch.set_weight(3));
    assert_eq!(next(&mut p.server_rx).await, EndpointEvent::WeightChanged);
    assert_eq!(p.server.take_weight(), Some(3));
    listen.abort();
}

/// Issue 24: a request a live channel does not answer fails after the
/// request timeout, the channel stays open, and the late answer is
/// dropped (not given to the next request).
#[tokio::test]
async fn an_unanswered_request_times_out_and_the_channel_stays() {
    let mut p = pair().await;
    p.node.set_request_timeout(Some(Duration::from_millis(200)));
    let first = ask_listen(&p);
    let EndpointEvent::Request { req: late, .. } = next(&mut p.server_rx).await else {
        panic!("the request")
    };
    let r = timeout(LIMIT, first).await.unwrap().unwrap();
    assert!(matches!(r, Err(EndpointError::TimedOut(_))), "{r:?}");
    assert!(p.node.is_open());
    p.server.respond(
        late,
        Response::Status {
            errno: 99,
            addr: None,
        },
    );
    let second = ask_listen(&p);
    let EndpointEvent::Request { req, .. } = next(&mut p.server_rx).await else {
        panic!("the request")
    };
    p.server.respond(
        req,
        Response::Status {
            errno: 0,
            addr: None,
        },
    );
    let r = timeout(LIMIT, second).await.unwrap().unwrap().unwrap();
    assert_eq!(r.errno(), 0, "its own answer");
}

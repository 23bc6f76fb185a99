//! Driver helpers shared by `transports.rs` and the benchmark: a connected
//! transport pair of each kind (in-memory, `unix:`, `tcp://`), both channel
//! ends running on the async driver, the handshake, and a sender that
//! respects credit by waiting for `buffer_available`.

use saps_fabric::driver::{self, FabricHandle};
use saps_fabric::transport::{self, FabricUrl, StreamListener, StreamReader, StreamWriter};
use saps_fabric::{Channel, ChannelConfig, ConnId, Event};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// How long any single step may take before a test gives up.
pub const STEP: Duration = Duration::from_secs(20);

/// The transports under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Unix,
    Tcp,
}

pub type Halves = (StreamReader, StreamWriter);

/// A listening stream fabric: `unix:` in a fresh temporary directory (kept
/// alive by the returned guard) or `tcp://127.0.0.1:0`.
pub async fn listen(kind: Kind) -> (StreamListener, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = match kind {
        Kind::Unix => FabricUrl::Unix(dir.path().join("fabric.sock")),
        Kind::Tcp => "tcp://127.0.0.1:0".parse().expect("a valid URL"),
        Kind::Memory => panic!("the in-memory transport has no listener"),
    };
    let listener = StreamListener::bind(&url).await.expect("bind the fabric");
    (listener, dir)
}

/// Both ends of one fabric connection of `kind`: `(node, io-server)`.
pub async fn link(kind: Kind) -> (Halves, Halves) {
    if kind == Kind::Memory {
        return transport::memory_pair();
    }
    let (listener, _dir) = listen(kind).await;
    let url = listener.local_url().expect("the bound URL");
    let (node, accepted) = tokio::join!(transport::connect_stream(&url), listener.accept());
    (node.expect("connect"), accepted.expect("accept").0)
}

/// One channel end running on the driver.
pub struct End {
    pub handle: FabricHandle,
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl End {
    pub fn spawn(channel: Channel, (reader, writer): Halves) -> Self {
        let (handle, events) = driver::spawn(channel, reader, writer);
        Self { handle, events }
    }

    /// The next event, within [`STEP`].
    pub async fn next(&mut self) -> Event {
        tokio::time::timeout(STEP, self.events.recv())
            .await
            .expect("an event within the deadline")
            .expect("the driver is running")
    }
}

/// Spawns a node (token `node_token`) and an io-server (`srv_token`) over
/// `link` and runs the handshake. Returns both ends and the first event each
/// raised: `Welcome`/`NodeAuthenticated` on success, `Closed` on refusal.
pub async fn handshake(
    (node_side, srv_side): (Halves, Halves),
    node_token: &str,
    srv_token: &str,
) -> ((End, Event), (End, Event)) {
    let mut node = End::spawn(
        Channel::node(ChannelConfig::new(node_token).node("node-1", 1)),
        node_side,
    );
    let mut srv = End::spawn(Channel::io_server(ChannelConfig::new(srv_token)), srv_side);
    let srv_first = srv.next().await;
    if matches!(srv_first, Event::NodeAuthenticated { .. }) {
        srv.handle.with(|ch| ch.welcome(1));
    }
    let node_first = node.next().await;
    ((node, node_first), (srv, srv_first))
}

/// An authenticated `(node, io-server)` pair over a fresh link of `kind`.
pub async fn open(kind: Kind) -> (End, End) {
    let ((node, welcome), (srv, authenticated)) =
        handshake(link(kind).await, "secret", "secret").await;
    assert_eq!(welcome, Event::Welcome { node_id: 1 });
    assert!(matches!(authenticated, Event::NodeAuthenticated { .. }));
    (node, srv)
}

/// The io-server hands the node a client connection; returns its id.
pub async fn accept(node: &mut End, srv: &End) -> ConnId {
    let peer = "192.0.2.1:40000".parse().unwrap();
    let local = "192.0.2.9:80".parse().unwrap();
    let conn = srv
        .handle
        .with(|ch| ch.accept_connection(2, peer, local))
        .expect("the channel is open");
    match node.next().await {
        Event::ConnectionAccepted { conn: c, .. } => assert_eq!(c, conn),
        other => panic!("expected ConnectionAccepted, got {other:?}"),
    }
    conn
}

/// Wakes the sender of each connection on its `buffer_available`.
pub fn wake_senders(
    mut events: mpsc::UnboundedReceiver<Event>,
    senders: Vec<(ConnId, Arc<Notify>)>,
) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let Event::BufferAvailable { conn } = e {
                if let Some((_, ready)) = senders.iter().find(|(c, _)| *c == conn) {
                    ready.notify_one();
                }
            }
        }
    });
}

/// Largest single `send_message` of [`send_pattern`].
pub const MAX_CHUNK: usize = 256 * 1024;

/// The test stream: byte `i` is `i % 251`, so a lost, duplicated or
/// reordered byte changes what the receiver sees.
static PATTERN: LazyLock<Vec<u8>> =
    LazyLock::new(|| (0..251 + MAX_CHUNK).map(|i| (i % 251) as u8).collect());

/// The `len` stream bytes at `offset` (`len <= MAX_CHUNK`).
pub fn pattern(offset: u64, len: usize) -> &'static [u8] {
    &PATTERN[(offset % 251) as usize..][..len]
}

/// Sends `total` pattern bytes on `conn` in calls of `chunk` bytes, waiting
/// on `ready` whenever the credit runs out; stops early at `until`.
/// Returns the bytes queued.
pub async fn send_pattern(
    handle: &FabricHandle,
    conn: ConnId,
    ready: &Notify,
    chunk: usize,
    total: u64,
    until: Instant,
) -> u64 {
    let mut sent = 0;
    while sent < total && Instant::now() < until {
        let len = chunk.min((total - sent) as usize);
        let n = handle
            .with(|ch| ch.send_message(conn, pattern(sent, len)))
            .expect("the connection is open");
        if n == 0 {
            // A permit stored by a wake-up that raced this call is kept.
            let _ = tokio::time::timeout_at(until, ready.notified()).await;
        }
        sent += n as u64;
    }
    sent
}

//! Tests of freezing a running endpoint: an io-server endpoint relaying
//! TCP clients to a node endpoint over a unix socket pair is frozen in
//! the middle of its streams, then either resumed from a capture on
//! duplicated descriptors (the old one disowned) or unfrozen; every
//! octet arrives, in order, both ways.

use crate::channel::DEFAULT_WINDOW;
use crate::driver::Phase;
use crate::endpoint::router::Route;
use crate::endpoint::tests::{accept, addr, next, pair_over, Pair, LIMIT};
use crate::endpoint::{
    Capture, ClientRelayEnd, Endpoint, EndpointEvent, HeldEvent, RelayOutcome, Replay, ResumeError,
    StartSnap,
};
use crate::frame::ConnId;
use crate::transport::unix_socket;
use crate::ChannelConfig;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// A bulk direction: large enough for many windows and spliced reads.
const LEN: usize = 4 << 20;
/// A direction that ends before the freeze.
const SMALL: usize = 100_000;

/// Seeded pseudo-random octets (xorshift64*): the same for the same seed.
fn octets(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Compares octet by octet, naming the first that differs.
fn check(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: octet {i} differs");
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

/// How far a reader is: octets read, and whether it saw the end.
type Progress = watch::Sender<(usize, bool)>;

/// Bounded wait for `rx` to satisfy `f`.
async fn until_progress(
    what: &str,
    rx: &mut watch::Receiver<(usize, bool)>,
    f: impl FnMut(&(usize, bool)) -> bool,
) {
    timeout(LIMIT, rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("{what}: not in time"))
        .expect("the reader runs");
}

/// Polls `cond` until it holds, within [`LIMIT`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Reads `r` to its end, publishing progress; returns what it read.
async fn read_all(mut r: impl tokio::io::AsyncRead + Unpin, progress: Progress) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            progress.send_replace((got.len(), true));
            return got;
        }
        got.extend_from_slice(&buf[..n]);
        progress.send_replace((got.len(), false));
    }
}

/// Writes `data` to `w`, then shuts its write side down; with a `gate`,
/// the second half waits for it.
async fn write_all(
    mut w: impl tokio::io::AsyncWrite + Unpin,
    data: &[u8],
    gate: Option<watch::Receiver<bool>>,
) {
    let half = match gate {
        Some(_) => data.len() / 2,
        None => data.len(),
    };
    w.write_all(&data[..half]).await.expect("write");
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
        w.write_all(&data[half..]).await.expect("write");
    }
    w.shutdown().await.expect("shutdown");
}

/// One relayed connection: a TCP client at the io-server, a program's
/// unix socket at the node.
struct Conn {
    conn: ConnId,
    up: usize,
    down: usize,
    client_read: watch::Receiver<(usize, bool)>,
    app_read: watch::Receiver<(usize, bool)>,
    /// The client's and the program's ends, done.
    ends: JoinHandle<()>,
    server_relay: JoinHandle<RelayOutcome>,
    node_relay: JoinHandle<RelayOutcome>,
}

impl Conn {
    /// Waits for both ends and both relays, and checks every octet.
    async fn finished(self) {
        joined(self.ends).await;
        let server = joined(self.server_relay).await;
        let node = joined(self.node_relay).await;
        outcomes(self.conn, self.up, self.down, server, node);
    }
}

/// Relays one client connection carrying `up` octets to the program and
/// `down` back (seeded by `seed`); the writer of a bulk direction waits
/// for `gate` halfway.
async fn connect(
    p: &mut Pair,
    listener: &TcpListener,
    seed: u64,
    up: usize,
    down: usize,
    gate: &watch::Sender<bool>,
) -> Conn {
    let conn = accept(p).await;
    let (client, accepted) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let client = client.unwrap();
    let server_side = Arc::new(accepted.unwrap().0);
    let (app, app_side) = UnixStream::pair().unwrap();
    let s = p.server.clone();
    let server_relay = tokio::spawn(async move { s.relay_tcp(conn, server_side).await });
    let n = p.node.clone();
    let node_relay = tokio::spawn(async move { n.relay_unix(conn, app_side).await });
    let (client_progress, client_read) = watch::channel((0, false));
    let (app_progress, app_read) = watch::channel((0, false));
    let up_gate = (up == LEN).then(|| gate.subscribe());
    let down_gate = (down == LEN).then(|| gate.subscribe());
    let ends = tokio::spawn(async move {
        let (up_data, down_data) = (octets(seed, up), octets(seed + 1000, down));
        let (cr, cw) = client.into_split();
        let (ar, aw) = app.into_split();
        let client = async {
            let (got, ()) = tokio::join!(
                read_all(cr, client_progress),
                write_all(cw, &up_data, up_gate)
            );
            check(
                &format!("connection {seed}, to the client"),
                &got,
                &down_data,
            );
        };
        let app = async {
            let (got, ()) = tokio::join!(
                read_all(ar, app_progress),
                write_all(aw, &down_data, down_gate)
            );
            check(
                &format!("connection {seed}, to the program"),
                &got,
                &up_data,
            );
        };
        tokio::join!(client, app);
    });
    Conn {
        conn,
        up,
        down,
        client_read,
        app_read,
        ends,
        server_relay,
        node_relay,
    }
}

/// An io-server endpoint and a node endpoint over a unix socket pair,
/// with the io-server's channel pipe made (so that it is captured).
async fn socket_pair() -> Pair {
    let (a, b) = UnixStream::pair().unwrap();
    let p = pair_over((unix_socket(a), unix_socket(b)), DEFAULT_WINDOW).await;
    assert!(
        p.server.handle().pipe().is_some(),
        "a socket fabric has a pipe"
    );
    p
}

/// Four connections: 0 half-closed by the client, 1 half-closed by the
/// program, 2 and 3 bulk both ways; each bulk direction has delivered
/// its first half and waits at `gate` to send the rest.
async fn four_connections_halfway(
    p: &mut Pair,
    listener: &TcpListener,
    gate: &watch::Sender<bool>,
) -> Vec<Conn> {
    let plans = [(SMALL, LEN), (LEN, SMALL), (LEN, LEN), (LEN, LEN)];
    let mut conns = Vec::new();
    for (i, &(up, down)) in plans.iter().enumerate() {
        conns.push(connect(p, listener, i as u64, up, down, gate).await);
    }
    for c in &mut conns {
        let id = c.conn;
        match (c.up, c.down) {
            (SMALL, _) => {
                until_progress("the client's end of file", &mut c.app_read, |r| r.1).await;
            }
            (_, SMALL) => {
                until_progress("the program's end of file", &mut c.client_read, |r| r.1).await;
            }
            _ => {}
        }
        if c.up == LEN {
            until_progress(&format!("{id}: half up"), &mut c.app_read, |r| {
                r.0 == LEN / 2
            })
            .await;
        }
        if c.down == LEN {
            until_progress(&format!("{id}: half down"), &mut c.client_read, |r| {
                r.0 == LEN / 2
            })
            .await;
        }
    }
    conns
}

/// Pauses the node's driver (it stops reading the fabric), lets every
/// bulk writer send its second half, and freezes the io-server's
/// endpoint once its output is queued behind its writer, which is stuck
/// inside a write; then lets the node read on: the freeze waits for that
/// write and for the relays, and leaves the rest of the output (spliced
/// payloads in the pipe among it) and whatever input came meanwhile
/// where they are.
async fn freeze_with_output_queued(p: &Pair, gate: &watch::Sender<bool>) {
    p.node.handle().set_phase(Phase::Frozen);
    timeout(LIMIT, p.node.handle().at_rest())
        .await
        .expect("the node's tasks pause");
    gate.send_replace(true);
    until("output queued at the io-server", || {
        p.server.handle().with(|ch| ch.pending_transmit()) > 1 << 20
    })
    .await;
    let s = p.server.clone();
    let freezing = tokio::spawn(async move { s.freeze(LIMIT).await });
    until("the io-server's tasks told to pause", || {
        p.server.handle().phase() == Phase::Frozen
    })
    .await;
    p.node.handle().set_phase(Phase::Running);
    timeout(LIMIT, freezing)
        .await
        .expect("frozen in time")
        .unwrap()
        .expect("frozen");
}

/// What the relays of connection `conn` said at their end: everything
/// moved (`up` octets to the program, `down` back), cleanly.
fn outcomes(conn: ConnId, up: usize, down: usize, server: RelayOutcome, node: RelayOutcome) {
    let all = |bytes_in: usize, bytes_out: usize| RelayOutcome {
        bytes_in: bytes_in as u64,
        bytes_out: bytes_out as u64,
        errno: 0,
    };
    assert_eq!(server, all(up, down), "{conn}: the io-server's relay");
    assert_eq!(node, all(down, up), "{conn}: the node's relay");
}

async fn joined<T>(h: JoinHandle<T>) -> T {
    timeout(LIMIT, h).await.expect("in time").expect("no panic")
}

/// The capture of the frozen io-server: a relay per connection, each
/// with its socket and its half-close as it was, in the middle of its
/// streams; the transport and the pipe among the descriptors, the pipe
/// holding spliced payloads of the output queued behind the writer.
fn check_capture(p: &Pair, cap: &Capture, conns: &[Conn]) {
    let pending = p.server.handle().with(|ch| ch.pending_transmit());
    assert!(pending > 0, "output left for the writer");
    let r = &cap.router;
    assert_eq!(r.relays.len(), conns.len());
    assert!(r.held.is_empty() && r.starts.is_empty());
    let pipe = r.pipe.expect("the channel's pipe is captured");
    assert!(pipe.held > 0, "spliced payloads in the pipe");
    let mut named = vec![r.transport, pipe.read, pipe.write];
    named.extend(r.relays.iter().map(|s| s.socket));
    named.sort_unstable();
    assert_eq!(
        named,
        (0..cap.fds.len()).collect::<Vec<_>>(),
        "each descriptor named once"
    );
    for c in conns {
        let s = r
            .relays
            .iter()
            .find(|s| s.conn == c.conn)
            .expect("its relay");
        assert_eq!(
            s.fin_sent,
            c.up == SMALL,
            "{}: the client's FIN went",
            c.conn
        );
        assert_eq!(
            s.fin_written,
            c.down == SMALL,
            "{}: the program's FIN went",
            c.conn
        );
        if c.up == LEN {
            assert!(
                s.bytes_in > 0 && s.bytes_in < LEN as u64,
                "{}: up in mid-stream",
                c.conn
            );
        }
        if c.down == LEN {
            assert!(
                s.bytes_out > 0 && s.bytes_out < LEN as u64,
                "{}: down in mid-stream",
                c.conn
            );
        }
    }
}

/// Four connections halfway ([`four_connections_halfway`]), the
/// io-server's endpoint frozen with its output queued
/// ([`freeze_with_output_queued`]) and captured, the capture checked.
pub(super) struct Halfway {
    p: Pair,
    listener: TcpListener,
    gate: watch::Sender<bool>,
    conns: Vec<Conn>,
    pub(super) cap: Capture,
}

pub(super) async fn frozen_halfway() -> Halfway {
    let mut p = socket_pair().await;
    let listener = TcpListener::bind(addr(0)).await.unwrap();
    let gate = watch::Sender::new(false);
    let conns = four_connections_halfway(&mut p, &listener, &gate).await;
    freeze_with_output_queued(&p, &gate).await;
    let cap = p.server.capture().expect("captured");
    check_capture(&p, &cap, &conns);
    Halfway {
        p,
        listener,
        gate,
        conns,
        cap,
    }
}

/// The proof of the design's step 4: the io-server's endpoint is frozen
/// in the middle of four relayed connections (two half-closed, two bulk
/// both ways, output queued and a program not reading), captured; every
/// descriptor is duplicated, a second endpoint is resumed from the
/// copies and the first disowned. Every octet arrives on both sides in
/// order, the half-closed connections stay so, the relays' counts go on
/// from where they were, and a connection opened afterwards works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_endpoint_resumed_from_duplicated_descriptors_loses_no_octet() {
    let Halfway {
        mut p,
        listener,
        gate,
        conns,
        cap,
    } = frozen_halfway().await;
    // As if sent to another process: a copy of each descriptor, the
    // capture's own closed.
    let Capture {
        channel,
        router,
        fds,
    } = cap;
    let copies: Vec<OwnedFd> = fds.iter().map(|fd| fd.try_clone().unwrap()).collect();
    drop(fds);
    let cap = Capture {
        channel,
        router,
        fds: copies,
    };
    let resumed = Endpoint::resume(ChannelConfig::new("t"), cap, |fd| {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        Ok(unix_socket(UnixStream::from_std(s)?))
    })
    .expect("resumed");
    let new = resumed.endpoint;
    let mut server_relays = Vec::new();
    for (conn, fd) in resumed.relays {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true).unwrap();
        let s = Arc::new(TcpStream::from_std(s).unwrap());
        let ep = new.clone();
        server_relays.push((
            conn,
            tokio::spawn(async move { ep.relay_tcp(conn, s).await }),
        ));
    }
    new.unfreeze();
    let old = std::mem::replace(&mut p.server, new);
    p.server_rx = resumed.events;
    old.disown();

    for c in conns {
        joined(c.ends).await;
        let at = server_relays
            .iter()
            .position(|(id, _)| *id == c.conn)
            .unwrap();
        let server = joined(server_relays.swap_remove(at).1).await;
        let node = joined(c.node_relay).await;
        outcomes(c.conn, c.up, c.down, server, node);
        // The old relay is parked for good, its channel frozen.
        assert!(!c.server_relay.is_finished());
    }

    let late = connect(&mut p, &listener, 7, SMALL, SMALL, &gate).await;
    late.finished().await;
}

/// Going back: the same freeze, a capture made and dropped, then
/// unfreeze; then, while the rest flows, freeze, capture and unfreeze
/// again and again (cuts between and inside frames, each checked by the
/// capture). The relays that were running go on, and every octet
/// arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_endpoint_unfrozen_loses_no_octet() {
    let Halfway {
        p,
        listener: _listener,
        gate: _gate,
        conns,
        cap,
    } = frozen_halfway().await;
    drop(cap);
    p.server.unfreeze();
    // Frozen, captured and unfrozen again and again while the rest
    // flows: wherever the cut falls, the capture's checks hold and
    // nothing is lost. A freeze is at once (nothing is drained), so the
    // next one waits for the streams to move: else the loop would keep
    // them frozen.
    let moved = || {
        conns
            .iter()
            .map(|c| c.client_read.borrow().0 + c.app_read.borrow().0)
            .sum::<usize>()
    };
    let finished = || conns.iter().all(|c| c.ends.is_finished());
    let cycles = async {
        let mut cycles = 0;
        while !finished() {
            p.server.freeze(LIMIT).await.expect("frozen again");
            drop(p.server.capture().expect("captured again"));
            p.server.unfreeze();
            cycles += 1;
            let before = moved();
            until("the streams move between two freezes", || {
                moved() > before || finished()
            })
            .await;
        }
        cycles
    };
    let cycles = timeout(LIMIT, cycles)
        .await
        .expect("the streams end in time");
    assert!(cycles > 0);
    for c in conns {
        c.finished().await;
    }
}

/// The bound of a freeze that waits for no peer: its tasks only have to
/// be scheduled.
const AT_ONCE: Duration = Duration::from_millis(200);

/// Octets the relay of `conn` had not written to its stream, in `cap`.
fn pending_octets(cap: &Capture, conn: ConnId) -> usize {
    let relay = cap.router.relays.iter().find(|r| r.conn == conn);
    let relay = relay.expect("its relay");
    relay
        .pending
        .iter()
        .map(|e| match e {
            HeldEvent::Data(b) => b.len(),
            _ => 0,
        })
        .sum()
}

/// Spliced payloads that wait in `ep`'s relay of `conn` for its stream,
/// and whether that relay copies every payload (it got no receive pipe).
fn spliced_waiting(ep: &Endpoint, conn: ConnId) -> (usize, bool) {
    let (inbox, copies) = {
        let router = ep.router();
        match router.conns.get(&conn) {
            Some(Route::Relayed(a, _)) => (
                a.inbound.0.clone(),
                matches!(a.receive, crate::endpoint::router::Receive::Copy),
            ),
            _ => return (0, false),
        }
    };
    let n = inbox
        .lock()
        .events
        .iter()
        .filter(|e| matches!(e, crate::endpoint::router::ConnEvent::Spliced(..)))
        .count();
    (n, copies)
}

/// A client with small socket buffers that does not read, relayed by
/// `p`: what the program sends it soon waits in the io-server.
async fn a_client_that_does_not_read(
    p: &mut Pair,
    listener: &TcpListener,
) -> (ConnId, TcpStream, JoinHandle<RelayOutcome>) {
    let conn = accept(p).await;
    let (client, server_side) = client(listener).await;
    socket2::SockRef::from(&client)
        .set_recv_buffer_size(16 << 10)
        .unwrap();
    socket2::SockRef::from(&*server_side)
        .set_send_buffer_size(16 << 10)
        .unwrap();
    let s = p.server.clone();
    let server_relay = tokio::spawn(async move { s.relay_tcp(conn, server_side).await });
    (conn, client, server_relay)
}

/// Capture instead of drain (design §2): a client that does not read
/// holds its relay's writes up, not the freeze. The io-server's endpoint
/// is frozen at once with most of 4 MiB from the program waiting for the
/// client, captured (what the relay had not written is in its
/// `pending`), resumed from duplicated descriptors and the old one
/// disowned; then the client reads: every octet, in order, and what it
/// sends after goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_does_not_hold_a_freeze_up() {
    let mut p = socket_pair().await;
    let listener = TcpListener::bind(addr(0)).await.unwrap();
    let (conn, mut client, server_relay) = a_client_that_does_not_read(&mut p, &listener).await;
    let (app, app_side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    let node_relay = tokio::spawn(async move { n.relay_unix(conn, app_side).await });
    let (down, up) = (octets(11, LEN), octets(12, SMALL));
    let (mut ar, aw) = app.into_split();
    let reply = down.clone();
    let writer = tokio::spawn(async move { write_all(aw, &reply, None).await });
    until("the io-server's relay stuck on its client", || {
        p.server.handle().with(|ch| ch.buffered(conn)) >= u64::from(DEFAULT_WINDOW / 4)
    })
    .await;

    let start = tokio::time::Instant::now();
    p.server.freeze(AT_ONCE).await.expect("frozen at once");
    let cap = p.server.capture().expect("captured");
    assert!(start.elapsed() < AT_ONCE, "{:?}", start.elapsed());
    let pending = pending_octets(&cap, conn);
    assert!(
        pending as u64 >= u64::from(DEFAULT_WINDOW / 4),
        "what the client has not read is captured ({pending} octets)"
    );
    let mut relays = [(conn, server_relay)];
    assert_eq!(resume_server(&mut p, cap, &mut relays).await, 1);
    let [(_, server_relay)] = relays;

    let (cr, cw) = client.split();
    let (got, ()) = timeout(LIMIT, async {
        tokio::join!(
            read_all(cr, watch::Sender::new((0, false))),
            write_all(cw, &up, None)
        )
    })
    .await
    .expect("in time");
    check("to the client", &got, &down);
    let mut to_app = Vec::new();
    timeout(LIMIT, ar.read_to_end(&mut to_app))
        .await
        .expect("in time")
        .unwrap();
    check("to the program", &to_app, &up);
    joined(writer).await;
    let (server, node) = (joined(server_relay).await, joined(node_relay).await);
    outcomes(conn, SMALL, LEN, server, node);
}

/// A node that does not read the fabric holds the io-server's writer in
/// the middle of its output, not the freeze: the writer stops inside its
/// write and gives the rest back to the channel. Frozen at once,
/// captured, resumed from duplicated descriptors, the old one disowned;
/// then the node reads on: every octet of two bulk clients arrives, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_read_does_not_hold_a_freeze_up() {
    let mut p = socket_pair().await;
    let listener = TcpListener::bind(addr(0)).await.unwrap();
    let open = watch::Sender::new(true);
    let mut conns = Vec::new();
    for seed in 40..42 {
        conns.push(connect(&mut p, &listener, seed, LEN, SMALL, &open).await);
    }
    // The node's tasks paused: it reads nothing more from the fabric.
    p.node.handle().set_phase(Phase::Frozen);
    timeout(LIMIT, p.node.handle().at_rest())
        .await
        .expect("the node's tasks pause");
    until("output queued at the io-server", || {
        p.server.handle().with(|ch| ch.pending_transmit()) > 1 << 20
    })
    .await;

    let start = tokio::time::Instant::now();
    p.server.freeze(AT_ONCE).await.expect("frozen at once");
    let cap = p.server.capture().expect("captured");
    assert!(start.elapsed() < AT_ONCE, "{:?}", start.elapsed());
    assert!(
        p.server.handle().with(|ch| ch.pending_transmit()) > 1 << 20,
        "the output is captured, not written"
    );
    let mut relays = Vec::new();
    let mut rest = Vec::new();
    for c in conns {
        relays.push((c.conn, c.server_relay));
        rest.push((c.conn, c.ends, c.node_relay));
    }
    assert_eq!(resume_server(&mut p, cap, &mut relays).await, 2);
    p.node.handle().set_phase(Phase::Running);
    for (conn, ends, node_relay) in rest {
        joined(ends).await;
        let at = relays.iter().position(|(c, _)| *c == conn).unwrap();
        let server = joined(relays.swap_remove(at).1).await;
        outcomes(conn, LEN, SMALL, server, joined(node_relay).await);
    }
}

/// Splice mode: a node's relay into a program's unix socket splices large
/// payloads through a receive pipe. The program does not read: the
/// node's endpoint freezes at once all the same; its capture reads the
/// spliced payloads out of the pipe into the relay's `pending`, and the
/// node resumed from duplicated descriptors (the old one disowned)
/// writes them first: the program reads every octet, in order, and its
/// answer reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_does_not_read_does_not_hold_a_node_freeze_up() {
    let mut p = socket_pair().await;
    let listener = TcpListener::bind(addr(0)).await.unwrap();
    let conn = accept(&mut p).await;
    let (client, server_side) = client(&listener).await;
    let s = p.server.clone();
    let server_relay = tokio::spawn(async move { s.relay_tcp(conn, server_side).await });
    let (mut app, app_side) = UnixStream::pair().unwrap();
    socket2::SockRef::from(&app)
        .set_recv_buffer_size(16 << 10)
        .unwrap();
    socket2::SockRef::from(&app_side)
        .set_send_buffer_size(16 << 10)
        .unwrap();
    let n = p.node.clone();
    let node_relay = tokio::spawn(async move { n.relay_unix(conn, app_side).await });
    let (up, down) = (octets(14, LEN), octets(15, SMALL));
    let (mut cr, cw) = client.into_split();
    let request = up.clone();
    let writer = tokio::spawn(async move { write_all(cw, &request, None).await });
    // Bulk reads, spliced both ways, until the program stops reading
    // halfway.
    read_exactly("the first half", &mut app, &up[..LEN / 2]).await;
    until("the node's relay stuck on its program", || {
        p.node.handle().with(|ch| ch.buffered(conn)) >= u64::from(DEFAULT_WINDOW / 4)
    })
    .await;
    let (spliced, copies) = spliced_waiting(&p.node, conn);
    assert!(
        spliced > 0 || copies,
        "spliced payloads wait in the receive pipe (or there was none to be had)"
    );

    let start = tokio::time::Instant::now();
    p.node.freeze(AT_ONCE).await.expect("frozen at once");
    let cap = p.node.capture().expect("captured");
    assert!(start.elapsed() < AT_ONCE, "{:?}", start.elapsed());
    assert!(pending_octets(&cap, conn) as u64 >= u64::from(DEFAULT_WINDOW / 4));
    assert_eq!(
        spliced_waiting(&p.node, conn).0,
        0,
        "read out of the receive pipe"
    );

    let resumed = Endpoint::resume(
        ChannelConfig::new("t").node("n1", 1),
        duplicated(cap),
        unix_transport,
    )
    .expect("resumed");
    let new = resumed.endpoint;
    let [(c, fd)]: [(ConnId, OwnedFd); 1] = resumed.relays.try_into().unwrap();
    assert_eq!(c, conn);
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true).unwrap();
    let s = UnixStream::from_std(s).unwrap();
    let ep = new.clone();
    let node_relay_again = tokio::spawn(async move { ep.relay_unix(conn, s).await });
    new.unfreeze();
    let old = std::mem::replace(&mut p.node, new);
    p.node_rx = resumed.events;
    old.disown();

    read_exactly("the second half", &mut app, &up[LEN / 2..]).await;
    let mut end = [0u8; 1];
    let eof = timeout(LIMIT, app.read(&mut end)).await.expect("in time");
    assert_eq!(eof.unwrap(), 0, "the client's FIN after");
    app.write_all(&down).await.unwrap();
    app.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(LIMIT, cr.read_to_end(&mut got))
        .await
        .expect("in time")
        .unwrap();
    check("to the client", &got, &down);
    joined(writer).await;
    let server = joined(server_relay).await;
    outcomes(conn, LEN, SMALL, server, joined(node_relay_again).await);
    assert!(!node_relay.is_finished(), "the old relay stays parked");
}

/// The io-server's end of a fresh client connection: (the client, the
/// io-server's socket).
async fn client(listener: &TcpListener) -> (TcpStream, Arc<TcpStream>) {
    let (client, accepted) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    (client.unwrap(), Arc::new(accepted.unwrap().0))
}

/// The node hears of a connection announced to it.
async fn announced(p: &mut Pair, conn: ConnId) {
    match next(&mut p.node_rx).await {
        EndpointEvent::ConnectionAccepted { conn: c, .. } => assert_eq!(c, conn),
        other => panic!("expected ConnectionAccepted, got {other:?}"),
    }
}

/// Reads exactly `want.len()` octets of `r` and compares them.
async fn read_exactly(what: &str, r: &mut (impl tokio::io::AsyncRead + Unpin), want: &[u8]) {
    let mut got = vec![0; want.len()];
    timeout(LIMIT, r.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: not in time"))
        .unwrap();
    check(what, &got, want);
}

/// What the io-server keeps of connections its node has not taken yet
/// moves with the capture: events held for a connection whose relay has
/// not attached (the program's reply and FIN), a connection announced
/// with a replay and kept for re-dispatch, and a relayed one whose
/// client's request is kept until the program accepts it. After the
/// resume the held reply reaches its client, the replay its program,
/// and when the node leaves both kept connections come back whole,
/// everything their clients sent in their replays.
#[tokio::test]
async fn what_is_kept_for_a_node_moves_with_the_capture() {
    let mut p = socket_pair().await;
    let listener = TcpListener::bind(addr(0)).await.unwrap();

    // Held: the program answers before the io-server relays the client.
    let held = p
        .server
        .accept_connection(2, addr(40001), addr(80))
        .unwrap();
    announced(&mut p, held).await;
    let (mut app_held, side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    tokio::spawn(async move { n.relay_unix(held, side).await });
    app_held.write_all(b"hello").await.unwrap();
    app_held.shutdown().await.unwrap();
    until(
        "the reply and its FIN held",
        || matches!(p.server.router().conns.get(&held), Some(Route::Held(q)) if q.len() == 2),
    )
    .await;

    // Started: announced with a replay, kept, no relay yet.
    let replay = Replay {
        data: bytes::Bytes::from_static(b"replayed"),
        fin: false,
    };
    let started = p
        .server
        .accept_connection_with(2, addr(40002), addr(80), &replay, true, None)
        .unwrap();
    announced(&mut p, started).await;

    // Kept: relayed, its request forwarded and kept until an accept.
    let kept = p
        .server
        .accept_connection_with(2, addr(40003), addr(80), &Replay::default(), true, None)
        .unwrap();
    announced(&mut p, kept).await;
    let (mut kept_client, kept_side) = client(&listener).await;
    let s = p.server.clone();
    let old_relay = tokio::spawn(async move { s.relay_client(kept, kept_side).await });
    let (mut app_kept, side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    tokio::spawn(async move { n.relay_unix(kept, side).await });
    kept_client.write_all(b"GET /").await.unwrap();
    read_exactly("the request", &mut app_kept, b"GET /").await;

    p.server.freeze(LIMIT).await.expect("frozen");
    let cap = p.server.capture().expect("captured");
    let r = &cap.router;
    let reply = vec![
        HeldEvent::Data(bytes::Bytes::from_static(b"hello")),
        HeldEvent::Fin,
    ];
    assert_eq!(r.held, vec![(held, reply), (started, vec![])]);
    assert_eq!(
        r.starts,
        vec![StartSnap {
            conn: started,
            replay: replay.clone(),
            tracked: true
        }]
    );
    assert_eq!(r.relays.len(), 1);
    let relay = &r.relays[0];
    assert!(relay.tracked);
    let pre = relay.pre.as_ref().expect("the kept request");
    assert_eq!(
        (&pre.kept[..], pre.sent, pre.accepted),
        (&b"GET /"[..], 5, false)
    );

    let resumed = Endpoint::resume(ChannelConfig::new("t"), cap, |fd| {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        Ok(unix_socket(UnixStream::from_std(s)?))
    })
    .expect("resumed");
    let new = resumed.endpoint;
    assert_eq!(new.unaccepted(), 2, "both kept connections are counted");
    let [(conn, fd)]: [(ConnId, OwnedFd); 1] = resumed.relays.try_into().unwrap();
    assert_eq!(conn, kept);
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true).unwrap();
    let kept_side = Arc::new(TcpStream::from_std(s).unwrap());
    let ep = new.clone();
    let kept_relay = tokio::spawn(async move { ep.relay_client(kept, kept_side).await });
    new.unfreeze();
    let old = std::mem::replace(&mut p.server, new);
    p.server_rx = resumed.events;
    old.disown();

    // The held reply reaches its client, then the client's answer the program.
    let (mut held_client, held_side) = client(&listener).await;
    let ep = p.server.clone();
    let held_relay = tokio::spawn(async move { ep.relay_tcp(held, held_side).await });
    let mut got = Vec::new();
    timeout(LIMIT, held_client.read_to_end(&mut got))
        .await
        .expect("in time")
        .unwrap();
    check("the held reply", &got, b"hello");
    held_client.write_all(b"bye").await.unwrap();
    held_client.shutdown().await.unwrap();
    read_exactly("the answer", &mut app_held, b"bye").await;
    assert_eq!(joined(held_relay).await.errno, 0);

    // The replay goes first on the started connection.
    let (mut started_client, started_side) = client(&listener).await;
    let ep = p.server.clone();
    let started_relay = tokio::spawn(async move { ep.relay_client(started, started_side).await });
    let (mut app_started, side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    tokio::spawn(async move { n.relay_unix(started, side).await });
    started_client.write_all(b" more").await.unwrap();
    read_exactly("the replay, then more", &mut app_started, b"replayed more").await;

    // The kept request goes on being kept.
    kept_client.write_all(b" HTTP/1.0").await.unwrap();
    read_exactly("the rest of the request", &mut app_kept, b" HTTP/1.0").await;

    // The node leaves before its program accepts either.
    p.node.handle().with(|ch| ch.close("the node left"));
    for (relay, want) in [
        (kept_relay, &b"GET / HTTP/1.0"[..]),
        (started_relay, &b"replayed more"[..]),
    ] {
        match joined(relay).await {
            ClientRelayEnd::Unaccepted { replay, .. } => {
                check("given back", &replay.data, want);
                assert!(!replay.fin);
            }
            ClientRelayEnd::Finished(o) => panic!("expected the client back, got {o:?}"),
        }
    }
    assert!(!old_relay.is_finished(), "the old relay stays parked");
}

/// Freezes `p`'s io-server endpoint, moves it to a new one made from
/// duplicates of its descriptors and disowns it: the relays of its
/// connections run again on the new one, their handles replacing those
/// in `relays`. Returns once they are all attached again (a capture of
/// the new one may follow at once), with how many moved.
async fn move_server(p: &mut Pair, relays: &mut [(ConnId, JoinHandle<RelayOutcome>)]) -> usize {
    move_server_with(p, relays, |_| {}).await
}

/// [`move_server`], the new endpoint's `unfreeze` calling `midway` halfway
/// ([`Endpoint::unfreeze_with`]).
async fn move_server_with(
    p: &mut Pair,
    relays: &mut [(ConnId, JoinHandle<RelayOutcome>)],
    midway: impl FnOnce(&Endpoint),
) -> usize {
    p.server.freeze(LIMIT).await.expect("frozen");
    let cap = p.server.capture().expect("captured");
    resume_server_with(p, cap, relays, midway).await
}

/// [`move_server`] from `cap`, a capture of `p`'s frozen io-server.
async fn resume_server(
    p: &mut Pair,
    cap: Capture,
    relays: &mut [(ConnId, JoinHandle<RelayOutcome>)],
) -> usize {
    resume_server_with(p, cap, relays, |_| {}).await
}

/// [`resume_server`], with [`move_server_with`]'s `midway`.
async fn resume_server_with(
    p: &mut Pair,
    cap: Capture,
    relays: &mut [(ConnId, JoinHandle<RelayOutcome>)],
    midway: impl FnOnce(&Endpoint),
) -> usize {
    let resumed = Endpoint::resume(ChannelConfig::new("t"), duplicated(cap), unix_transport)
        .expect("resumed");
    let new = resumed.endpoint;
    let moved = resumed.relays.len();
    for (conn, fd) in resumed.relays {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true).unwrap();
        let s = Arc::new(TcpStream::from_std(s).unwrap());
        let ep = new.clone();
        let relay = tokio::spawn(async move { ep.relay_tcp(conn, s).await });
        // The old relay stays parked; its handle is dropped.
        let at = relays.iter().position(|(c, _)| *c == conn).unwrap();
        relays[at].1 = relay;
    }
    new.unfreeze_with(|| midway(&new));
    let old = std::mem::replace(&mut p.server, new);
    p.server_rx = resumed.events;
    old.disown();
    until("the relays attached again", || {
        p.server.router().resumed.is_empty()
    })
    .await;
    moved
}

/// `cap` as if sent to another process: a copy of each descriptor, the
/// capture's own closed.
fn duplicated(cap: Capture) -> Capture {
    let fds = cap.fds.iter().map(|fd| fd.try_clone().unwrap()).collect();
    Capture { fds, ..cap }
}

/// The transport of a resumed endpoint: a unix socket.
fn unix_transport(
    fd: OwnedFd,
) -> std::io::Result<(
    crate::transport::StreamReader,
    crate::transport::StreamWriter,
)> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    Ok(unix_socket(UnixStream::from_std(s)?))
}

/// An upgrade after an upgrade: the io-server's endpoint is moved ten
/// times while two bulk connections stream both ways; each move resumes
/// from the one before. Every octet arrives, in order, and the last
/// relays count everything their connections carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_moved_ten_times_while_its_streams_run_loses_no_octet() {
    let mut p = socket_pair().await;
    let listener = TcpListener::bind(addr(0)).await.unwrap();
    let open = watch::Sender::new(true);
    let mut conns = Vec::new();
    for seed in 20..22 {
        conns.push(connect(&mut p, &listener, seed, LEN, LEN, &open).await);
    }
    let mut relays = Vec::new();
    let mut rest = Vec::new();
    for c in conns {
        relays.push((c.conn, c.server_relay));
        rest.push((c.conn, c.ends, c.node_relay));
    }
    let mut moved = Vec::new();
    for _ in 0..10 {
        moved.push(move_server(&mut p, &mut relays).await);
    }
    assert_eq!(moved[0], 2, "moved in the middle of both streams");
    for (conn, ends, node_relay) in rest {
        joined(ends).await;
        let at = relays.iter().position(|(c, _)| *c == conn).unwrap();
        let server = joined(relays.swap_remove(at).1).await;
        outcomes(conn, LEN, LEN, server, joined(node_relay).await);
    }
}

/// A capture whose descriptors do not match their indices is refused:
/// the transport's index naming a pipe, a pipe's ends naming a socket,
/// a descriptor missing. The frozen endpoint, untouched, unfreezes and
/// serves a connection.
#[tokio::test]
async fn a_capture_with_mixed_up_descriptors_is_refused() {
    let mut p = socket_pair().await;
    p.server.freeze(LIMIT).await.expect("frozen");
    let resume = |cap: Capture| {
        Endpoint::resume(ChannelConfig::new("t"), cap, |fd| {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true)?;
            Ok(unix_socket(UnixStream::from_std(s)?))
        })
    };
    let mut cap = p.server.capture().expect("captured");
    let pipe = cap.router.pipe.expect("a pipe");
    cap.fds.swap(cap.router.transport, pipe.read);
    assert!(
        matches!(resume(cap), Err(ResumeError::Io(_))),
        "a socket for a pipe"
    );

    let mut cap = p.server.capture().expect("captured");
    cap.router.pipe = None;
    cap.router.transport = pipe.read;
    assert!(matches!(resume(cap), Err(ResumeError::NotAStream(i)) if i == pipe.read));

    let mut cap = p.server.capture().expect("captured");
    cap.fds.truncate(1);
    assert!(matches!(resume(cap), Err(ResumeError::Fd(i)) if i == pipe.read));

    p.server.unfreeze();
    let listener = TcpListener::bind(addr(0)).await.unwrap();
    let open = watch::Sender::new(true);
    let c = connect(&mut p, &listener, 30, SMALL, SMALL, &open).await;
    joined(c.ends).await;
    let server = joined(c.server_relay).await;
    outcomes(c.conn, SMALL, SMALL, server, joined(c.node_relay).await);
}

/// Idle relayed connections moved three times; each resumed endpoint is
/// unfrozen while its relays attach on the other worker, and the thread
/// unfreezing it stops halfway until every relay has attached (as a
/// thread preempted there): after each move every client's next octet
/// reaches its program and the answer comes back. Woken before the
/// channel opened, a relay that attached in between waited for a credit
/// that an idle connection never gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_moved_while_their_relays_attach_all_answer() {
    const IDLE: usize = 100;
    let mut p = socket_pair().await;
    let listener = TcpListener::bind(addr(0)).await.unwrap();
    let mut relays = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..IDLE {
        let conn = accept(&mut p).await;
        let (client, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let server_side = Arc::new(accepted.unwrap().0);
        let (app, app_side) = UnixStream::pair().unwrap();
        let s = p.server.clone();
        relays.push((
            conn,
            tokio::spawn(async move { s.relay_tcp(conn, server_side).await }),
        ));
        let n = p.node.clone();
        tokio::spawn(async move { n.relay_unix(conn, app_side).await });
        ends.push((conn, client.unwrap(), app));
    }
    let attached = |ep: &Endpoint| {
        let router = ep.router();
        router
            .conns
            .values()
            .filter(|r| matches!(r, Route::Relayed(..)))
            .count()
    };
    for round in 0..=3u8 {
        if round > 0 {
            let mut all = false;
            let moved = move_server_with(&mut p, &mut relays, |new| {
                let bound = std::time::Instant::now() + Duration::from_secs(10);
                while attached(new) < IDLE && std::time::Instant::now() < bound {
                    std::thread::sleep(Duration::from_millis(1));
                }
                all = attached(new) == IDLE;
            })
            .await;
            assert_eq!(moved, IDLE);
            assert!(
                all,
                "move {round}: every relay attached halfway through unfreeze"
            );
        }
        for (conn, client, app) in &mut ends {
            client.write_all(&[round]).await.unwrap();
            let mut got = [0u8; 1];
            timeout(Duration::from_secs(5), app.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| {
                    panic!("move {round}: connection {conn} did not reach its program")
                })
                .unwrap();
            assert_eq!(got, [round]);
            app.write_all(&[round]).await.unwrap();
            timeout(Duration::from_secs(5), client.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("move {round}: connection {conn} did not answer"))
                .unwrap();
            assert_eq!(got, [round]);
        }
    }
}

//! Tests of the relays: both directions, half close, stalls, splicing
//! both ways, and a client kept until its program accepts it.

use crate::endpoint::preaccept;
use crate::endpoint::tests::*;
use crate::endpoint::{ClientRelayEnd, EndpointEvent, RelayOutcome, Replay};
use crate::frame::ConnId;
use bytes::Bytes;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;
#[tokio::test]
async fn relay_copies_both_ways_with_half_close() {
    let mut p = pair().await;
    let conn = accept(&mut p).await;
    // Client <-> io-server relay over a duplex; node relay <-> app over a UnixStream pair.
    let (mut client, client_side) = tokio::io::duplex(8192);
    let (mut app, app_side) = UnixStream::pair().unwrap();
    let (s, n) = (p.server.clone(), p.node.clone());
    let server_relay = tokio::spawn(async move { s.relay(conn, client_side).await });
    let node_relay = tokio::spawn(async move { n.relay(conn, app_side).await });

    let request = pattern(1 << 20, 1);
    let reply = pattern(300_000, 2);
    let (req2, rep2) = (request.clone(), reply.clone());
    let app_task = tokio::spawn(async move {
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert!(got == req2, "app received the request intact");
        app.write_all(&rep2).await.unwrap();
        app.shutdown().await.unwrap();
    });
    let (cr, cw) = tokio::io::split(&mut client);
    let got = send_and_read_all(cw, &request, cr).await;
    assert!(got == reply, "client received the reply intact");
    timeout(LIMIT, app_task).await.unwrap().unwrap();
    let so = timeout(LIMIT, server_relay).await.unwrap().unwrap();
    let no = timeout(LIMIT, node_relay).await.unwrap().unwrap();
    assert_eq!(
        so,
        RelayOutcome {
            bytes_in: request.len() as u64,
            bytes_out: reply.len() as u64,
            errno: 0
        }
    );
    assert_eq!(
        no,
        RelayOutcome {
            bytes_in: reply.len() as u64,
            bytes_out: request.len() as u64,
            errno: 0
        }
    );
    assert_eq!(p.server.handle().with(|ch| ch.connection_count()), 0);
}

#[tokio::test]
async fn stalled_reader_does_not_stall_another_connection() {
    let mut p = pair().await;
    let stalled = accept(&mut p).await;
    let live = accept(&mut p).await;
    let mut relays = Vec::new();
    let mut clients = Vec::new();
    let mut apps = Vec::new();
    for conn in [stalled, live] {
        let (client, client_side) = tokio::io::duplex(8192);
        let (app, app_side) = UnixStream::pair().unwrap();
        let (s, n) = (p.server.clone(), p.node.clone());
        relays.push(tokio::spawn(
            async move { s.relay(conn, client_side).await },
        ));
        relays.push(tokio::spawn(async move { n.relay(conn, app_side).await }));
        clients.push(client);
        apps.push(app);
    }
    let live_app = apps.pop().unwrap();
    let _stalled_app = apps.pop().unwrap(); // never read
    let live_client = clients.pop().unwrap();
    let stalled_client = clients.pop().unwrap();
    let data = pattern(2 << 20, 3);
    stall_one_and_pass_the_other(
        &p,
        stalled,
        WINDOW,
        stalled_client,
        live_client,
        live_app,
        data,
    )
    .await;
}

/// The stalled client writes until everything between it and its
/// (never reading) app is full; the io-server then holds at least half
/// the window for it and never more than the window, while `data`
/// passes through the live connection intact.
async fn stall_one_and_pass_the_other(
    p: &Pair,
    stalled: ConnId,
    window: u32,
    mut stalled_client: impl AsyncWrite + Unpin + Send + 'static,
    mut live_client: impl AsyncWrite + Unpin,
    mut live_app: impl AsyncRead + Unpin + Send + 'static,
    data: Vec<u8>,
) {
    let flood = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while stalled_client.write_all(&chunk).await.is_ok() {}
    });
    let deadline = tokio::time::Instant::now() + LIMIT;
    while p.server.pending_bytes(stalled) < u64::from(window) / 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled conn never filled"
        );
        tokio::task::yield_now().await;
    }
    let expect = data.clone();
    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; expect.len()];
        live_app.read_exact(&mut got).await.unwrap();
        assert!(got == expect, "the live connection's octets arrive intact");
    });
    timeout(LIMIT, live_client.write_all(&data))
        .await
        .unwrap()
        .unwrap();
    timeout(LIMIT, reader).await.unwrap().unwrap();
    assert!(p.server.pending_bytes(stalled) <= u64::from(window));
    assert!(
        !flood.is_finished(),
        "the stalled client is blocked, not failed"
    );
    flood.abort();
}

#[tokio::test]
async fn relay_tcp_shares_the_socket_with_its_owner_and_half_closes() {
    let mut p = pair().await;
    let conn = accept(&mut p).await;
    let listener = tokio::net::TcpListener::bind(addr(0)).await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let server_side = Arc::new(listener.accept().await.unwrap().0);
    let owner = server_side.clone();
    let (mut app, app_side) = UnixStream::pair().unwrap();
    let (s, n) = (p.server.clone(), p.node.clone());
    let server_relay = tokio::spawn(async move { s.relay_tcp(conn, server_side).await });
    let node_relay = tokio::spawn(async move { n.relay(conn, app_side).await });
    // The owner sets an option on the socket while it is relayed.
    owner.set_nodelay(true).unwrap();
    assert!(owner.nodelay().unwrap());
    let request = pattern(200_000, 4);
    let (mut cr, cw) = client.split();
    let got = send_and_read_all(cw, &request, &mut app).await;
    assert!(got == request, "the app received the client's bytes intact");
    app.write_all(b"bye").await.unwrap();
    app.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(LIMIT, cr.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"bye", "the app's FIN reached the client as EOF");
    let so = timeout(LIMIT, server_relay).await.unwrap().unwrap();
    timeout(LIMIT, node_relay).await.unwrap().unwrap();
    assert_eq!((so.bytes_in, so.bytes_out, so.errno), (200_000, 3, 0));
    assert_eq!(
        Arc::strong_count(&owner),
        1,
        "the relay let go of the socket"
    );
}

/// Octets whose value depends on their position well past 256, so
/// that two frames swapped in order would not compare equal.
fn unique_pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A pair over a unix socket, a transport that splices both ways, with
/// the default window (reads of full Data frames, which splice).
async fn socket_pair() -> Pair {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    pair_over(
        (
            crate::transport::unix_socket(a),
            crate::transport::unix_socket(b),
        ),
        crate::channel::DEFAULT_WINDOW,
    )
    .await
}

#[tokio::test]
async fn bulk_streams_are_spliced_into_a_socket_fabric_intact_both_ways() {
    let mut p = socket_pair().await;
    assert!(
        p.server.handle().pipe().is_some(),
        "the socket fabric has a pipe"
    );
    let listener = tokio::net::TcpListener::bind(addr(0)).await.unwrap();
    // Four bulk clients at once, their frames interleaved on the
    // channel: spliced payloads among copied ones (each stream's first
    // read is copied, and any read that finds the pipe short of room).
    const CLIENTS: u32 = 4;
    const LEN: usize = 6 << 20;
    let mut streams = Vec::new();
    for i in 0..CLIENTS {
        let conn = accept(&mut p).await;
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let server_side = Arc::new(listener.accept().await.unwrap().0);
        let (app, app_side) = UnixStream::pair().unwrap();
        let (s, n) = (p.server.clone(), p.node.clone());
        let relays = tokio::spawn(async move {
            let (so, no) =
                tokio::join!(s.relay_tcp(conn, server_side), n.relay_unix(conn, app_side));
            (so, no)
        });
        streams.push((i, client, app, relays));
    }
    let checks = streams
        .into_iter()
        .map(|(i, mut client, mut app, relays)| async move {
            let data = unique_pattern(LEN, i);
            let (cr, cw) = client.split();
            let got = send_and_read_all(cw, &data, &mut app).await;
            assert!(
                got == data,
                "client {i}: the app received the bytes intact, in order"
            );
            // The app's reply, spliced by the node's relay, then EOF.
            let reply = unique_pattern(LEN, i + 100);
            let got = send_and_read_all(&mut app, &reply, cr).await;
            assert!(
                got == reply,
                "client {i}: the reply arrived intact, in order"
            );
            drop(client);
            let (so, no) = timeout(LIMIT, relays).await.unwrap().unwrap();
            let all = (LEN as u64, LEN as u64, 0);
            assert_eq!((so.bytes_in, so.bytes_out, so.errno), all);
            assert_eq!((no.bytes_in, no.bytes_out, no.errno), all);
        });
    futures_join_all(checks).await;
    for ep in [&p.server, &p.node] {
        let stats = ep.handle().with(|ch| ch.stats());
        assert!(
            stats.bytes_spliced > 0 && stats.bytes_spliced < stats.bytes_sent,
            "both spliced and copied payloads went out: {stats:?}"
        );
    }
    // Into the app's unix sockets, payloads were spliced too (and the
    // start of each frame copied); into TCP sockets, none.
    let node = p.node.handle().with(|ch| ch.stats());
    assert!(
        node.bytes_received_spliced > node.bytes_received / 2
            && node.bytes_received_spliced < node.bytes_received,
        "{node:?}"
    );
    let server = p.server.handle().with(|ch| ch.stats());
    assert_eq!(server.bytes_received_spliced, 0, "{server:?}");
}

/// A program that stops reading fills its connection's receive pipe
/// (and then its queue), never the channel: the other connection's
/// payloads, spliced, keep arriving.
#[tokio::test]
async fn a_stalled_program_does_not_stall_a_spliced_connection() {
    let mut p = socket_pair().await;
    let mut clients = Vec::new();
    let mut apps = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..2 {
        let conn = accept(&mut p).await;
        let (client, client_side) = UnixStream::pair().unwrap();
        let (app, app_side) = UnixStream::pair().unwrap();
        let (s, n) = (p.server.clone(), p.node.clone());
        tokio::spawn(async move { s.relay_unix(conn, client_side).await });
        tokio::spawn(async move { n.relay_unix(conn, app_side).await });
        clients.push(client);
        apps.push(app);
        conns.push(conn);
    }
    let (live_app, _stalled_app) = (apps.pop().unwrap(), apps.pop().unwrap());
    let (live_client, stalled_client) = (clients.pop().unwrap(), clients.pop().unwrap());
    let data = unique_pattern(16 << 20, 9);
    let window = crate::channel::DEFAULT_WINDOW;
    stall_one_and_pass_the_other(
        &p,
        conns[0],
        window,
        stalled_client,
        live_client,
        live_app,
        data,
    )
    .await;
    let node = p.node.handle().with(|ch| ch.stats());
    assert!(node.bytes_received_spliced > 8 << 20, "{node:?}");
}

/// Runs the futures concurrently on this task.
async fn futures_join_all<F: std::future::Future<Output = ()>>(fs: impl Iterator<Item = F>) {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A client TCP connection: (the client's end, the io-server's end).
async fn tcp_client() -> (tokio::net::TcpStream, Arc<TcpStream>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(l.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, l.accept());
    (client.unwrap(), Arc::new(accepted.unwrap().0))
}

/// A tracked client connection announced to the node of `p` and
/// relayed on both ends (the program's end of the node's relay is
/// returned, unread).
async fn tracked(
    p: &mut Pair,
    replay: Replay,
) -> (
    ConnId,
    tokio::net::TcpStream,
    tokio::task::JoinHandle<ClientRelayEnd>,
    UnixStream,
) {
    let (client, server_end) = tcp_client().await;
    let conn = p
        .server
        .accept_connection_with(2, addr(40000), addr(80), &replay, true, None)
        .unwrap();
    assert!(matches!(
        next(&mut p.node_rx).await,
        EndpointEvent::ConnectionAccepted { conn: c, .. } if c == conn
    ));
    let s = p.server.clone();
    let relay = tokio::spawn(async move { s.relay_client(conn, server_end).await });
    let (app, app_side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    tokio::spawn(async move { n.relay_unix(conn, app_side).await });
    (conn, client, relay, app)
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Issue 17: the node's channel ends before its program accepted the
/// connection; the io-server gets the client's socket back open, with
/// the octets it forwarded (capped, kept), and the rest is still in the
/// socket: every octet once, in order.
#[tokio::test]
async fn an_unaccepted_client_comes_back_whole_when_the_node_leaves() {
    let mut p = pair().await;
    let (conn, mut client, relay, _app) = tracked(&mut p, Replay::default()).await;
    assert_eq!(p.server.unaccepted(), 1);
    let sent = pattern(200_000, 7);
    client.write_all(&sent).await.unwrap();
    client.shutdown().await.unwrap();
    let cap = preaccept::cap(u64::from(WINDOW));
    until("the pre-accept cap to be forwarded", || {
        p.server.relayed_bytes(conn).0 == cap as u64
    })
    .await;
    // The node dies (its channel ends).
    p.node.handle().with(|ch| ch.close("node killed"));
    let end = timeout(LIMIT, relay).await.unwrap().unwrap();
    let ClientRelayEnd::Unaccepted { stream, replay, .. } = end else {
        panic!("expected the client back, got {end:?}");
    };
    assert!(!replay.fin, "the FIN is still in the socket");
    assert_eq!(&replay.data[..], &sent[..cap], "exactly what was forwarded");
    assert_eq!(p.server.unaccepted(), 0);
    let mut stream = Arc::try_unwrap(stream).expect("no other owner");
    let mut rest = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest == sent[cap..], "the rest is unread, then the FIN");
    // The client's connection is open: the next node answers on it.
    stream.write_all(b"served").await.unwrap();
    let mut answer = [0u8; 6];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"served");
}

/// A client that sent its request and its FIN before the node died
/// comes back with both.
#[tokio::test]
async fn a_request_and_fin_forwarded_unaccepted_come_back_in_the_replay() {
    let mut p = pair().await;
    let (_conn, mut client, relay, mut app) = tracked(&mut p, Replay::default()).await;
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    client.shutdown().await.unwrap();
    // Both reached the node (its program never took them).
    let mut at_node = Vec::new();
    timeout(LIMIT, app.read_to_end(&mut at_node))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at_node, b"GET / HTTP/1.0\r\n\r\n");
    p.node.handle().with(|ch| ch.close("node killed"));
    let end = timeout(LIMIT, relay).await.unwrap().unwrap();
    let ClientRelayEnd::Unaccepted { replay, .. } = end else {
        panic!("expected the client back, got {end:?}");
    };
    assert_eq!(
        replay,
        Replay {
            data: Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n"),
            fin: true
        }
    );
}

/// Once the node says its program accepted the connection, the cap is
/// lifted, nothing is kept, and the channel ending closes it as before.
#[tokio::test]
async fn an_accepted_client_is_relayed_freely_and_not_given_back() {
    let mut p = pair().await;
    let (conn, mut client, relay, mut app) = tracked(&mut p, Replay::default()).await;
    p.node.accepted(conn, false);
    until("the accept to reach the io-server", || {
        p.server.unaccepted() == 0
    })
    .await;
    let sent = pattern(300_000, 9);
    let (sent2, got) = (
        sent.clone(),
        tokio::spawn(async move {
            let mut got = vec![0u8; 300_000];
            app.read_exact(&mut got).await.unwrap();
            (got, app)
        }),
    );
    client.write_all(&sent2).await.unwrap();
    let (got, _app) = timeout(LIMIT, got).await.unwrap().unwrap();
    assert!(got == sent, "past the cap, intact");
    p.node.handle().with(|ch| ch.close("node killed"));
    let end = timeout(LIMIT, relay).await.unwrap().unwrap();
    assert!(
        matches!(end, ClientRelayEnd::Finished(ref o) if o.bytes_in == sent.len() as u64),
        "{end:?}"
    );
}

/// The next node gets the replay first, then the rest of the stream.
#[tokio::test]
async fn a_replay_reaches_the_next_node_before_the_rest() {
    let mut p = pair().await;
    let first = Replay {
        data: Bytes::from(pattern(100_000, 3)),
        fin: false,
    };
    let (conn, mut client, relay, mut app) = tracked(&mut p, first.clone()).await;
    client.write_all(b"and the rest").await.unwrap();
    client.shutdown().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        got
    });
    // The replay alone is past the cap: the rest waits for the accept.
    until("the replay to be forwarded", || {
        p.server.relayed_bytes(conn).0 == first.data.len() as u64
    })
    .await;
    p.node.accepted(conn, false);
    let got = timeout(LIMIT, reader).await.unwrap().unwrap();
    let mut want = first.data.to_vec();
    want.extend_from_slice(b"and the rest");
    assert!(got == want, "replay, then the stream, each octet once");
    drop(client);
    let end = timeout(LIMIT, relay).await.unwrap().unwrap();
    assert!(matches!(end, ClientRelayEnd::Finished(_)), "{end:?}");
}

/// A replay ending in the client's FIN: the next node reads the
/// octets, then the end.
#[tokio::test]
async fn a_replay_with_its_fin_ends_the_stream_after_it() {
    let mut p = pair().await;
    let replay = Replay {
        data: Bytes::from_static(b"request"),
        fin: true,
    };
    let (_conn, mut client, _relay, mut app) = tracked(&mut p, replay).await;
    // The client's FIN was read already by the io-server (a real
    // re-dispatch reads it again from the socket; here it is sent).
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(LIMIT, app.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"request");
}

/// The program's first reply may come before the node's `Accepted`:
/// it is the accept (only the program writes to its end).
#[tokio::test]
async fn a_reply_from_the_program_counts_as_its_accept() {
    let mut p = pair().await;
    let (_conn, mut client, relay, mut app) = tracked(&mut p, Replay::default()).await;
    assert_eq!(p.server.unaccepted(), 1);
    app.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    timeout(LIMIT, client.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"hello");
    until("the reply to settle it", || p.server.unaccepted() == 0).await;
    p.node.handle().with(|ch| ch.close("node killed"));
    let end = timeout(LIMIT, relay).await.unwrap().unwrap();
    assert!(matches!(end, ClientRelayEnd::Finished(_)), "{end:?}");
}

/// Admission (issue 24): a tracked connection holds a place in its
/// member's count (`Waiting`) from its announcement to its program's
/// accept, and giving it back wakes the io-server's admission task.
#[tokio::test]
async fn a_member_s_place_is_held_until_its_program_accepts() {
    let mut p = pair().await;
    let freed = Arc::new(tokio::sync::Notify::new());
    let waiting = crate::endpoint::Waiting::new(freed.clone());
    let (_client, server_end) = tcp_client().await;
    let replay = Replay::default();
    let conn = p
        .server
        .accept_connection_with(2, addr(40000), addr(80), &replay, true, Some(&waiting))
        .unwrap();
    assert!(matches!(
        next(&mut p.node_rx).await,
        EndpointEvent::ConnectionAccepted { conn: c, .. } if c == conn
    ));
    assert_eq!(waiting.get(), 1, "taken when announced");
    let s = p.server.clone();
    let _relay = tokio::spawn(async move { s.relay_client(conn, server_end).await });
    let (_app, app_side) = UnixStream::pair().unwrap();
    let n = p.node.clone();
    tokio::spawn(async move { n.relay_unix(conn, app_side).await });
    p.node.accepted(conn, false);
    timeout(LIMIT, freed.notified())
        .await
        .expect("the accept wakes the admission task");
    assert_eq!(waiting.get(), 0, "given back at the accept");
}

/// Issue 24: a sweep closes a client connection that moved no octet for
/// the idle limit (the relay ends with ETIMEDOUT, the client gets a
/// reset) and spares one that moved; once the node's Fin went out, the
/// shorter half-closed limit applies. Time is the sweeps' own.
#[tokio::test]
async fn a_sweep_closes_a_silent_client_with_etimedout_and_spares_a_busy_one() {
    use crate::endpoint::{Expiry, QuietLimits};
    use std::time::Instant;
    let mut p = pair().await;
    let (quiet, mut quiet_client, quiet_relay, _app) = tracked(&mut p, Replay::default()).await;
    let (busy, mut busy_client, _busy_relay, mut app) = tracked(&mut p, Replay::default()).await;
    let s = Duration::from_secs(1);
    let limits = QuietLimits {
        idle: Some(10 * s),
        half_closed: Some(2 * s),
    };
    let t0 = Instant::now();
    assert_eq!(p.server.sweep_quiet(t0, &limits), []);
    busy_client.write_all(b"hello").await.unwrap();
    until("the busy client's octets to be relayed", || {
        p.server.relayed_bytes(busy).0 == 5
    })
    .await;
    assert_eq!(p.server.sweep_quiet(t0 + 5 * s, &limits), []);
    assert_eq!(
        p.server.sweep_quiet(t0 + 11 * s, &limits),
        [(quiet, Expiry::Idle)]
    );
    let end = timeout(LIMIT, quiet_relay).await.unwrap().unwrap();
    assert!(
        matches!(end, ClientRelayEnd::Finished(ref o) if o.errno == crate::endpoint::errno::ETIMEDOUT),
        "{end:?}"
    );
    let mut buf = [0u8; 8];
    let r = timeout(LIMIT, quiet_client.read(&mut buf)).await.unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    // The node's program closes its side: the client sees EOF and keeps
    // its side open.
    app.shutdown().await.unwrap();
    let r = timeout(LIMIT, busy_client.read(&mut buf)).await.unwrap();
    assert_eq!(r.unwrap(), 0);
    assert_eq!(
        p.server.sweep_quiet(t0 + 20 * s, &limits),
        [],
        "the Fin moved"
    );
    assert_eq!(p.server.sweep_quiet(t0 + 21 * s, &limits), []);
    assert_eq!(
        p.server.sweep_quiet(t0 + 22 * s, &limits),
        [(busy, Expiry::HalfClosed)]
    );
}

/// The program's end of a test connection: whether its end of file is an
/// abortive close, and how often a peer's reset was passed to it.
struct TestProgram {
    abortive: bool,
    resets: std::sync::atomic::AtomicUsize,
}

impl crate::endpoint::ProgramEnd for TestProgram {
    fn closed_abortively(&self) -> bool {
        self.abortive
    }
    fn reset(&self, _relayed: &UnixStream) {
        self.resets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A client of `listener` relayed to a program's end through `p`'s two
/// relays (`relay_tcp` at the io-server, `relay_program` at the node):
/// the client, the app's end, the program's hooks, and both relays'
/// outcomes to come.
async fn relayed_to_program(
    p: &mut Pair,
    listener: &tokio::net::TcpListener,
    abortive: bool,
) -> (
    TcpStream,
    UnixStream,
    Arc<TestProgram>,
    tokio::task::JoinHandle<(RelayOutcome, RelayOutcome)>,
) {
    let conn = accept(p).await;
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let server_side = Arc::new(listener.accept().await.unwrap().0);
    let (app, app_side) = UnixStream::pair().unwrap();
    let program = Arc::new(TestProgram {
        abortive,
        resets: Default::default(),
    });
    let (s, n, prog) = (p.server.clone(), p.node.clone(), program.clone());
    let relays = tokio::spawn(async move {
        tokio::join!(
            s.relay_tcp(conn, server_side),
            n.relay_program(conn, app_side, &*prog)
        )
    });
    (client, app, program, relays)
}

/// A node's relay of a program's connection carries resets both ways: the
/// program's abortive close reaches the client as an RST (a `Reset` frame,
/// the io-server's TCP socket closed with `SO_LINGER` 0), and the client's
/// RST reaches the program's end (`ProgramEnd::reset`), where a plain end
/// of file stays a FIN.
#[tokio::test]
async fn resets_cross_a_program_relay_both_ways_and_a_plain_close_stays_a_fin() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut p = socket_pair().await;
    let listener = tokio::net::TcpListener::bind(addr(0)).await.unwrap();
    for (abortive, want) in [(true, "reset"), (false, "fin")] {
        let (mut client, app, program, relays) =
            relayed_to_program(&mut p, &listener, abortive).await;
        drop(app);
        let mut buf = [0u8; 8];
        let got = timeout(LIMIT, client.read(&mut buf)).await.unwrap();
        let seen = match got {
            Ok(0) => "fin",
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
            other => panic!("{other:?}"),
        };
        assert_eq!(seen, want, "abortive close {abortive}");
        drop(client);
        timeout(LIMIT, relays).await.unwrap().unwrap();
        assert_eq!(program.resets.load(Relaxed), 0, "nothing to pass back");
    }
    // The client resets: the program's end is told.
    let (client, _app, program, relays) = relayed_to_program(&mut p, &listener, false).await;
    client.set_zero_linger().unwrap();
    drop(client);
    let (_, node) = timeout(LIMIT, relays).await.unwrap().unwrap();
    assert_eq!(node.errno, crate::endpoint::errno::ECONNRESET);
    assert_eq!(program.resets.load(Relaxed), 1);
}

//! The async driver over real transports (DESIGN.md "fabric", "Flow control",
//! "Security and failure"): the handshake over `memory_pair()`, a `unix:`
//! socket and `tcp://127.0.0.1`, refusal of a wrong token on both sides, a
//! stalled reader that stalls only its own connection (§2.2), and garbage
//! on a listener that closes only that channel.

#[path = "common/driver.rs"]
mod driver;

use bytes::BytesMut;
use driver::{
    accept, handshake, link, listen, open, pattern, send_pattern, wake_senders, End, Kind, STEP,
};
use saps_fabric::channel::DEFAULT_WINDOW;
use saps_fabric::codec::{self, DEFAULT_MAX_FRAME};
use saps_fabric::driver::FabricHandle;
use saps_fabric::transport::{connect_stream, FabricUrl};
use saps_fabric::{Channel, ChannelConfig, ChannelError, ConnId, Event, Frame};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

const KINDS: [Kind; 3] = [Kind::Memory, Kind::Unix, Kind::Tcp];

#[tokio::test]
async fn handshake_succeeds_and_data_flows_over_every_transport() {
    for kind in KINDS {
        let (mut node, mut srv) = open(kind).await;
        let conn = accept(&mut node, &srv).await;
        srv.handle
            .with(|ch| ch.send_message(conn, b"hello"))
            .unwrap();
        assert_eq!(
            node.next().await,
            Event::MessageReceived {
                conn,
                data: "hello".into()
            },
            "{kind:?}"
        );
        node.handle
            .with(|ch| ch.send_message(conn, b"world"))
            .unwrap();
        assert_eq!(
            srv.next().await,
            Event::MessageReceived {
                conn,
                data: "world".into()
            }
        );
    }
}

#[tokio::test]
async fn wrong_token_is_refused_with_a_clear_error_on_both_sides() {
    for kind in KINDS {
        let ((node, node_first), (srv, srv_first)) =
            handshake(link(kind).await, "wrong", "right").await;
        let Event::Closed { error: node_error } = node_first else {
            panic!("{kind:?}: the node was not refused: {node_first:?}")
        };
        assert_eq!(node_error, ChannelError::BadServerProof, "{kind:?}");
        let Event::Closed { error: srv_error } = srv_first else {
            panic!("{kind:?}: the io-server was not refused: {srv_first:?}")
        };
        assert_eq!(
            srv_error.to_string(),
            "peer closed the channel: authentication failed: the io-server did not prove the token"
        );
        for end in [node, srv] {
            assert!(end.handle.with(|ch| ch.is_closed()));
        }
    }
}

/// What the node's reader of the two connections has seen.
struct Reader {
    a: ConnId,
    /// Bytes received on `a` and on `b`.
    got: [u64; 2],
    /// Bytes of `a` received but not consumed while its reader is stopped.
    held_a: usize,
}

impl Reader {
    fn on_event(&mut self, node: &FabricHandle, e: Event, consume_a: bool) {
        let Event::MessageReceived { conn, data } = e else {
            panic!("unexpected {e:?}")
        };
        let got = &mut self.got[usize::from(conn != self.a)];
        assert_eq!(&data[..], pattern(*got, data.len()), "conn {conn} at {got}");
        *got += data.len() as u64;
        if conn != self.a || consume_a {
            node.with(|ch| ch.consumed(conn, data.len()));
        } else {
            self.held_a += data.len();
        }
    }
}

/// §2.2 over a real socket: connection `a`'s reader stops; `b` still moves
/// 32 MiB; then `a` resumes and every byte of both arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_over_unix_does_not_stall_other_connections() {
    const TOTAL: [u64; 2] = [4 << 20, 32 << 20];
    let window = u64::from(DEFAULT_WINDOW);
    let (mut node, srv) = open(Kind::Unix).await;
    let a = accept(&mut node, &srv).await;
    let b = accept(&mut node, &srv).await;
    let ready = [Arc::new(Notify::new()), Arc::new(Notify::new())];
    wake_senders(
        srv.events,
        vec![(a, ready[0].clone()), (b, ready[1].clone())],
    );
    let until = Instant::now() + Duration::from_secs(120);
    let senders: Vec<_> = [a, b]
        .into_iter()
        .zip(TOTAL)
        .zip(ready)
        .map(|((conn, total), ready)| {
            let handle = srv.handle.clone();
            tokio::spawn(async move {
                send_pattern(&handle, conn, &ready, 64 * 1024, total, until).await
            })
        })
        .collect();

    let mut reader = Reader {
        a,
        got: [0, 0],
        held_a: 0,
    };
    let start = Instant::now();
    while reader.got[1] < TOTAL[1] || reader.got[0] < window {
        let e = node.next().await;
        reader.on_event(&node.handle, e, false);
        assert!(
            reader.got[0] <= window,
            "a's reader stopped, yet more than B_r arrived"
        );
    }
    let elapsed = start.elapsed();
    assert_eq!(reader.got[0], window, "a stopped at exactly its window");
    assert_eq!(
        srv.handle.with(|ch| ch.send_window(a)),
        0,
        "a's sender is stalled"
    );
    println!(
        "b moved {} MiB in {elapsed:?} ({:.0} MB/s) while a was stalled",
        TOTAL[1] >> 20,
        TOTAL[1] as f64 / elapsed.as_secs_f64() / 1e6
    );

    node.handle.with(|ch| ch.consumed(a, reader.held_a));
    while reader.got[0] < TOTAL[0] {
        let e = node.next().await;
        reader.on_event(&node.handle, e, true);
    }
    for (sender, total) in senders.into_iter().zip(TOTAL) {
        assert_eq!(sender.await.expect("the sender finished"), total);
    }
    assert_eq!(reader.got, TOTAL);
}

/// A `tracing` writer into a shared buffer, to assert on what was logged.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn garbage_on_a_listener_closes_that_channel_with_a_logged_reason_and_the_listener_keeps_accepting(
) {
    let logs = Logs::default();
    let writer = logs.clone();
    // The fabric logs the reason at debug level: its owner hears it in
    // the `Closed` event and logs it once (the io-server, rate-limited).
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // A minimal io-server: every accepted node gets its own channel.
    let (listener, _dir) = listen(Kind::Unix).await;
    let url = listener.local_url().unwrap();
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((halves, _)) = listener.accept().await {
            let mut end = End::spawn(Channel::io_server(ChannelConfig::new("secret")), halves);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                while let Some(e) = end.events.recv().await {
                    match e {
                        Event::NodeAuthenticated { .. } => end.handle.with(|ch| ch.welcome(1)),
                        Event::Closed { error } => {
                            let _ = closed_tx.send(error);
                        }
                        _ => {}
                    }
                }
            });
        }
    });

    let FabricUrl::Unix(path) = &url else {
        unreachable!("a unix listener")
    };
    let cases: [(&[u8], &str); 2] = [
        (b"GET / HTTP/1.1\r\nHost: saps\r\n\r\n", "exceeds the limit"),
        (&[0, 0, 0, 2, 1, 0xee], "unknown frame tag 0xee"),
    ];
    for (garbage, reason) in cases {
        let mut raw = tokio::net::UnixStream::connect(path).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(STEP, raw.read_to_end(&mut reply))
            .await
            .expect("the io-server closes the channel")
            .unwrap();
        let mut reply = BytesMut::from(&reply[..]);
        match codec::decode(&mut reply, DEFAULT_MAX_FRAME) {
            Ok(Some(Frame::GoAway { reason: sent })) => assert!(sent.contains(reason), "{sent}"),
            other => panic!("expected a GoAway, got {other:?}"),
        }
        let error = tokio::time::timeout(STEP, closed.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(error.to_string().contains(reason), "{error}");
        let logged = logs.text();
        assert!(
            logged.contains("closing fabric channel") && logged.contains(reason),
            "{logged}"
        );

        // The listener still serves a real node.
        let halves = connect_stream(&url).await.unwrap();
        let mut node = End::spawn(
            Channel::node(ChannelConfig::new("secret").node("next", 1)),
            halves,
        );
        assert_eq!(node.next().await, Event::Welcome { node_id: 1 });
    }
}

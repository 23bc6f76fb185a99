//! The RDMA transport (issue 8) over the in-process verbs emulation: the
//! fabric's flow-control scenario end to end through the real driver, the
//! verbs' full-send-queue and RNR semantics, and the "no RDMA device" error.
#![cfg(feature = "rdma")]

use bytes::{Bytes, BytesMut};
use saps_fabric::driver::{self, FabricHandle};
use saps_fabric::transport::rdma::verbs::QpConfig;
use saps_fabric::transport::rdma::{
    self, EmuFabric, RdmaConfig, RdmaError, RdmaListener, SendOp, SendWr, Verbs, VerbsProvider,
    WcStatus,
};
use saps_fabric::transport::{FabricUrl, TransportRead, TransportWrite};
use saps_fabric::{Channel, ChannelConfig, Event};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const DEADLINE: Duration = Duration::from_secs(10);

/// Small buffers, so that the ring wraps and both credits run out often.
fn small_config() -> RdmaConfig {
    RdmaConfig {
        send_buffers: 8,
        send_buffer_size: 16 * 1024,
        recv_buffers: 8,
        small: 1024,
        ring_size: 64 * 1024,
    }
}

/// A connected pair of emulated RDMA transports via the TCP side channel.
async fn rdma_pair() -> (
    (
        rdma::RdmaReader<rdma::emu::EmuVerbs>,
        rdma::RdmaWriter<rdma::emu::EmuVerbs>,
    ),
    (
        rdma::RdmaReader<rdma::emu::EmuVerbs>,
        rdma::RdmaWriter<rdma::emu::EmuVerbs>,
    ),
) {
    let fabric = EmuFabric::new();
    let url: FabricUrl = "rdma://127.0.0.1:0".parse().unwrap();
    let listener = RdmaListener::bind_with(&url, fabric.clone(), small_config())
        .await
        .unwrap();
    let url = listener.local_url().unwrap();
    let (server, client) = tokio::join!(
        listener.accept(),
        rdma::rdma_connect_with(&url, &fabric, small_config())
    );
    (server.unwrap().0, client.unwrap())
}

async fn next(rx: &mut UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("event within the deadline")
        .expect("channel alive")
}

fn payload(i: usize) -> u8 {
    (i % 251) as u8
}

/// The fabric's §2.2 scenario, unchanged, over emulated RDMA: two
/// connections, the node never reads `a`; `b` still moves 1 MiB, `a` stops
/// at its window, then resumes and every byte arrives intact.
#[tokio::test]
async fn slow_reader_does_not_stall_other_connections_over_emulated_rdma() {
    let ((sr, sw), (nr, nw)) = rdma_pair().await;
    let window = 16 * 1024;
    let (srv, mut srv_rx) = driver::spawn(
        Channel::io_server(ChannelConfig::new("tok").window(window)),
        sr,
        sw,
    );
    let (node, mut node_rx) = driver::spawn(
        Channel::node(ChannelConfig::new("tok").node("n1", 1).window(window)),
        nr,
        nw,
    );
    assert!(matches!(
        next(&mut srv_rx).await,
        Event::NodeAuthenticated { .. }
    ));
    srv.with(|ch| ch.welcome(1));
    assert_eq!(next(&mut node_rx).await, Event::Welcome { node_id: 1 });
    let open = |h: &FabricHandle, port| {
        h.with(|ch| {
            ch.accept_connection(
                2,
                format!("192.0.2.{port}:1").parse().unwrap(),
                "192.0.2.9:80".parse().unwrap(),
            )
        })
        .unwrap()
    };
    let (a, b) = (open(&srv, 1), open(&srv, 2));
    let total = 1 << 20;
    let (mut sent, mut got) = ([0usize; 2], [Vec::new(), Vec::new()]);
    let start = Instant::now();
    // Phase 1: the node consumes only b.
    while got[1].len() < total {
        assert!(
            start.elapsed() < DEADLINE,
            "b stalled at {} bytes",
            got[1].len()
        );
        for (i, conn) in [a, b].into_iter().enumerate() {
            let chunk: Vec<u8> = (sent[i]..(sent[i] + 8000).min(total))
                .map(payload)
                .collect();
            sent[i] += srv.with(|ch| ch.send_message(conn, &chunk)).unwrap();
        }
        tokio::select! {
            e = next(&mut node_rx) => if let Event::MessageReceived { conn, data } = e {
                let i = usize::from(conn == b);
                got[i].extend_from_slice(&data);
                if conn == b {
                    node.with(|ch| ch.consumed(b, data.len()));
                }
            },
            _ = next(&mut srv_rx) => {}
        }
    }
    assert_eq!(sent[0], window as usize, "a stopped at exactly its window");
    assert_eq!(got[0].len(), window as usize);
    // Phase 2: the stalled reader resumes.
    node.with(|ch| ch.consumed(a, window as usize));
    while got[0].len() < total {
        assert!(
            start.elapsed() < DEADLINE,
            "a did not resume: {} bytes",
            got[0].len()
        );
        let chunk: Vec<u8> = (sent[0]..(sent[0] + 8000).min(total))
            .map(payload)
            .collect();
        sent[0] += srv.with(|ch| ch.send_message(a, &chunk)).unwrap();
        tokio::select! {
            e = next(&mut node_rx) => if let Event::MessageReceived { conn, data } = e {
                assert_eq!(conn, a);
                got[0].extend_from_slice(&data);
                node.with(|ch| ch.consumed(a, data.len()));
            },
            _ = next(&mut srv_rx) => {}
        }
    }
    for g in &got {
        assert_eq!(g.len(), total);
        assert!(
            g.iter().enumerate().all(|(i, &x)| x == payload(i)),
            "bytes intact and in order"
        );
    }
}

/// Mixed small (SEND) and bulk (RDMA WRITE into the ring, wrapping it many
/// times) writes arrive in order, and shutdown reaches the peer as EOF.
#[tokio::test]
async fn small_and_bulk_messages_arrive_in_order_then_end_of_stream() {
    let ((mut r, _w), (_r2, mut w)) = rdma_pair().await;
    let sizes = [10usize, 20_000, 1, 900, 16 * 1024, 70_000, 3];
    let total: usize = sizes.iter().sum::<usize>() * 20;
    let writer = tokio::spawn(async move {
        let mut at = 0;
        for _ in 0..20 {
            for &n in &sizes {
                w.write(Bytes::from((at..at + n).map(payload).collect::<Vec<u8>>()))
                    .await
                    .unwrap();
                at += n;
            }
        }
        w.shutdown().await.unwrap();
    });
    let mut got = BytesMut::new();
    loop {
        let n = tokio::time::timeout(DEADLINE, r.read(&mut got))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
    }
    writer.await.unwrap();
    assert_eq!(got.len(), total);
    assert!(got.iter().enumerate().all(|(i, &x)| x == payload(i)));
}

/// Two connected emulated queue pairs with `rnr_retry` and send depth given.
fn qp_pair(max_send_wr: u32, rnr_retry: u8) -> (rdma::emu::EmuVerbs, rdma::emu::EmuVerbs) {
    let fabric = EmuFabric::new();
    let cfg = QpConfig {
        max_send_wr,
        max_recv_wr: 16,
        rnr_retry,
    };
    let (x, y) = (fabric.open(&cfg).unwrap(), fabric.open(&cfg).unwrap());
    x.connect(&y.endpoint()).unwrap();
    y.connect(&x.endpoint()).unwrap();
    (x, y)
}

fn send<V: Verbs>(v: &V, mr: &V::Mr, wr_id: u64) -> Result<(), RdmaError> {
    v.post_send(SendWr {
        wr_id,
        mr,
        offset: 0,
        len: 4,
        op: SendOp::Send,
    })
}

/// Polls until `n` completions arrived (bounded by the deadline).
fn poll_n<V: Verbs>(v: &V, n: usize) -> Vec<rdma::Completion> {
    let (mut out, start) = (Vec::new(), Instant::now());
    while out.len() < n {
        assert!(
            start.elapsed() < DEADLINE,
            "only {} of {n} completions",
            out.len()
        );
        let want = n - out.len();
        v.poll_cq(&mut out, want).unwrap();
        std::thread::yield_now();
    }
    out
}

#[test]
fn posting_past_max_send_wr_is_a_send_queue_full_error_until_completions_are_polled() {
    let (x, y) = qp_pair(4, 7);
    let (smr, rmr) = (x.register(64).unwrap(), y.register(1024).unwrap());
    for i in 0..8 {
        y.post_recv(&rmr, i * 64, 64, i as u64).unwrap();
    }
    for i in 0..4 {
        send(&x, &smr, i).unwrap();
    }
    assert!(matches!(send(&x, &smr, 4), Err(RdmaError::SendQueueFull)));
    let done = poll_n(&x, 4);
    assert!(done.iter().all(|c| c.status == WcStatus::Success));
    assert_eq!(
        done.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "RC order"
    );
    send(&x, &smr, 5).unwrap();
}

#[test]
fn a_send_with_no_receive_posted_fails_rnr_after_its_retries_and_flushes_the_rest() {
    let (x, _y) = qp_pair(8, 3);
    let smr = x.register(64).unwrap();
    send(&x, &smr, 1).unwrap();
    send(&x, &smr, 2).unwrap();
    let done = poll_n(&x, 2);
    assert_eq!(
        (done[0].wr_id, done[0].status),
        (1, WcStatus::RnrRetryExceeded)
    );
    assert_eq!((done[1].wr_id, done[1].status), (2, WcStatus::Flushed));
}

#[test]
fn with_infinite_rnr_retry_a_send_waits_for_the_receive_and_then_lands() {
    let (x, y) = qp_pair(8, 7);
    let (smr, rmr) = (x.register(64).unwrap(), y.register(64).unwrap());
    x.write_mr(&smr, 0, b"saps").unwrap();
    send(&x, &smr, 9).unwrap();
    let mut out = Vec::new();
    for _ in 0..20 {
        x.poll_cq(&mut out, 1).unwrap();
    }
    assert!(
        out.is_empty(),
        "no completion while the peer has no receive"
    );
    y.post_recv(&rmr, 8, 16, 77).unwrap();
    assert_eq!(poll_n(&x, 1)[0].status, WcStatus::Success);
    let recv = poll_n(&y, 1)[0];
    assert_eq!(
        (recv.wr_id, recv.status, recv.byte_len),
        (77, WcStatus::Success, 4)
    );
    let mut got = BytesMut::new();
    y.read_mr(&rmr, 8, 4, &mut got).unwrap();
    assert_eq!(&got[..], b"saps");
}

/// This machine has no RDMA device: asking for real hardware is a clear
/// error, not a panic (skipped where a device exists).
#[tokio::test]
async fn asking_for_real_rdma_hardware_here_says_no_rdma_device_found() {
    if std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some()) {
        return;
    }
    let url: FabricUrl = "rdma://127.0.0.1:1".parse().unwrap();
    let err = rdma::rdma_connect(&url)
        .await
        .err()
        .expect("no device here");
    assert!(
        err.to_string().starts_with("no RDMA device found ("),
        "{err}"
    );
    let err = RdmaListener::bind(&url)
        .await
        .err()
        .expect("no device here");
    assert!(matches!(err, RdmaError::NoDevice(_)), "{err}");
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::NotFound
    );
}

//! Issue 24: a raw node (it authenticates through the fabric's own
//! handshake code, then writes frames with the codec) sends up to 10
//! million Fin, Ping and GetOpt frames without ever reading. The
//! io-server's memory must stay bounded (it stops reading that node while
//! what it owes the node is over --max-node-output, or too many of its
//! requests wait), and another node keeps serving clients meanwhile.

mod common;
use bytes::BytesMut;
use common::*;
use saps_fabric::channel::Event;
use saps_fabric::{codec, Channel, ChannelConfig, Frame, Request};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FRAMES: u64 = 10_000_000;
/// The flood stops after this long, whatever it has sent.
const FLOOD_FOR: Duration = Duration::from_secs(15);
const MAX_GROWTH: u64 = 64 << 20;

/// This process's resident set (the io-server runs in it), in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Connects and runs the node's side of the handshake with the channel
/// itself; the stream once welcomed.
fn authenticate(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut ch = Channel::node(ChannelConfig::new(TOKEN).node("flood", 1));
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(t) = ch.poll_transmit() {
            s.write_all(&t.bytes).unwrap();
        }
        match ch.poll_event() {
            Some(Event::Welcome { .. }) => return s,
            Some(other) => panic!("not welcomed: {other:?}"),
            None => {}
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the io-server closed the handshake");
        ch.handle_input(&buf[..n]).unwrap();
    }
}

/// One chunk of the flood: Fin, Ping and GetOpt, over and over.
fn chunk(triples: u64) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..triples {
        codec::encode(
            &Frame::Fin {
                conn: 2 + 2 * (i % 64),
            },
            &mut out,
        );
        codec::encode(&Frame::Ping { token: i }, &mut out);
        let request = Request::GetOpt {
            conn: 2,
            level: libc::IPPROTO_TCP,
            name: libc::TCP_INFO,
            len: 256,
        };
        codec::encode(
            &Frame::Request {
                req: i as u32,
                request,
            },
            &mut out,
        );
    }
    out.to_vec()
}

/// Writes chunks until `FRAMES` frames are out or `FLOOD_FOR` has passed;
/// never reads. The number of frames written.
fn flood(mut s: UnixStream, sent: &AtomicU64) {
    const TRIPLES: u64 = 4096;
    let data = chunk(TRIPLES);
    s.set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = Instant::now() + FLOOD_FOR;
    let mut at = 0;
    while sent.load(Ordering::Relaxed) < FRAMES && Instant::now() < deadline {
        match s.write(&data[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => break, // the io-server closed the channel
        }
        if at == data.len() {
            at = 0;
            sent.fetch_add(3 * TRIPLES, Ordering::Relaxed);
        }
    }
    // Dropped here: the io-server sees the channel end.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flooding_fin_ping_and_getopt_without_reading_costs_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_fabric_server(dir.path()).await;
    let good = attach(&server, "good", 1, TOKEN).await.unwrap();
    let (_, addr) = good.listen(0, 0).await.unwrap();
    let good = good.run("good", App::Echo, Default::default());
    let before = rss();
    let raw = authenticate(&sock);
    wait_until("the raw node to join", || server.status().nodes.len() == 2).await;
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (s, d) = (sent.clone(), done.clone());
    let started = Instant::now();
    let flooder = std::thread::spawn(move || {
        flood(raw, &s);
        d.store(true, Ordering::Release);
    });
    // Meanwhile the good node serves one client after another.
    let mut served = 0;
    let mut peak = before;
    while !done.load(Ordering::Acquire) {
        let mut c = connect_one(addr, None, &[&good]).await;
        echoes(&mut c, b"still here").await;
        served += 1;
        peak = peak.max(rss());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flooder.join().unwrap();
    let elapsed = started.elapsed();
    peak = peak.max(rss());
    let growth = peak.saturating_sub(before);
    eprintln!(
        "flood: {} frames in {:.1} s; RSS {} MiB before, peak {} MiB (+{} MiB); {served} clients served meanwhile",
        sent.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        before >> 20,
        peak >> 20,
        growth >> 20
    );
    assert!(served > 0, "the good node served clients during the flood");
    assert!(
        growth < MAX_GROWTH,
        "RSS grew by {} MiB (limit {} MiB)",
        growth >> 20,
        MAX_GROWTH >> 20
    );
    // The flooder is gone; the good node still serves.
    wait_until("the raw node to leave", || server.status().nodes.len() == 1).await;
    let mut c = connect_one(addr, None, &[&good]).await;
    echoes(&mut c, b"after").await;
}

//! Fabric microbenchmark: codec + Appendix A flow-control throughput of one
//! SAPS connection, for 1 KiB and 64 KiB messages,
//! (a) two sans-IO channels back to back (no I/O at all),
//! (b) over `memory_pair()` with the async driver,
//! (c) over a `unix:` socket with the driver, and
//! (d) over `tcp://127.0.0.1` with the driver.
//!
//! Run with `cargo bench -p saps-fabric`; each case lasts [`CASE`]. The
//! receiver consumes every byte at once, so the figures are the protocol's
//! ceiling, not an application's. Results are kept in docs/benchmarks.md.

#[path = "../tests/common/driver.rs"]
mod driver;
#[path = "../../proto/tests/common/sans_io.rs"]
mod sans_io;

use driver::Kind;
use saps_fabric::channel::DEFAULT_WINDOW;
use saps_fabric::Event;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Length of one measured case.
const CASE: Duration = Duration::from_secs(2);
const SIZES: [usize; 2] = [1024, 64 * 1024];

/// Stream bytes the receiver got in `elapsed`.
struct Figures {
    bytes: u64,
    elapsed: Duration,
}

/// (a): the io-server end sends, the node end consumes; bytes move between
/// them by `poll_transmit`/`handle_input` on this thread.
fn sans_io_case(size: usize) -> Figures {
    let (mut node, mut srv) = sans_io::open_pair(DEFAULT_WINDOW);
    let peer = "192.0.2.1:40000".parse().unwrap();
    let local = "192.0.2.9:80".parse().unwrap();
    let conn = srv.accept_connection(2, peer, local).unwrap();
    sans_io::pump(&mut node, &mut srv);
    sans_io::drain(&mut node);
    let msg = vec![0x5a; size];
    let mut bytes = 0;
    let start = Instant::now();
    while start.elapsed() < CASE {
        while srv.send_message(conn, &msg).unwrap() == size {}
        let data = srv.poll_transmit().expect("the window was open").bytes;
        node.handle_input(&data).unwrap();
        while let Some(e) = node.poll_event() {
            if let Event::MessageReceived { data, .. } = e {
                bytes += data.len() as u64;
                node.consumed(conn, data.len());
            }
        }
        if let Some(credit) = node.poll_transmit() {
            srv.handle_input(&credit.bytes).unwrap();
        }
        sans_io::drain(&mut srv);
    }
    Figures {
        bytes,
        elapsed: start.elapsed(),
    }
}

/// (b)–(d): the same transfer with both ends on the driver over `kind`.
async fn driver_case(kind: Kind, size: usize) -> Figures {
    let (mut node, srv) = driver::open(kind).await;
    let conn = driver::accept(&mut node, &srv).await;
    let ready = Arc::new(Notify::new());
    driver::wake_senders(srv.events, vec![(conn, ready.clone())]);
    let start = Instant::now();
    let until = tokio::time::Instant::from_std(start + CASE);
    let handle = srv.handle.clone();
    tokio::spawn(async move {
        driver::send_pattern(&handle, conn, &ready, size, u64::MAX, until).await
    });
    let mut bytes = 0;
    while let Ok(Some(e)) = tokio::time::timeout_at(until, node.events.recv()).await {
        if let Event::MessageReceived { data, .. } = e {
            bytes += data.len() as u64;
            node.handle.with(|ch| ch.consumed(conn, data.len()));
        }
    }
    Figures {
        bytes,
        elapsed: start.elapsed(),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fabric microbenchmark: {cpus} CPUs, {} s per case, B_r = {} KiB",
        CASE.as_secs(),
        DEFAULT_WINDOW / 1024
    );
    println!(
        "{:<28} {:>8} {:>10} {:>12}",
        "case", "message", "MB/s", "msgs/s"
    );
    for size in SIZES {
        let cases = [
            ("sans-IO back to back", None),
            ("driver, memory_pair()", Some(Kind::Memory)),
            ("driver, unix socket", Some(Kind::Unix)),
            ("driver, tcp 127.0.0.1", Some(Kind::Tcp)),
        ];
        for (name, kind) in cases {
            let f = match kind {
                None => sans_io_case(size),
                Some(kind) => rt.block_on(driver_case(kind, size)),
            };
            let secs = f.elapsed.as_secs_f64();
            println!(
                "{name:<28} {:>6} KiB {:>10.0} {:>12.0}",
                size / 1024,
                f.bytes as f64 / secs / 1e6,
                f.bytes as f64 / size as f64 / secs
            );
        }
    }
}

//! Issue 24, before authentication and liveness: strangers on the fabric
//! port cost a bounded amount and are gone at the handshake deadline, a
//! source cannot hold more than its share of handshakes, and a node
//! behind a link that drops every byte leaves within 10 s while another
//! node of its group serves its clients.

use saps_tests::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Open descriptors of process `pid`.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident set of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An io-server on `tcp://127.0.0.1:PORT` with `extra` flags; its fabric URL.
fn tcp_io_server(d: &Path, extra: &[&str]) -> (Proc, String) {
    write_token(&d.join("token"), "cluster secret\n");
    let fabric = format!("tcp://127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(bin("io-server"));
    cmd.args(extra);
    (start_io_server(cmd, d, &fabric, "127.0.0.1"), fabric)
}

/// `saps-run` joined over `fabric` as NAME, serving `DIR/NAME/who` =
/// "node NAME" with python on `port`.
fn python_node(d: &Path, fabric: &str, name: &str, port: u16) -> Proc {
    let www = d.join(name);
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("who"), format!("node {name}\n")).unwrap();
    Proc::spawn(
        std::process::Command::new(bin("saps-run"))
            .args(["--io-server", fabric, "--token-file"])
            .arg(d.join("token"))
            .args(["--node", name, "--zero-relay", "off", "--"])
            .args([PYTHON, "-m", "http.server", &port.to_string()])
            .current_dir(&www),
    )
}

/// A connection to `to` from the local address `from` (any port).
fn connect_from(from: &str, to: &str) -> TcpStream {
    let to: SocketAddr = to.trim_start_matches("tcp://").parse().unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// Stranger `i`: says nothing, or sends part of a frame (a small one, or
/// one of nearly the Data frame limit).
fn stranger(from: &str, fabric: &str, i: usize) -> TcpStream {
    let mut s = connect_from(from, fabric);
    match i % 4 {
        0 | 1 => {}
        2 => s.write_all(&[0, 0, 3, 232, 1, 1, 7, 7]).unwrap(),
        _ => s
            .write_all(&200_000u32.to_be_bytes())
            .and_then(|_| s.write_all(&[1; 100]))
            .unwrap(),
    }
    s
}

/// Whether the server closed `s` within `within` (EOF or reset after
/// whatever it sent first, a GoAway).
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// The body of a GET of `url`, if it answered.
fn get(url: &str) -> Option<String> {
    let (code, body, _) = curl(&["-s", "--max-time", "5", url]);
    (code == 0).then_some(body)
}

#[test]
fn strangers_on_the_fabric_are_dropped_at_the_deadline_while_a_node_joins() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (io, fabric) = tcp_io_server(
        d,
        &[
            "--handshake-timeout",
            "3",
            "--max-handshakes",
            "400",
            "--max-handshakes-per-source",
            "400",
        ],
    );
    let pid = io.pid();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/who");
    let _a = python_node(d, &fabric, "a", port);
    assert!(wait_http(&url, Duration::from_secs(30)), "{}", io.stderr());
    let (fds0, rss0) = (fds(pid), rss_kib(pid));
    let start = Instant::now();
    let mut strangers: Vec<TcpStream> = (0..200)
        .map(|i| stranger("127.0.0.1", &fabric, i))
        .collect();
    let opened = Instant::now() - start;
    let peak = wait_for(Duration::from_secs(2), || {
        (fds(pid) >= fds0 + 150).then(|| fds(pid))
    });
    assert!(
        peak.is_some(),
        "the io-server took the strangers: {} fds",
        fds(pid)
    );
    // A node joins and serves while they are open.
    let _b = python_node(d, &fabric, "b", port);
    let served = wait_for(Duration::from_secs(20), || {
        (get(&url)? == "node b\n").then_some(())
    });
    let joined_at = Instant::now() - start;
    assert!(served.is_some(), "node b never served: {}", io.stderr());
    // Every stranger's socket is closed by the io-server at the deadline.
    for (i, s) in strangers.iter_mut().enumerate() {
        assert!(
            closed_by_server(s, Duration::from_secs(10)),
            "stranger {i} still open"
        );
    }
    let closed_at = Instant::now() - start;
    // Node b's channel and its relays' pipes are the only additions.
    let back = wait_for(Duration::from_secs(10), || {
        (fds(pid) <= fds0 + 10).then(|| fds(pid))
    });
    let rss1 = rss_kib(pid);
    eprintln!(
        "io-server fds {fds0} -> {} with 200 strangers -> {back:?}; RSS {rss0} KiB -> {rss1} KiB; \
         opened in {opened:?}, node b served at {joined_at:?}, all closed at {closed_at:?}",
        peak.unwrap()
    );
    assert!(back.is_some(), "fds {} (were {fds0})", fds(pid));
    assert!(rss1 < rss0 + 16 * 1024, "RSS {rss0} KiB -> {rss1} KiB");
    let status = io_server_status(d).unwrap();
    assert!(status.contains("Fabric: handshakes 0 "), "{status}");
    assert!(status.contains("failed 200;"), "{status}");
    assert!(get(&url).is_some(), "still served");
}

#[test]
fn handshakes_beyond_a_sources_share_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The default bounds: 64 handshakes, 8 per source.
    let (io, fabric) = tcp_io_server(d, &[]);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/who");
    let mut strangers: Vec<TcpStream> = (0..200)
        .map(|i| stranger("127.0.0.2", &fabric, i * 4))
        .collect();
    // Well before the 10 s deadline, all but 8 are refused and closed.
    let refused = wait_for(Duration::from_secs(3), || {
        io_server_status(d)?.contains("refused 192,").then_some(())
    });
    assert!(refused.is_some(), "{:?}", io_server_status(d));
    let start = Instant::now();
    let closed = strangers
        .iter_mut()
        .filter_map(|s| closed_by_server(s, Duration::from_millis(100)).then_some(()))
        .count();
    assert_eq!(closed, 192, "all but 8 closed at once: {}", io.stderr());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "before the deadline"
    );
    // A node from another address joins and serves meanwhile.
    let _a = python_node(d, &fabric, "a", port);
    assert!(wait_http(&url, Duration::from_secs(30)), "{}", io.stderr());
    let status = io_server_status(d).unwrap();
    assert!(
        status.contains("Fabric: handshakes 8 (max 64, 8 per source"),
        "{status}"
    );
    assert!(status.contains("refused 192,"), "{status}");
    assert!(io.stderr().contains("fabric connection refused"), "logged");
}

/// A TCP proxy from a port of its own to `to`, copying both ways until
/// `drop_all` is set, then reading and discarding every byte.
fn proxy(to: &str, drop_all: Arc<AtomicBool>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let here = format!("tcp://{}", l.local_addr().unwrap());
    let to = to.trim_start_matches("tcp://").to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(s) = TcpStream::connect(&to) else {
                continue;
            };
            for (mut from, mut into) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                let drop_all = drop_all.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        if !drop_all.load(Ordering::SeqCst) && into.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    here
}

#[test]
fn a_node_behind_a_link_that_drops_every_byte_leaves_within_ten_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (io, fabric) = tcp_io_server(d, &[]);
    let drop_all = Arc::new(AtomicBool::new(false));
    let via = proxy(&fabric, drop_all.clone());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/who");
    let _a = python_node(d, &via, "a", port);
    let _b = python_node(d, &fabric, "b", port);
    let mut seen = std::collections::BTreeSet::new();
    let both = wait_for(Duration::from_secs(30), || {
        seen.extend(get(&url));
        (seen.len() == 2).then_some(())
    });
    assert!(both.is_some(), "saw {seen:?}: {}", io.stderr());
    drop_all.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let gone = wait_for(Duration::from_secs(12), || {
        let s = io_server_status(d)?;
        let nodes = s.split("\nNodes\n").nth(1)?.to_string();
        (!nodes
            .lines()
            .any(|l| l.split_whitespace().next() == Some("a")))
        .then_some(())
    });
    let took = start.elapsed();
    eprintln!("node a left the status {took:?} after its link went silent");
    assert!(
        gone.is_some() && took < Duration::from_secs(10),
        "{took:?}: {}",
        io.stderr()
    );
    assert!(
        io.stderr().contains("node dropped: silent"),
        "{}",
        io.stderr()
    );
    for i in 0..20 {
        assert_eq!(get(&url).as_deref(), Some("node b\n"), "client {i}");
    }
    let status = io_server_status(d).unwrap();
    assert!(status.contains("dropped silent 1"), "{status}");
}

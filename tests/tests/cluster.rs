//! Application nodes behind a standalone io-server: two nodes share one
//! port (the single address of the cluster), one taking its clients'
//! sockets itself through the hand-off socket (zero-relay, the default on
//! a unix fabric), the other relayed; and a node survives an io-server
//! restart.

use saps_tests::*;
use std::path::Path;
use std::time::Duration;

/// `saps-run --node NAME --zero-relay ZR -- PROGRAM…` in `cwd`, joined to
/// the io-server in `d`.
fn node(d: &Path, name: &str, zero_relay: &str, cwd: &Path, program: &[&str]) -> Proc {
    Proc::spawn(
        unix_node(d, name, zero_relay)
            .args(program)
            .current_dir(cwd),
    )
}

/// `saps-run --node NAME --zero-relay ZR -- python3 -m http.server PORT`
/// serving `DIR/NAME/who` = "node NAME".
fn python_node(d: &Path, name: &str, zero_relay: &str, port: u16) -> Proc {
    let www = d.join(name);
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("who"), format!("node {name}\n")).unwrap();
    let port = port.to_string();
    node(
        d,
        name,
        zero_relay,
        &www,
        &[PYTHON, "-m", "http.server", &port],
    )
}

#[test]
fn two_python_nodes_share_one_port_behind_one_io_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = unix_io_server(d);
    let port = free_port();
    let nodes: Vec<Proc> = [("a", "on"), ("b", "off")]
        .iter()
        .map(|(n, zr)| python_node(d, n, zr, port))
        .collect();
    let url = format!("http://127.0.0.1:{port}/who");
    // Both nodes have joined the group once each has answered; round robin
    // then alternates, so a few requests reach both.
    let mut seen = std::collections::BTreeSet::new();
    let ok = wait_for(Duration::from_secs(30), || {
        let (code, body, _) = curl(&[&url]);
        if code == 0 {
            seen.insert(body);
        }
        (seen.len() == 2).then_some(())
    });
    assert!(
        ok.is_some(),
        "saw only {seen:?}\nio-server: {}\nnode a: {}\nnode b: {}",
        io.stderr(),
        nodes[0].stderr(),
        nodes[1].stderr()
    );
    let table = status(d);
    // Node a took its clients' sockets: served, but no byte relayed. Node
    // b's clients were relayed.
    let a = node_row(&table, "a");
    assert!(
        a.zero_relay && a.conns > 0 && a.bytes_in == 0,
        "{table}\nnode a: {}\nio-server: {}",
        nodes[0].stderr(),
        io.stderr()
    );
    let b = node_row(&table, "b");
    assert!(!b.zero_relay && b.conns > 0 && b.bytes_in > 0, "{table}");
}

/// `io-server status` of the io-server in `d`.
fn status(d: &Path) -> String {
    io_server_status(d).expect("io-server status failed")
}

struct NodeRow {
    zero_relay: bool,
    conns: u64,
    bytes_in: u64,
}

/// Node `name`'s line under "Nodes": `NAME (ID) from PEER[, zero-relay]
/// WEIGHT ACTIVE CONNS IN OUT INFLIGHT`.
fn node_row(table: &str, name: &str) -> NodeRow {
    let line = table
        .split("\nNodes\n")
        .nth(1)
        .and_then(|nodes| {
            nodes
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
        })
        .unwrap_or_else(|| panic!("status lists node {name}:\n{table}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .rev()
        .take(6)
        .map(|w| w.parse().expect("a number"))
        .collect();
    NodeRow {
        zero_relay: line.contains(", zero-relay"),
        conns: n[3],
        bytes_in: n[2],
    }
}

#[test]
fn a_node_rejoins_a_restarted_io_server_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut first = unix_io_server(d);
    let port = free_port();
    let mut node = python_node(d, "a", "on", port);
    let url = format!("http://127.0.0.1:{port}/who");
    assert!(
        wait_http(&url, Duration::from_secs(30)),
        "node never served: {}",
        node.stderr()
    );
    first.signal(libc::SIGKILL);
    assert!(first.wait_timeout(Duration::from_secs(10)).is_some());
    let (code, _, _) = curl(&[&url]);
    assert_ne!(code, 0, "nothing listens while the io-server is down");
    let second = unix_io_server(d);
    assert!(
        wait_http(&url, Duration::from_secs(30)),
        "node did not serve again after the restart\nnode: {}\nio-server: {}",
        node.stderr(),
        second.stderr()
    );
    assert!(node.running(), "saps-run and python kept running");
    // The node claimed its hand-off socket again on the new io-server.
    let table = status(d);
    assert!(node_row(&table, "a").zero_relay, "{table}");
}

/// A python server that echoes every connection's bytes, then its FIN;
/// a connection that fails midway is dropped and the next one accepted.
const ECHO: &str = r#"
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(8)
while True:
    c, _ = l.accept()
    try:
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    except OSError as e:
        print("echo: connection failed:", e, file=sys.stderr, flush=True)
    c.close()
"#;

/// A connection to the echo server on `port`, once it answers a ping
/// (the first attempts may come before the program listens).
fn echo_connection(port: u16, node: &Proc) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let c = wait_for(Duration::from_secs(30), || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.write_all(b"ping").ok()?;
        c.shutdown(std::net::Shutdown::Write).ok()?;
        let mut b = Vec::new();
        c.read_to_end(&mut b).ok()?;
        (b == b"ping").then(|| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
    })
    .unwrap_or_else(|| panic!("the echo server never answered: {}", node.stderr()));
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

/// Bulk streams both ways through a relayed node over a unix fabric, the
/// path where both relays splice their large reads (docs/fabric.md).
#[test]
fn bulk_streams_through_a_relayed_node_arrive_intact_both_ways() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _io = unix_io_server(d);
    let port = free_port();
    let node = node(d, "a", "off", d, &[PYTHON, "-c", ECHO, &port.to_string()]);
    // Random octets: frames out of order would not compare equal.
    let mut data = vec![0; 24 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    for round in 0..2 {
        let mut c = echo_connection(port, &node);
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::with_capacity(data.len());
        c.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got.len(), data.len(), "round {round}: {}", node.stderr());
        assert!(got == data, "round {round}: the echo came back altered");
    }
}

/// The io-server killed while a bulk stream runs through a relayed node
/// (its payloads spliced into the program's socket): the client's and the
/// program's connections end, saps-run and the program keep running, and
/// the node serves again once an io-server is back.
#[test]
fn a_relayed_node_survives_its_io_server_dying_mid_stream() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut first = unix_io_server(d);
    let port = free_port();
    let mut node = node(d, "a", "off", d, &[PYTHON, "-c", ECHO, &port.to_string()]);
    let mut c = echo_connection(port, &node);
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5a; 1 << 20];
        for _ in 0..1024 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    // 8 MiB echoed: the stream is flowing through both relays.
    let mut buf = vec![0; 1 << 20];
    let mut echoed = 0;
    while echoed < 8 << 20 {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the echo ended early: {}", node.stderr());
        echoed += n;
    }
    first.signal(libc::SIGKILL);
    assert!(first.wait_timeout(Duration::from_secs(10)).is_some());
    // The client's connection ends (end of stream or reset), and so does
    // the writer (the read timeout bounds the wait).
    let end = loop {
        match c.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = end {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        assert!(
            !matches!(e.kind(), WouldBlock | TimedOut),
            "the client's connection did not end: {e}"
        );
    }
    writer.join().unwrap();
    let _second = unix_io_server(d);
    let mut c = echo_connection(port, &node);
    c.write_all(b"again").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"again", "{}", node.stderr());
    assert!(node.running(), "saps-run and the program kept running");
}

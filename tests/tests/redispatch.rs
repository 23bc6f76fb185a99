//! Issue 17, end to end: a node whose saps-run is killed (SIGKILL) before
//! its program accepted the clients the scheduler sent it. Every one of
//! those clients is served by the other node of the group, with its
//! request intact and once, and none is reset: relayed (`--zero-relay
//! off`, the io-server replays what it had forwarded) and zero-relay
//! (`--zero-relay on`, the io-server gives its copy of the socket, whose
//! unread request is still in the kernel, to the other node).

use saps_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// Clients per test; `rr` sends every other one to node a.
const CLIENTS: usize = 8;

fn io_server(d: &Path) -> Proc {
    write_token(&d.join("token"), "redispatch secret\n");
    unix_io_server(d)
}

fn node(d: &Path, name: &str, zero_relay: &str, program: &str, port: u16) -> Proc {
    python_node(d, name, zero_relay, program, &[&port.to_string()])
}

/// `io-server status`, if it answers.
fn status(d: &Path) -> Option<String> {
    io_server_status(d)
}

/// Names of the group's members (`  -> NAME (ID/LISTENER) …` lines).
fn members(table: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|l| l.strip_prefix("  -> "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Conns (connections given) of node `name` under "Nodes".
fn conns(table: &str, name: &str) -> Option<u64> {
    let nodes = table.split("\nNodes\n").nth(1)?;
    let line = nodes
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    // … WEIGHT ACTIVE CONNS IN OUT INFLIGHT
    line.split_whitespace().rev().nth(3)?.parse().ok()
}

/// Client `i`'s request: some larger than what a relay forwards before
/// the program's accept (64 KiB), so part of them is replayed and part
/// read from the socket afresh.
fn request(i: usize) -> Vec<u8> {
    let pad = if i.is_multiple_of(3) { 150_000 } else { 20 + i };
    let mut r = format!("request {i} ").into_bytes();
    r.extend((0..pad).map(|j| b'a' + ((i + j) % 26) as u8));
    r.push(b'\n');
    r
}

fn a_killed_node_s_unaccepted_clients_are_served_by_the_other(zero_relay: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = io_server(d);
    let port = free_port();
    let mut a = node(d, "a", zero_relay, NEVER_ACCEPTS, port);
    let b = node(d, "b", zero_relay, ANSWERS, port);
    let both = wait_for(Duration::from_secs(30), || {
        let m = members(&status(d)?);
        (m.contains(&"a".into()) && m.contains(&"b".into())).then_some(())
    });
    assert!(
        both.is_some(),
        "both nodes listen: {:?}\na: {}\nb: {}",
        status(d),
        a.stderr(),
        b.stderr()
    );
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let r = request(i);
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&r).unwrap());
        clients.push((c, request(i), writer));
    }
    // rr: half the clients went to a, whose program accepts none of them.
    let given = wait_for(Duration::from_secs(30), || {
        let t = status(d)?;
        let (ca, cb) = (conns(&t, "a")?, conns(&t, "b")?);
        (ca + cb == CLIENTS as u64).then_some((ca, cb))
    });
    assert_eq!(
        given,
        Some((CLIENTS as u64 / 2, CLIENTS as u64 / 2)),
        "{:?}",
        status(d)
    );
    // The path under test: a's clients came as sockets, or were relayed.
    let table = status(d).unwrap();
    let a_row = table
        .split("\nNodes\n")
        .nth(1)
        .and_then(|n| n.lines().find(|l| l.trim_start().starts_with("a (")))
        .unwrap_or_default();
    assert_eq!(
        a_row.contains(", zero-relay"),
        zero_relay == "on",
        "{table}"
    );
    a.signal(libc::SIGKILL);
    assert!(
        a.wait_timeout(Duration::from_secs(10)).is_some(),
        "saps-run a is gone"
    );
    for (i, (mut c, req, writer)) in clients.into_iter().enumerate() {
        writer.join().expect("the request was sent");
        let mut got = Vec::new();
        let r = c.read_to_end(&mut got);
        assert!(
            r.is_ok(),
            "client {i}: {r:?} (reset?)\nio-server: {}\nb: {}",
            io.stderr(),
            b.stderr()
        );
        let mut want = b"B ".to_vec();
        want.extend_from_slice(&req);
        assert!(
            got == want,
            "client {i}: {} octets back, wanted {}: {:?}…\nio-server: {}",
            got.len(),
            want.len(),
            String::from_utf8_lossy(&got[..got.len().min(60)]),
            io.stderr()
        );
    }
    let table = status(d).unwrap();
    assert!(
        table.contains(&format!("redispatched {}", CLIENTS / 2)),
        "{table}"
    );
    assert_eq!(conns(&table, "b"), Some(CLIENTS as u64), "{table}");
}

#[test]
fn a_killed_relayed_node_s_unaccepted_clients_are_served_by_the_other() {
    a_killed_node_s_unaccepted_clients_are_served_by_the_other("off");
}

#[test]
fn a_killed_zero_relay_node_s_unaccepted_clients_are_served_by_the_other() {
    a_killed_node_s_unaccepted_clients_are_served_by_the_other("on");
}

//! Issue 24, timeouts and slow start, end to end: clients that never
//! close against a server that closes at once are gone within the
//! half-closed timeout (every io-server descriptor back, no active
//! connection); an idle client is closed after the idle timeout and one
//! that talks is not; a node's connect to a blackholed address fails with
//! ETIMEDOUT after `--connect-timeout`; a node that joins shows its
//! ramping weight in `status`; a flood of strangers refused before
//! authentication is logged once, not once or twice each.

use saps_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Open descriptors of process `pid`.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A standalone io-server on a unix fabric in `d` with `extra` flags.
fn io_server(d: &Path, extra: &[&str]) -> Proc {
    write_token(&d.join("token"), "timeouts secret\n");
    let fabric = format!("unix:{}", d.join("saps.sock").display());
    let mut cmd = Command::new(bin("io-server"));
    cmd.args(extra);
    start_io_server(cmd, d, &fabric, "127.0.0.1")
}

/// A relayed node (`--zero-relay off`: every byte goes through the
/// io-server's relay) running python `program` with `port`.
fn node(d: &Path, name: &str, program: &str, port: u16) -> Proc {
    Proc::spawn(unix_node(d, name, "off").args([PYTHON, "-c", program, &port.to_string()]))
}

/// Accepts each connection and closes it at once.
const CLOSES_AT_ONCE: &str = r#"
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(1024)
while True:
    c, _ = l.accept()
    c.close()
"#;

/// Echoes every connection, a thread each.
const ECHO: &str = r#"
import socket, sys, threading
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(128)
def serve(c):
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client of the node's program on `port`, once it answers: `probe`
/// is sent first and must come back (an echo), or nothing is sent.
fn connect(port: u16) -> TcpStream {
    let s = wait_for(Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    s.expect("the node's port answers")
}

/// The `Timeouts:` line of `io-server status`.
fn timeouts_line(d: &Path) -> String {
    let status = io_server_status(d).expect("status answers");
    let line = status.lines().find(|l| l.starts_with("Timeouts: "));
    line.unwrap_or_else(|| panic!("no Timeouts line:\n{status}"))
        .to_string()
}

/// The `ActiveConn` column of the group on `port`.
fn group_active(d: &Path, port: u16) -> Option<u64> {
    let status = io_server_status(d)?;
    let row = status
        .lines()
        .find(|l| l.starts_with(&format!("TCP  127.0.0.1:{port} ")))?;
    row.split_whitespace().rev().nth(4)?.parse().ok()
}

#[test]
fn clients_that_never_close_are_released_within_the_half_closed_timeout() {
    if !have("python3") {
        return;
    }
    const CLIENTS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The idle timeout far away: only the half-closed one may act.
    let io = io_server(
        d,
        &["--half-closed-timeout", "2", "--client-idle-timeout", "600"],
    );
    let port = free_port();
    let _node = node(d, "a", CLOSES_AT_ONCE, port);
    // Once the program serves, the io-server's descriptors at rest.
    drop(connect(port));
    let settled = wait_for(Duration::from_secs(20), || {
        (group_active(d, port) == Some(0)).then_some(())
    });
    assert!(settled.is_some(), "{:?}", io_server_status(d));
    let start = fds(io.pid());
    let mut clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(port)).collect();
    // Every client sees the server's FIN, and keeps its own side open.
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0, "the server's FIN");
    }
    let half_closed = Instant::now();
    let peak = fds(io.pid());
    // Back to rest, give or take a few made once per channel on first
    // use (its splice pipe), never one per client.
    let released = wait_for(Duration::from_secs(20), || {
        let now = fds(io.pid());
        (now <= start + 4 && group_active(d, port) == Some(0)).then_some(now)
    });
    let took = half_closed.elapsed();
    eprintln!(
        "io-server fds: {start} at rest, {peak} with {CLIENTS} half-closed clients, \
         {released:?} after {took:?}"
    );
    assert!(peak >= start + CLIENTS / 2, "the clients held fds: {peak}");
    assert!(released.is_some(), "fds not released: {}", fds(io.pid()));
    // 2 s, at most a quarter more (the sweep), and the test's own pace.
    assert!(took < Duration::from_secs(5), "released after {took:?}");
    let line = timeouts_line(d);
    assert!(
        line.contains(&format!("half-closed 2s (closed {CLIENTS})")),
        "{line}"
    );
    assert!(line.contains("client idle 600s (closed 0)"), "{line}");
    // The clients were reset: nothing more comes.
    for c in &mut clients {
        assert!(matches!(c.read(&mut [0u8; 16]), Ok(0) | Err(_)));
    }
}

#[test]
fn an_idle_client_is_closed_after_the_idle_timeout_and_a_talking_one_is_not() {
    if !have("python3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _io = io_server(d, &["--client-idle-timeout", "2"]);
    let port = free_port();
    let _node = node(d, "a", ECHO, port);
    let echo = |c: &mut TcpStream, what: &[u8]| {
        c.write_all(what).unwrap();
        let mut got = vec![0u8; what.len()];
        c.read_exact(&mut got).map(|_| got)
    };
    let mut idle = connect(port);
    let mut talking = connect(port);
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    talking
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(echo(&mut idle, b"once").unwrap(), b"once");
    let quiet_from = Instant::now();
    // The talking client says something every 300 ms for 5 s.
    while quiet_from.elapsed() < Duration::from_secs(5) {
        assert_eq!(echo(&mut talking, b"tick").unwrap(), b"tick");
        std::thread::park_timeout(Duration::from_millis(300));
    }
    // The idle one was closed (reset) meanwhile.
    let mut buf = [0u8; 8];
    let r = idle.read(&mut buf);
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert_eq!(echo(&mut talking, b"still").unwrap(), b"still");
    let line = timeouts_line(d);
    assert!(line.contains("client idle 2s (closed 1)"), "{line}");
}

/// Connects to `argv[1]`:`argv[2]` and prints the errno's name and the
/// seconds it took.
const CONNECTS: &str = r#"
import errno, socket, sys, time
s = socket.socket()
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", flush=True)
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno), round(time.monotonic() - t, 2), flush=True)
"#;

#[test]
fn a_connect_to_a_blackholed_address_fails_with_etimedout_after_the_connect_timeout() {
    if !have("python3") || !have("nft") {
        return;
    }
    let Some(ns) = Netns::new() else { return };
    // The namespace drops every packet that comes in: SYNs go unanswered.
    let nft = |rule: &str| {
        let o = run(ns.command("nft").args(rule.split(' ')));
        assert!(o.status.success(), "nft {rule}: {o:?}");
    };
    nft("add table inet blackhole");
    nft("add chain inet blackhole in { type filter hook input priority 0 ; policy drop ; }");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_token(&d.join("token"), "timeouts secret\n");
    let fabric = format!("unix:{}", d.join("saps.sock").display());
    let mut cmd = Command::new(bin("io-server"));
    cmd.args(["--connect-timeout", "2"]);
    let _io = start_io_server(cmd, d, &fabric, &ns.host_ip.to_string());
    let to = ns.ns_ip.to_string();
    let out = run(unix_node(d, "a", "off").args([PYTHON, "-c", CONNECTS, &to, "80"]));
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("the program said: {said}");
    let mut words = said.split_whitespace();
    assert_eq!(words.next(), Some("ETIMEDOUT"), "{out:?}");
    let secs: f64 = words.next().unwrap().parse().unwrap();
    assert!((1.9..6.0).contains(&secs), "after {secs} s");
    let line = timeouts_line(d);
    assert!(line.contains("connect 2s (timed out 1)"), "{line}");
}

#[test]
fn a_joining_node_shows_its_weight_ramping_up_in_status() {
    if !have("python3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _io = io_server(d, &["--slow-start", "20"]);
    let port = free_port();
    let _node = Proc::spawn(
        Command::new(bin("saps-run"))
            .args([
                "--io-server",
                &format!("unix:{}", d.join("saps.sock").display()),
            ])
            .arg("--token-file")
            .arg(d.join("token"))
            .args([
                "--node",
                "warm",
                "--weight",
                "100",
                "--zero-relay",
                "off",
                "--",
            ])
            .args([PYTHON, "-c", ECHO, &port.to_string()]),
    );
    // (name, weight column) of the node's row, while it ramps.
    let row = || {
        let status = io_server_status(d)?;
        let line = status
            .lines()
            .find(|l| l.starts_with("  warm ("))?
            .to_string();
        let weight: u32 = line.split_whitespace().rev().nth(5)?.parse().ok()?;
        Some((line, weight))
    };
    let (first, w1) = wait_for(Duration::from_secs(20), row).expect("the node joined");
    assert!(first.contains(", slow start to 100"), "{first}");
    assert!((1..100).contains(&w1), "{first}");
    // It goes up (the tick is 1 s; 5 % a second).
    let (later, w2) = wait_for(Duration::from_secs(20), || {
        row().filter(|&(_, w)| w >= w1 + 10)
    })
    .expect("the weight ramps up");
    assert!(later.contains(", slow start to 100"), "{later}");
    assert!(w2 < 100, "{later}");
    let line = timeouts_line(d);
    assert!(line.ends_with("slow start 20s"), "{line}");
}

#[test]
fn a_flood_of_refused_strangers_is_logged_once_not_once_or_twice_each() {
    use std::os::unix::net::UnixStream;
    const STRANGERS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = io_server(
        d,
        &[
            "--max-handshakes",
            "400",
            "--max-handshakes-per-source",
            "400",
        ],
    );
    // Each announces a frame far over the pre-authentication limit: the
    // io-server closes it at once.
    for i in 0..STRANGERS {
        let mut s = UnixStream::connect(d.join("saps.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&200_000u32.to_be_bytes()).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(!rest.is_empty(), "stranger {i} got its GoAway");
    }
    let failed = wait_for(Duration::from_secs(20), || {
        let status = io_server_status(d)?;
        status
            .contains(&format!("failed {STRANGERS};"))
            .then_some(())
    });
    assert!(failed.is_some(), "{:?}", io_server_status(d));
    let log = io.stderr();
    let lines = log
        .lines()
        .filter(|l| l.contains("exceeds the limit"))
        .count();
    assert_eq!(lines, 1, "one line for {STRANGERS} refusals:\n{log}");
}

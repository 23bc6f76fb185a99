//! Issue 24, admission, end to end: what a gateway gives a node is bounded
//! by the program's `listen` backlog and haproxy's `maxconn`/`maxqueue`/
//! `timeout queue`, and a node out of descriptors slows admission down
//! without losing a client (docs/io-server.md "Admission",
//! docs/interceptor.md "Out of descriptors").

use saps_tests::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Accepts and holds connections (reading each one's line) until it holds
/// `HOLD`, until `accept` fails (out of descriptors: EMFILE) or until no
/// client came for 0.5 s; then answers every held one ("B " and its line)
/// and closes them, and goes on.
const HOLDS_THEN_ANSWERS: &str = r#"
import select, socket, sys
HOLD = 100
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(128)
held = []
def flush():
    for c in held:
        data = b""
        c.settimeout(30)
        try:
            while not data.endswith(b"\n"):
                d = c.recv(4096)
                if not d:
                    break
                data += d
            c.sendall(b"B " + data)
        except OSError:
            pass
        c.close()
    held.clear()
while True:
    r, _, _ = select.select([l], [], [], 0.5)
    if not r:
        flush()
        continue
    try:
        c, _ = l.accept()
    except OSError as e:
        print("accept failed:", e.strerror, file=sys.stderr, flush=True)
        flush()
        continue
    held.append(c)
    if len(held) >= HOLD:
        flush()
"#;

/// `program` on `port` under node `name`; [`NEVER_ACCEPTS`] with backlog 8.
fn node(d: &Path, name: &str, zero_relay: &str, program: &str, port: u16) -> Proc {
    let port = port.to_string();
    python_node(d, name, zero_relay, program, &[&port, "8"])
}

/// An io-server on `DIR/saps.sock` with the admission flags `extra`.
fn io_server(d: &Path, extra: &[&str]) -> Proc {
    write_token(&d.join("token"), "admission secret\n");
    let mut cmd = Command::new(bin("io-server"));
    cmd.args(extra);
    let fabric = format!("unix:{}", d.join("saps.sock").display());
    start_io_server(cmd, d, &fabric, "127.0.0.1")
}

/// Waits until the group of `port` lists every one of `names`.
fn wait_members(d: &Path, names: &[&str], nodes: &[&Proc]) {
    let all = wait_for(Duration::from_secs(30), || {
        let t = io_server_status(d)?;
        let members: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("  -> "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        names.iter().all(|n| members.contains(n)).then_some(())
    });
    let errs: Vec<String> = nodes.iter().map(|n| n.stderr()).collect();
    assert!(
        all.is_some(),
        "nodes listen: {:?}\n{errs:?}",
        io_server_status(d)
    );
}

/// Descriptors process `pid` holds.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Member `name`'s unaccepted count in the admission line of the status
/// table (`… unaccepted/backlog: a 9/8, b 0/128`).
fn unaccepted(table: &str, name: &str) -> Option<usize> {
    let line = table.lines().find(|l| l.contains("unaccepted/backlog:"))?;
    let list = line.split("unaccepted/backlog: ").nth(1)?;
    let entry = list
        .split(", ")
        .find(|e| e.split(' ').next() == Some(name))?;
    entry.split(' ').nth(1)?.split('/').next()?.parse().ok()
}

/// One client: connected, its request sent, its answer read as it comes.
struct Client {
    stream: TcpStream,
    want: Vec<u8>,
    got: Vec<u8>,
}

impl Client {
    fn open(port: u16, i: usize) -> Client {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let req = format!("request {i}\n").into_bytes();
        stream.write_all(&req).expect("request sent");
        stream.set_nonblocking(true).unwrap();
        let mut want = b"B ".to_vec();
        want.extend_from_slice(&req);
        Client {
            stream,
            want,
            got: Vec::new(),
        }
    }

    /// Reads what has come; true once the whole answer is here.
    fn poll(&mut self) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        self.got == self.want
    }
}

/// A program that listens with backlog 8 and never accepts shares a group
/// with one that answers; 3000 clients arrive. The first node is given at
/// most what its backlog holds (9, as a kernel listener), the other
/// answers every other client, `status` answers throughout, and neither
/// the io-server nor the first node's saps-run grows by more than a
/// bounded number of descriptors (on main the round robin gave the first
/// node half the clients, kept in its saps-run and the io-server, and
/// never answered).
fn a_node_that_never_accepts_gets_only_its_backlog(zero_relay: &str) {
    const CLIENTS: usize = 3000;
    const WORKERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A queue of 100 and 500 connections at once: beyond them (node b's
    // program, of backlog 128, falls behind a burst) clients wait in the
    // kernel's accept queue.
    let bounds = ["--max-queue", "100", "--max-conn-per-group", "500"];
    let io = io_server(d, &bounds);
    let port = free_port();
    let a = node(d, "a", zero_relay, NEVER_ACCEPTS, port);
    wait_members(d, &["a"], &[&a]);
    let b = node(d, "b", zero_relay, ANSWERS, port);
    wait_members(d, &["a", "b"], &[&a, &b]);
    let (io_base, a_base) = (fds(io.pid()), fds(a.pid()));
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (answered, stop) = (answered.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut clients: Vec<Client> = Vec::new();
                let poll = |clients: &mut Vec<Client>| {
                    let before = clients.len();
                    clients.retain_mut(|c| !c.poll());
                    answered.fetch_add(before - clients.len(), Ordering::Relaxed);
                };
                // Clients read their answers as they come, while more open.
                for i in (w..CLIENTS).step_by(WORKERS) {
                    clients.push(Client::open(port, i));
                    poll(&mut clients);
                }
                while !stop.load(Ordering::Relaxed) {
                    poll(&mut clients);
                    std::thread::sleep(Duration::from_millis(20));
                }
                clients.len()
            })
        })
        .collect();
    let (mut io_max, mut a_max, mut statuses) = (io_base, a_base, 0);
    let t0 = Instant::now();
    let done = wait_for(Duration::from_secs(180), || {
        io_max = io_max.max(fds(io.pid()));
        a_max = a_max.max(fds(a.pid()));
        let started = Instant::now();
        let table = io_server_status(d)?;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "status took {:?}",
            started.elapsed()
        );
        statuses += 1;
        let held = unaccepted(&table, "a")?;
        (answered.load(Ordering::Relaxed) + held == CLIENTS).then_some((held, table))
    });
    stop.store(true, Ordering::Relaxed);
    let waiting: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let Some((held, table)) = done else {
        panic!(
            "{} of {CLIENTS} answered in {:?}:\n{:?}\nio-server: {}\nb: {}",
            answered.load(Ordering::Relaxed),
            t0.elapsed(),
            io_server_status(d),
            io.stderr(),
            b.stderr()
        );
    };
    eprintln!(
        "{zero_relay}: {CLIENTS} clients in {:?}; node a holds {held}; fds io-server {io_base} -> max {io_max}, \
         saps-run a {a_base} -> max {a_max}; {statuses} status answers\n{table}",
        t0.elapsed()
    );
    assert!(held <= 9, "a holds at most backlog + 1: {table}");
    assert_eq!(waiting, held, "every other client was answered");
    // The queue and the group's connections (relayed: one descriptor
    // each while they last), and a few in passing.
    assert!(
        io_max <= io_base + 100 + 500 + 50,
        "io-server fds {io_base} -> {io_max}"
    );
    assert!(a_max <= a_base + 40, "saps-run a fds {a_base} -> {a_max}");
}

#[test]
fn a_relayed_node_that_never_accepts_gets_only_its_backlog() {
    a_node_that_never_accepts_gets_only_its_backlog("off");
}

#[test]
fn a_zero_relay_node_that_never_accepts_gets_only_its_backlog() {
    a_node_that_never_accepts_gets_only_its_backlog("on");
}

/// With `--max-conn-per-node 1` and a node whose program never accepts, a
/// second client waits in the group's queue and is closed once it has
/// waited `--queue-timeout` (1 s), and counted; the first stays with the
/// node (on main the second went to the node too and waited for ever).
#[test]
fn a_client_queued_past_the_queue_timeout_is_closed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flags = ["--max-conn-per-node", "1", "--queue-timeout", "1"];
    let io = io_server(d, &flags);
    let port = free_port();
    let a = node(d, "a", "off", NEVER_ACCEPTS, port);
    wait_members(d, &["a"], &[&a]);
    let mut first = Client::open(port, 1);
    let given = wait_for(Duration::from_secs(10), || {
        (unaccepted(&io_server_status(d)?, "a")? == 1).then_some(())
    });
    assert!(given.is_some(), "{:?}", io_server_status(d));
    let t0 = Instant::now();
    let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    second.write_all(b"request 2\n").unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let r = second.read(&mut [0u8; 16]);
    let waited = t0.elapsed();
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
        "the queued client is closed, not answered or left waiting: {r:?} after {waited:?}\n{}",
        io.stderr()
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after the queue timeout: {waited:?}"
    );
    let table = io_server_status(d).unwrap();
    assert!(table.contains("queued 1, timed out 1"), "{table}");
    assert!(
        io.stderr().contains("past --queue-timeout"),
        "logged: {}",
        io.stderr()
    );
    assert!(!first.poll(), "the first client is still the node's");
    assert!(
        matches!(first.stream.read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock)
    );
}

/// A node whose saps-run and program may hold 64 descriptors
/// (`RLIMIT_NOFILE`), while 500 clients keep arriving to a program that
/// holds up to 100 connections before answering them: both run out of
/// descriptors again and again, and every client gets its answer (on main
/// saps-run reset the clients whose socket pair it could not make, or lost
/// the handed-over socket the kernel dropped from `recvmsg`).
fn a_node_out_of_descriptors_loses_no_client(zero_relay: &str) {
    const CLIENTS: usize = 500;
    const AT_ONCE: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = io_server(d, &[]);
    let port = free_port();
    let mut cmd = unix_node(d, "a", zero_relay);
    cmd.args([PYTHON, "-c", HOLDS_THEN_ANSWERS, &port.to_string()]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the
    // child between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &lim) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let a = Proc::spawn(&mut cmd);
    wait_members(d, &["a"], &[&a]);
    let t0 = Instant::now();
    let mut answered = 0;
    for round in 0..CLIENTS / AT_ONCE {
        let mut clients: Vec<Client> = (0..AT_ONCE)
            .map(|i| Client::open(port, round * AT_ONCE + i))
            .collect();
        let all = wait_for(Duration::from_secs(60), || {
            clients.retain_mut(|c| !c.poll());
            clients.is_empty().then_some(())
        });
        assert!(
            all.is_some(),
            "round {round}: {} of {AT_ONCE} clients never answered: {:?}\nio-server: {}\nsaps-run: {}",
            clients.len(),
            clients.iter().map(|c| String::from_utf8_lossy(&c.got).into_owned()).collect::<Vec<_>>(),
            io.stderr(),
            a.stderr()
        );
        answered += AT_ONCE;
    }
    let err = a.stderr();
    let (node_short, program_short) = (
        err.contains("out of descriptors"),
        err.matches("accept failed: Too many open files").count(),
    );
    eprintln!(
        "{zero_relay}: {answered} clients answered in {:?}; saps-run ran short of descriptors: \
         {node_short}; the program's accept failed with EMFILE {program_short} times",
        t0.elapsed()
    );
    assert!(node_short, "the node did run out of descriptors: {err}");
}

#[test]
fn a_relayed_node_out_of_descriptors_loses_no_client() {
    a_node_out_of_descriptors_loses_no_client("off");
}

#[test]
fn a_zero_relay_node_out_of_descriptors_loses_no_client() {
    a_node_out_of_descriptors_loses_no_client("on");
}

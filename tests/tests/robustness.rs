//! A program that does odd things gets the kernel's answers, and the
//! supervisor keeps serving it.

use saps_tests::*;
use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// `NAME::relayed` and `NAME::zero_relay`: the test `NAME` with
/// `--zero-relay off` and with `on`.
macro_rules! in_both_modes {
    ($name:ident) => {
        mod $name {
            #[test]
            fn relayed() {
                super::$name("off");
            }

            #[test]
            fn zero_relay() {
                super::$name("on");
            }
        }
    };
}

/// Garbage pointers to connect/accept/getsockname/setsockopt give EFAULT;
/// the connection whose accept failed is not lost: the next accept gets it.
const ODD_PROGRAM: &str = r#"
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(r):
    return ctypes.get_errno() if r < 0 else 0
s = socket.socket()
print("connect", errno_of(libc.connect(s.fileno(), ctypes.c_void_p(1), 16)), flush=True)
print("setsockopt", errno_of(libc.setsockopt(s.fileno(), 1, 2, ctypes.c_void_p(8), 4)), flush=True)
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(8)
print("getsockname", errno_of(libc.getsockname(l.fileno(), ctypes.c_void_p(16), ctypes.c_void_p(16))), flush=True)
print("listening", flush=True)
n = ctypes.c_uint32(16)
while True:
    r = libc.accept4(l.fileno(), ctypes.c_void_p(1), ctypes.byref(n), 0)
    if r >= 0 or ctypes.get_errno() != 4:
        break
print("accept", errno_of(r), flush=True)
c, peer = l.accept()
c.sendall(b"still here " + peer[0].encode())
c.close()
"#;

fn bad_pointers_get_efault_and_the_connection_survives(zero_relay: &str) {
    let port = free_port();
    let p = Proc::spawn(&mut saps_run_local(
        zero_relay,
        &[PYTHON, "-c", ODD_PROGRAM, &port.to_string()],
    ));
    assert!(
        wait_for(Duration::from_secs(20), || p
            .stdout()
            .contains("listening")
            .then_some(()))
        .is_some(),
        "stdout: {}\nstderr: {}",
        p.stdout(),
        p.stderr()
    );
    let mut c = wait_for(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .expect("connecting through the io-server");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "still here 127.0.0.1");
    let out = p.stdout();
    let efault = libc::EFAULT.to_string();
    for call in ["connect", "setsockopt", "getsockname", "accept"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(call))
            .unwrap_or_else(|| panic!("no {call} line in {out}"));
        assert_eq!(line, format!("{call} {efault}"), "{out}");
    }
}

in_both_modes!(bad_pointers_get_efault_and_the_connection_survives);

#[test]
fn udp_and_unix_sockets_are_untouched() {
    let script = r#"
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
u.sendto(b"ping", u.getsockname())
assert u.recv(4) == b"ping"
a, b = socket.socketpair()
a.sendall(b"x"); assert b.recv(1) == b"x"
print("ok")
"#;
    let o = run(Command::new(bin("saps-run")).args(["--", PYTHON, "-c", script]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
}

/// Listens, closes the listener (untrapped: the supervisor learns of it
/// only when it next looks), waits for the test's go (a file) and listens
/// on the same port again, as iperf3 does between tests.
const RELISTEN_PROGRAM: &str = r#"
go = arg
l = listener(8)
print("listening", flush=True)
c, _ = l.accept()
c.sendall(b"first")
c.close()
l.close()
print("closed", flush=True)
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
l = listener(8)
c, peer = l.accept()
c.sendall(b"second " + c.recv(16))
c.close()
"#;

fn read_reply(port: u16, send: &[u8]) -> std::io::Result<String> {
    use std::io::Write;
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(send)?;
    let mut got = String::new();
    c.read_to_string(&mut got)?;
    Ok(got)
}

/// The reply a client got is `want` (else the failure shows the program's
/// log).
fn assert_reply(got: std::io::Result<String>, want: &str, p: &Proc) {
    assert_eq!(got.as_deref().ok(), Some(want), "{got:?}\n{}", p.stderr());
}

/// Waits (bounded) until `p` printed `what`; all it printed by then.
fn said(p: &Proc, what: &str) -> String {
    wait_for(Duration::from_secs(20), || {
        let o = p.stdout();
        o.contains(what).then_some(o)
    })
    .unwrap_or_else(|| panic!("no {what:?}: {}\n{}", p.stdout(), p.stderr()))
}

/// What the python programs below start with: their port and argument
/// (`port`, `arg`) and `listener(backlog)` on that port.
const PRELUDE: &str = r#"
import os, select, socket, sys, time
port, arg = int(sys.argv[1]), sys.argv[2]
def listener(backlog):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port))
    l.listen(backlog)
    return l
def serve_one(l):
    c, _ = l.accept()
    c.setblocking(True)
    c.sendall(b"served " + c.recv(16))
    c.close()
"#;

/// saps-run running the python program `body` (after [`PRELUDE`]) with
/// `port` and `arg`.
fn python_under_saps(zero_relay: &str, body: &str, port: u16, arg: &str) -> Command {
    let program = format!("{PRELUDE}{body}");
    saps_run_local(
        zero_relay,
        &[PYTHON, "-c", &program, &port.to_string(), arg],
    )
}

/// [`python_under_saps`], started, once the program says "listening".
fn serve_python(zero_relay: &str, body: &str, port: u16, arg: &str) -> Proc {
    let p = Proc::spawn(&mut python_under_saps(zero_relay, body, port, arg));
    said(&p, "listening");
    p
}

/// A client that arrives between the program closing a listener and
/// listening on the same port again is served by the new listener, even
/// when the io-server sent it to the old one before anyone knew it closed.
fn a_client_between_close_and_relisten_reaches_the_new_listener(zero_relay: &str) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let mut cmd = python_under_saps(zero_relay, RELISTEN_PROGRAM, port, go.to_str().unwrap());
    // Debug logs say where the client waits.
    cmd.env("RUST_LOG", "saps_interceptor=debug,saps_io_server=debug");
    let p = Proc::spawn(&mut cmd);
    said(&p, "listening");
    assert_eq!(read_reply(port, b"").unwrap(), "first");
    said(&p, "closed");
    // On its way to the closed listener (the io-server still has it).
    let client = std::thread::spawn(move || read_reply(port, b"again"));
    // It waits either on the node, which found the old listener closed,
    // or in the io-server, which learnt of the close first.
    wait_for(Duration::from_secs(20), || {
        let e = p.stderr();
        (e.contains("connection waits for a listener on its address")
            || e.contains("no eligible member: client queued"))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("the client waits nowhere: {}", p.stderr()));
    std::fs::write(&go, b"").unwrap();
    let got = client.join().unwrap();
    assert_reply(got, "second again", &p);
}

in_both_modes!(a_client_between_close_and_relisten_reaches_the_new_listener);

/// `arg` rounds of: listen, serve one client, close the listener, and at
/// once bind the port again (iperf3 does this between tests, and servers
/// that restart a listener).
const ROUNDS_PROGRAM: &str = r#"
for i in range(int(arg)):
    l = listener(1)
    print("listening", i, flush=True)
    serve_one(l)
    l.close()
print("done", flush=True)
"#;

/// A listener closed right after its accept frees its port for the
/// program's next bind, in every round: the supervisor must not hold a
/// duplicate of the listener past the accept's answer (it once did, for
/// the instant the answer took, and a bind made in that instant failed
/// with `EADDRINUSE` in about one round in fifteen). Each client connects
/// once its round's listener listens (natively one connecting earlier
/// could be queued on the listener about to close, and reset), sometimes
/// before the program's accept (answered at once), sometimes during it.
fn a_listener_closed_after_its_accept_is_bound_again_at_once(zero_relay: &str) {
    const ROUNDS: usize = 40;
    let port = free_port();
    let p = serve_python(zero_relay, ROUNDS_PROGRAM, port, &ROUNDS.to_string());
    for i in 0..ROUNDS {
        said(&p, &format!("listening {i}\n"));
        let got = read_reply(port, i.to_string().as_bytes());
        assert_reply(got, &format!("served {i}"), &p);
    }
    said(&p, "done");
}

in_both_modes!(a_listener_closed_after_its_accept_is_bound_again_at_once);

/// Accepts `n` clients on a non-blocking listener as select() reports
/// them, answers each, then checks that the listener polls unreadable and
/// the next accept is EAGAIN; says "bogus" for anything accepted that is
/// not a client and "spurious" for a readable listener with nothing in it.
const BURST_PROGRAM: &str = r#"
n = int(arg)
l = listener(128)
l.setblocking(False)
print("listening", flush=True)
clients = []
while len(clients) < n:
    select.select([l], [], [], 20)
    try:
        c, peer = l.accept()
    except BlockingIOError:
        continue
    if peer[0] != "127.0.0.1":
        print("bogus", peer, flush=True)
    clients.append(c)
for c in clients:
    c.setblocking(True)
    c.sendall(c.recv(16) + b" from " + c.getpeername()[0].encode())
    c.close()
# Nothing waits any more: the listener must not poll readable (a program
# that selects and then blocks in accept, as iperf3 does, would hang) ...
if select.select([l], [], [], 0.2)[0]:
    print("spurious", flush=True)
# ... nor give anything.
try:
    c, peer = l.accept()
    print("bogus", peer, flush=True)
except BlockingIOError:
    print("drained", flush=True)
"#;

/// Many clients arriving at once are all accepted, each once, with its
/// address, and then the listener has nothing more (the connections wait
/// in a queue behind a few marker connections on the listener's `L`,
/// which the program must never be given).
fn a_burst_of_clients_is_accepted_once_each(zero_relay: &str) {
    const N: usize = 40;
    let port = free_port();
    let p = serve_python(zero_relay, BURST_PROGRAM, port, &N.to_string());
    let clients: Vec<_> = (0..N)
        .map(|i| std::thread::spawn(move || read_reply(port, format!("c{i}").as_bytes())))
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let got = c.join().unwrap();
        assert_eq!(
            got.as_deref().ok(),
            Some(format!("c{i} from 127.0.0.1").as_str()),
            "{got:?}\n{}",
            p.stderr()
        );
    }
    let out = said(&p, "drained");
    assert!(!out.contains("bogus") && !out.contains("spurious"), "{out}");
}

in_both_modes!(a_burst_of_clients_is_accepted_once_each);

/// Two processes wait on one listener with `EPOLLEXCLUSIVE`, as nginx's
/// workers do; each says "woken" when its epoll_wait returns and accepts
/// nothing until the test's "go" file exists, so the queue only grows.
/// Then both accept and answer with their role.
const EXCLUSIVE_PROGRAM: &str = r#"
go = arg
l = listener(128)
l.setblocking(False)
role = "child" if os.fork() == 0 else "parent"
ep = select.epoll()
ep.register(l.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
print("listening" if role == "parent" else "waiting child", flush=True)
if ep.poll(30):
    print(f"woken {role}", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
while True:
    ep.poll(30)
    try:
        c, _ = l.accept()
    except BlockingIOError:
        continue
    c.setblocking(True)
    c.sendall(c.recv(16) + b" from " + role.encode())
    c.close()
"#;

/// A burst of clients wakes more than one process waiting on the listener
/// with `EPOLLEXCLUSIVE` (one marker on `L` for the whole burst woke just
/// one: nginx's first worker took every connection of wrk's burst).
fn a_burst_wakes_more_than_one_exclusive_waiter(zero_relay: &str) {
    const N: usize = 12;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let p = serve_python(zero_relay, EXCLUSIVE_PROGRAM, port, go.to_str().unwrap());
    said(&p, "waiting child");
    let clients: Vec<_> = (0..N)
        .map(|i| std::thread::spawn(move || read_reply(port, format!("c{i}").as_bytes())))
        .collect();
    said(&p, "woken parent");
    said(&p, "woken child");
    std::fs::write(&go, b"").unwrap();
    for (i, c) in clients.into_iter().enumerate() {
        let got = c.join().unwrap();
        let got = got.as_deref().unwrap_or("");
        assert!(
            [format!("c{i} from parent"), format!("c{i} from child")].contains(&got.to_string()),
            "{got:?}\n{}",
            p.stderr()
        );
    }
}

in_both_modes!(a_burst_wakes_more_than_one_exclusive_waiter);

/// Serves `n` clients one after another with select() and a blocking
/// accept, as iperf3 does; before answering each it says "spurious" if
/// the listener polls readable (no other client exists at that moment).
const SEQUENTIAL_PROGRAM: &str = r#"
n = int(arg)
l = listener(8)
print("listening", flush=True)
for i in range(n):
    select.select([l], [], [], 20)
    c, peer = l.accept()
    data = c.recv(16)
    if select.select([l], [], [], 0.005)[0]:
        print("spurious", i, flush=True)
    c.sendall(data)
    c.close()
print("done", flush=True)
"#;

/// A listener polls readable exactly when a client waits: clients one
/// at a time never leave it readable with nothing to accept (in zero-relay
/// mode the marker connection must leave `L` with the last queued socket).
fn sequential_clients_leave_no_spurious_readiness(zero_relay: &str) {
    const N: usize = 200;
    let port = free_port();
    let p = serve_python(zero_relay, SEQUENTIAL_PROGRAM, port, &N.to_string());
    for i in 0..N {
        let msg = format!("c{i}");
        let got = read_reply(port, msg.as_bytes());
        assert_eq!(
            got.as_deref().ok(),
            Some(msg.as_str()),
            "{got:?}\n{}",
            p.stdout()
        );
    }
    let out = said(&p, "done");
    assert!(!out.contains("spurious"), "{out}");
}

in_both_modes!(sequential_clients_leave_no_spurious_readiness);

/// Listens once (the io-server holds back its answer, see below) and
/// answers the first client.
const EARLY_CLIENT_PROGRAM: &str = r#"
l = listener(8)
print("listening", flush=True)
serve_one(l)
"#;

/// A client that reaches the node before the node knows its listener (the
/// io-server listens at once but answers the Listen late, as a same-host
/// hand-off overtaking the fabric's answer does by itself) waits for the
/// listener instead of being reset.
fn a_client_before_the_listen_answer_is_served(zero_relay: &str) {
    let port = free_port();
    let mut cmd = python_under_saps(zero_relay, EARLY_CLIENT_PROGRAM, port, "");
    // Held back half of RELISTEN_GRACE (1 s), the longest a client waits
    // on the node for its listener: the client, trying every 5 ms, is
    // there long before the answer, which comes long before it gives up.
    cmd.env("SAPS_TEST_LISTEN_REPLY_DELAY_MS", "500")
        .env("RUST_LOG", "saps_interceptor=debug");
    let p = Proc::spawn(&mut cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let client = loop {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens: {}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        !p.stdout().contains("listening"),
        "listen() returned before the client connected: {}",
        p.stderr()
    );
    let got = {
        use std::io::Write;
        let mut c = client;
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"early").unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).map(|_| got)
    };
    assert_reply(got, "served early", &p);
    assert!(
        p.stderr()
            .contains("connection waits for its listener to be made"),
        "the client did not arrive before the listener: {}",
        p.stderr()
    );
    said(&p, "listening");
}

in_both_modes!(a_client_before_the_listen_answer_is_served);

/// Reads from its own listener once a client waits (no server does; the
/// kernel would say ENOTCONN), then waits for the listener to poll
/// readable and accepts.
const READS_ITS_LISTENER: &str = r#"
l = listener(8)
l.setblocking(False)
print("listening", flush=True)
select.select([l], [], [], 20)
try:
    got = os.read(l.fileno(), 16)
except OSError:
    got = b""
print("read", len(got), flush=True)
r, _, _ = select.select([l], [], [], 20)
print("readable", bool(r), flush=True)
serve_one(l)
"#;

/// A program that reads what makes its listener readable still gets its
/// client: the supervisor notices and makes the listener readable again.
fn a_program_reading_its_listener_still_accepts(zero_relay: &str) {
    let port = free_port();
    let mut cmd = python_under_saps(zero_relay, READS_ITS_LISTENER, port, "");
    cmd.env("RUST_LOG", "saps_interceptor=warn");
    let p = Proc::spawn(&mut cmd);
    said(&p, "listening");
    let client = std::thread::spawn(move || read_reply(port, b"odd"));
    said(&p, "readable True");
    let got = client.join().unwrap();
    assert_reply(got, "served odd", &p);
}

in_both_modes!(a_program_reading_its_listener_still_accepts);

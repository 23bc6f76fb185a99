//! Problems real programs met under saps-run (issue 17), each as the
//! program that met it: the supervisor must answer as the kernel would and
//! never hang. The line-by-line comparison with the kernel is the
//! conformance suite (`conformance.rs`); these are the cases that need
//! several processes, a trace, or a look from outside.

use saps_tests::*;
use std::process::Command;
use std::time::Duration;

/// Several processes each close, again and again, a listener with clients
/// queued on it and bind its port again. Closing such a listener once
/// deadlocked the supervisor: it held the listeners' lock while moving the
/// queue to the orphans, which take that lock again.
const CLOSE_WITH_CLIENTS_QUEUED: &str = r#"
import os, select, socket, sys
procs, rounds = int(sys.argv[1]), int(sys.argv[2])
def one():
    for r in range(rounds):
        l = socket.socket()
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", 0))
        port = l.getsockname()[1]
        l.listen(8)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        # The clients wait in the listener's queue: it polls readable.
        if not select.select([l], [], [], 10)[0]:
            sys.exit("round %d: the listener never became readable" % r)
        l.close()
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("0.0.0.0", port))
        again.close()
        for c in clients:
            c.close()
kids = []
for _ in range(procs):
    pid = os.fork()
    if pid == 0:
        one()
        os._exit(0)
    kids.append(pid)
bad = sum(os.waitpid(k, 0)[1] != 0 for k in kids)
print("done", bad, flush=True)
sys.exit(1 if bad else 0)
"#;

fn closing_listeners_with_clients_queued_never_hangs(zero_relay: &str, trace: bool) {
    let mut cmd = Command::new(bin("saps-run"));
    cmd.args(["--address", "127.0.0.1", "--zero-relay", zero_relay]);
    if trace {
        cmd.args(["--trace", "-o", "/dev/null"]);
    }
    cmd.args(["--", PYTHON, "-c", CLOSE_WITH_CLIENTS_QUEUED, "3", "8"]);
    let mut p = Proc::spawn(&mut cmd);
    let status = p.wait_timeout(Duration::from_secs(90));
    assert_eq!(
        status,
        Some(0),
        "saps-run did not finish (a hung supervisor?)\nstdout: {}\nstderr: {}",
        p.stdout(),
        p.stderr()
    );
    assert!(p.stdout().contains("done 0"), "{}", p.stdout());
}

#[test]
fn closing_listeners_with_clients_queued_never_hangs_zero_relay() {
    closing_listeners_with_clients_queued_never_hangs("on", false);
}

#[test]
fn closing_listeners_with_clients_queued_never_hangs_relayed() {
    closing_listeners_with_clients_queued_never_hangs("off", false);
}

#[test]
fn closing_listeners_with_clients_queued_never_hangs_traced() {
    closing_listeners_with_clients_queued_never_hangs("on", true);
}

/// One thread binds, again and again, to an address that another thread
/// flips between `127.0.0.1:P` and `0.0.0.0:P+1`. A loopback bind stays on
/// the node (a real socket); answered with CONTINUE, the kernel read the
/// address a second time and could bind that real socket to `0.0.0.0`: a
/// socket of the program listening on every address of the node, outside
/// SAPS. The supervisor now makes the bind itself with the address it
/// read, so a real socket is only ever bound to loopback. (A virtual
/// socket is an AF_UNIX placeholder or a TCP one of a network namespace of
/// its own: `SIOCGSKNS` tells them from the node's real sockets.)
const FLIP_THE_ADDRESS: &str = r#"
import ctypes, fcntl, os, socket, struct, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
port, rounds = int(sys.argv[1]), int(sys.argv[2])
def sin(ip, port):
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, socket.inet_aton(ip))
lo, anyaddr = sin("127.0.0.1", port), sin("0.0.0.0", port + 1)
buf = ctypes.create_string_buffer(lo, 16)
stop = False
def flip():
    while not stop:
        ctypes.memmove(buf, anyaddr, 16)
        ctypes.memmove(buf, lo, 16)
t = threading.Thread(target=flip)
t.start()
def is_unix(ino):
    with open("/proc/net/unix") as f:
        return any(line.split()[6] == str(ino) for line in f.readlines()[1:] if len(line.split()) > 6)
SIOCGSKNS = 0x894C
own_netns = os.stat("/proc/self/ns/net").st_ino
def is_native(fd):
    # A real socket of the node: a TCP socket of the program's own network
    # namespace (a placeholder is AF_UNIX, or TCP of a namespace of its own).
    if is_unix(os.stat("/proc/self/fd/%d" % fd).st_ino):
        return False
    ns = fcntl.ioctl(fd, SIOCGSKNS)
    try:
        return os.fstat(ns).st_ino == own_netns
    finally:
        os.close(ns)
escapes = native = 0
for i in range(rounds):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if libc.bind(s.fileno(), buf, 16) == 0:
        if is_native(s.fileno()):
            native += 1
            if s.getsockname()[0] != "127.0.0.1":
                escapes += 1
    s.close()
stop = True
t.join()
print("escapes", escapes, "native", native, flush=True)
"#;

#[test]
fn a_loopback_bind_never_binds_an_address_read_a_second_time() {
    let port = free_port();
    let p = Proc::spawn(&mut saps_run_local(
        "on",
        &[PYTHON, "-c", FLIP_THE_ADDRESS, &port.to_string(), "1000"],
    ));
    let out = wait_for(Duration::from_secs(120), || {
        let o = p.stdout();
        o.contains("escapes").then_some(o)
    })
    .unwrap_or_else(|| panic!("no result: {}\n{}", p.stdout(), p.stderr()));
    let (escapes, native) = parse_counts(&out);
    assert!(native > 0, "no loopback bind was made native: {out}");
    assert_eq!(escapes, 0, "real sockets bound outside loopback: {out}");
}

/// `escapes E native N` → (E, N).
fn parse_counts(out: &str) -> (u32, u32) {
    let w: Vec<&str> = out.split_whitespace().collect();
    let at = |k: &str| {
        w.iter()
            .position(|x| *x == k)
            .and_then(|i| w.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {out}"))
    };
    (at("escapes"), at("native"))
}

/// `recv` and `send` on a socket never connected: not trapped, so they are
/// the placeholder's answers. A TCP placeholder of a namespace of its own
/// answers as the kernel; where none can be made (the test hook stands for
/// a user refused user namespaces), the AF_UNIX one answers as documented
/// (docs/interceptor.md, "Departures" 2).
const FRESH_SOCKET_CALLS: &str = r#"
import errno, socket
s = socket.socket()
def e(f, *a):
    try:
        f(*a)
        return "ok"
    except OSError as x:
        return errno.errorcode[x.errno]
print("recv", e(s.recv, 1), "send", e(s.send, b"x"), flush=True)
"#;

fn fresh_socket_calls(cmd: &mut Command) -> String {
    let mut p = Proc::spawn(cmd);
    let status = p.wait_timeout(Duration::from_secs(30));
    assert_eq!(status, Some(0), "{}", p.stderr());
    p.stdout().trim().to_string()
}

#[test]
fn an_unconnected_socket_answers_as_the_kernel_or_as_documented_without_a_namespace() {
    let native = fresh_socket_calls(Command::new(PYTHON).args(["-c", FRESH_SOCKET_CALLS]));
    assert_eq!(native, "recv ENOTCONN send EPIPE");
    let virtual_tcp = fresh_socket_calls(&mut saps_run_local(
        "off",
        &[PYTHON, "-c", FRESH_SOCKET_CALLS],
    ));
    assert_eq!(virtual_tcp, native);
    let mut cmd = saps_run_local("off", &[PYTHON, "-c", FRESH_SOCKET_CALLS]);
    cmd.env("SAPS_TEST_AF_UNIX_PLACEHOLDERS", "1");
    assert_eq!(fresh_socket_calls(&mut cmd), "recv EINVAL send ENOTCONN");
}

//! A program that does odd things gets the kernel's answers, and the
//! supervisor keeps serving it.

use saps_tests::*;
use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

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

#[test]
fn bad_pointers_get_efault_and_the_connection_survives_relayed() {
    bad_pointers_get_efault_and_the_connection_survives("off");
}

#[test]
fn bad_pointers_get_efault_and_the_connection_survives_zero_relay() {
    bad_pointers_get_efault_and_the_connection_survives("on");
}

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

//! `io-server --stack smoltcp`: the single address lives on a TAP the
//! io-server owns (smoltcp's TCP, `stack/`), and programs under saps-run
//! serve through it. A namespace `gw` holds the TAP (its kernel side
//! 192.0.2.1/24, the single address 192.0.2.2 is the io-server's alone)
//! and routes to a client namespace behind a veth (198.51.100.0/24).
//! Nodes join over a unix fabric and are relayed (no hand-off on the
//! stack). Root, /dev/net/tun, `ip` and python3 are needed: without them
//! the tests skip with a reason (and fail under CI=true).

use saps_tests::*;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The single address, on the TAP's link (TEST-NET-1).
const SINGLE: &str = "192.0.2.2";
/// The kernel's side of the TAP: the stack's gateway.
const TAP_GW: &str = "192.0.2.1";
/// The client namespace's address (TEST-NET-2) and its router.
const CLIENT: &str = "198.51.100.2";
const ROUTER: &str = "198.51.100.1";

fn sh(cmd: &str) -> Result<(), String> {
    let o = run(Command::new("sh").args(["-c", cmd]));
    match o.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

/// The namespaces, the TAP (made persistent, its link up, for the
/// io-server to open by name) and an io-server on it; removed when
/// dropped (the io-server first: field order).
struct Layout {
    io: Option<Proc>,
    dir: tempfile::TempDir,
    gw: String,
    client: String,
}

impl Layout {
    fn new() -> Option<Layout> {
        if !have("ip") || !have("python3") {
            return None;
        }
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            cannot_run("the smoltcp stack's tests need root (namespaces, a TAP)");
            return None;
        }
        if !Path::new("/dev/net/tun").exists() {
            cannot_run("no /dev/net/tun (TUN/TAP driver)");
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut l = Layout {
            io: None,
            dir: tempfile::tempdir().unwrap(),
            gw: format!("ssw-g{id}"),
            client: format!("ssw-c{id}"),
        };
        let (g, c) = (l.gw.clone(), l.client.clone());
        let (veth, tap) = (format!("ssw{id}"), format!("sswt{id}"));
        let steps = [
            format!("ip netns add {g}"),
            format!("ip netns add {c}"),
            format!("ip link add {veth} netns {g} type veth peer name {veth}p netns {c}"),
            format!("ip -n {g} link set lo up"),
            format!("ip -n {c} link set lo up"),
            format!("ip -n {g} addr add {ROUTER}/24 dev {veth}"),
            format!("ip -n {g} link set {veth} up"),
            format!("ip -n {c} addr add {CLIENT}/24 dev {veth}p"),
            format!("ip -n {c} link set {veth}p up"),
            format!("ip -n {c} route add default via {ROUTER}"),
            format!("ip netns exec {g} sysctl -qw net.ipv4.ip_forward=1"),
            format!("ip -n {g} tuntap add dev {tap} mode tap"),
            format!("ip -n {g} addr add {TAP_GW}/24 dev {tap}"),
            format!("ip -n {g} link set {tap} up"),
        ];
        for s in &steps {
            if let Err(e) = sh(s) {
                cannot_run(&format!("cannot make the namespaces ({e})"));
                return None;
            }
        }
        write_token(&l.dir.path().join("token"), "cluster secret\n");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &g])
            .arg(bin("io-server"))
            .args(["--stack", "smoltcp", "--tap", &tap])
            .args(["--tap-gateway", TAP_GW, "--connect-timeout", "10"]);
        let fabric = format!("unix:{}", l.dir.path().join("saps.sock").display());
        l.io = Some(start_io_server(cmd, l.dir.path(), &fabric, SINGLE));
        Some(l)
    }

    fn d(&self) -> &Path {
        self.dir.path()
    }

    /// A command in the client namespace.
    fn in_client(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client, program]);
        c
    }

    fn io_stderr(&self) -> String {
        self.io.as_ref().map(Proc::stderr).unwrap_or_default()
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        self.io.take();
        let _ = sh(&format!("ip netns del {}", self.gw));
        let _ = sh(&format!("ip netns del {}", self.client));
    }
}

/// A port for a program under saps-run: on the stack, any port; one of
/// the tests' usual range.
fn port() -> u16 {
    free_port()
}

#[test]
fn python_http_server_answers_a_client_in_another_namespace_and_sees_its_address() {
    let Some(l) = Layout::new() else { return };
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("hello.txt"), "hello through the TAP\n").unwrap();
    let port = port();
    let mut cmd = unix_node(l.d(), "web", "off");
    cmd.args([PYTHON, "-u", "-m", "http.server", &port.to_string()])
        .current_dir(www.path());
    let server = Proc::spawn(&mut cmd);
    let url = format!("http://{SINGLE}:{port}/hello.txt");
    let got = wait_for(Duration::from_secs(30), || {
        let o = run(l.in_client("curl").args(["-sS", "--max-time", "5", &url]));
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    assert_eq!(
        got.as_deref(),
        Some("hello through the TAP\n"),
        "program:\n{}\nio-server:\n{}",
        server.stderr(),
        l.io_stderr()
    );
    // http.server logs "ADDRESS - - [date] "GET /hello.txt HTTP/1.1" 200 -".
    let logged = wait_for(Duration::from_secs(5), || {
        let log = server.stderr();
        log.lines()
            .find(|l| l.contains("GET /hello.txt"))
            .map(str::to_owned)
    })
    .expect("python logged the request");
    assert!(
        logged.starts_with(&format!("{CLIENT} ")),
        "python should log the client's address {CLIENT}: {logged}"
    );
    let status = io_server_status(l.d()).expect("status answers");
    assert!(status.contains("Stack smoltcp: sockets"), "{status}");
}

/// Echoes every connection back (a thread each), half-closing after.
const ECHO_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
def echo(c):
    while True:
        b = c.recv(65536)
        if not b:
            c.shutdown(socket.SHUT_WR)
            break
        c.sendall(b)
    c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// Sends 100 MiB of deterministic bytes while reading the echo; prints
/// the digests of both and the count received.
const ECHO_CLIENT: &str = r#"
import hashlib, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
block, blocks = 65536, 1600
def send():
    h = hashlib.sha256()
    seed = hashlib.sha256(b"saps").digest()
    for i in range(blocks):
        b = (hashlib.sha256(seed + i.to_bytes(4, "little")).digest() * (block // 32))
        h.update(b)
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
    sent.append(h.hexdigest())
sent = []
t = threading.Thread(target=send)
t.start()
h, n = hashlib.sha256(), 0
while True:
    b = s.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
t.join(120)
print(sent[0] if sent else "none", h.hexdigest(), n)
"#;

#[test]
fn a_hundred_mib_is_echoed_intact_each_way_through_a_program_under_saps_run() {
    let Some(l) = Layout::new() else { return };
    let port = port();
    let mut cmd = unix_node(l.d(), "echo", "off");
    cmd.args([PYTHON, "-u", "-c", ECHO_SERVER, &port.to_string()]);
    let server = Proc::spawn(&mut cmd);
    let up = wait_for(Duration::from_secs(30), || {
        server.stdout().contains("listening").then_some(())
    });
    assert!(up.is_some(), "echo server: {}", server.stderr());
    let o = run(l
        .in_client(PYTHON)
        .args(["-c", ECHO_CLIENT, SINGLE, &port.to_string()]));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let f: Vec<&str> = out.split_whitespace().collect();
    assert!(
        o.status.success() && f.len() == 3,
        "client: {out} {}\nserver: {}\nio-server: {}",
        String::from_utf8_lossy(&o.stderr),
        server.stderr(),
        l.io_stderr()
    );
    assert_eq!(f[2], (100u64 << 20).to_string(), "bytes echoed");
    assert_eq!(f[0], f[1], "the echo differs from what was sent");
}

/// Accepts one connection, writes the peer's address to it and exits.
const TELL_PEER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("listening", flush=True)
c, a = s.accept()
c.sendall(a[0].encode())
c.close()
"#;

/// Connects, prints what it reads and its own address.
const CONNECT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
print(s.recv(100).decode(), s.getsockname()[0], flush=True)
"#;

#[test]
fn a_nodes_outbound_connect_arrives_from_the_single_address() {
    let Some(l) = Layout::new() else { return };
    let port = port();
    let peer =
        Proc::spawn(
            l.in_client(PYTHON)
                .args(["-u", "-c", TELL_PEER, CLIENT, &port.to_string()]),
        );
    let up = wait_for(Duration::from_secs(10), || {
        peer.stdout().contains("listening").then_some(())
    });
    assert!(up.is_some(), "peer: {}", peer.stderr());
    let mut cmd = unix_node(l.d(), "out", "off");
    cmd.args([PYTHON, "-c", CONNECT, CLIENT, &port.to_string()]);
    let o = run(&mut cmd);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out} {}\nio-server: {}",
        String::from_utf8_lossy(&o.stderr),
        l.io_stderr()
    );
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.first().copied(), Some(SINGLE), "the peer saw: {out}");
    assert_eq!(f.get(1).copied(), Some(SINGLE), "getsockname: {out}");
}

#[test]
fn a_connect_to_a_closed_port_is_refused() {
    let Some(l) = Layout::new() else { return };
    let mut cmd = unix_node(l.d(), "out", "off");
    let program = "import socket\ntry:\n socket.create_connection(('198.51.100.2', 9), timeout=20)\n print('connected')\nexcept OSError as e:\n print(e.errno)";
    cmd.args([PYTHON, "-c", program]);
    let o = run(&mut cmd);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        out.trim(),
        libc::ECONNREFUSED.to_string(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn without_an_address_or_a_tap_the_stack_is_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    write_token(&d.path().join("token"), "cluster secret\n");
    let fabric = format!("unix:{}", d.path().join("saps.sock").display());
    let token = d.path().join("token");
    let common = [
        "--fabric",
        &fabric,
        "--token-file",
        token.to_str().unwrap(),
        "--stack",
        "smoltcp",
    ];
    let o = run(Command::new(bin("io-server"))
        .args(common)
        .args(["--tap", "x"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--address"), "{err}");
    let o = run(Command::new(bin("io-server"))
        .args(common)
        .args(["--address", SINGLE]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--tap NAME"), "{err}");
}

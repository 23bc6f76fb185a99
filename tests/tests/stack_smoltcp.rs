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
/// The io-server's `--metrics`, on the loopback of `gw`.
const METRICS: &str = "127.0.0.1:9464";
/// The client namespace's address (TEST-NET-2) and its router.
const CLIENT: &str = "198.51.100.2";
const ROUTER: &str = "198.51.100.1";

/// The namespaces, the TAP (made persistent, its link up, for the
/// io-server to open by name) and an io-server on it; removed when
/// dropped (the io-server first: field order).
struct Layout {
    io: Option<Proc>,
    dir: tempfile::TempDir,
    gw: String,
    client: String,
}

/// Opens the TAP `argv[1]` (IFF_TAP|IFF_NO_PI) as a privileged helper
/// would, and runs `argv[2:]` with it as `--tap-fd N`.
const TAP_HELPER: &str = r#"
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH22x", sys.argv[1].encode(), 0x0002 | 0x1000))
os.set_inheritable(fd, True)
os.execv(sys.argv[2], sys.argv[2:] + ["--tap-fd", str(fd)])
"#;

/// How the io-server gets its TAP.
#[derive(Clone, Copy, PartialEq)]
enum Tap {
    /// `--tap NAME`.
    ByName,
    /// `--tap-fd N`, opened by a helper.
    ByFd,
}

impl Layout {
    fn new() -> Option<Layout> {
        Layout::with(Tap::ByName)
    }

    fn with(how: Tap) -> Option<Layout> {
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
            format!("ip -n {g} tuntap add dev {tap} mode tap"),
            format!("ip -n {g} addr add {TAP_GW}/24 dev {tap}"),
            format!("ip -n {g} link set {tap} up"),
        ];
        let made = client_behind_gateway(&g, &c, &veth, ROUTER, CLIENT)
            .and_then(|()| steps.iter().try_for_each(|s| sh(s)));
        if let Err(e) = made {
            cannot_run(&format!("cannot make the namespaces ({e})"));
            return None;
        }
        write_token(&l.dir.path().join("token"), "cluster secret\n");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &g]);
        match how {
            Tap::ByName => cmd.arg(bin("io-server")).args(["--tap", &tap]),
            Tap::ByFd => cmd
                .args([PYTHON, "-c", TAP_HELPER, &tap])
                .arg(bin("io-server")),
        };
        cmd.args(["--stack", "smoltcp"])
            .args(["--tap-gateway", TAP_GW, "--connect-timeout", "10"])
            .args(["--metrics", METRICS, "--metrics-interval", "0"]);
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

    /// `GET /metrics` of the io-server (in `gw`).
    fn metrics(&self) -> String {
        let url = format!("http://{METRICS}/metrics");
        let o = run(Command::new("ip")
            .args(["netns", "exec", &self.gw, "curl", "-sS", "--max-time", "10"])
            .arg(url));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The stack's thread runs under the io-server's sandbox too: no call
    /// of it was refused.
    fn assert_sandbox_quiet(&self) {
        let err = self.io_stderr();
        assert!(!err.contains("sandbox: refused"), "{err}");
    }

    fn io_stderr(&self) -> String {
        self.io.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// [`ONCE`] from the client namespace to the single address's
    /// `port`: what it printed, and its stderr.
    fn once(&self, port: u16) -> (String, String) {
        let o = run(self
            .in_client(PYTHON)
            .args(["-c", ONCE, SINGLE, &port.to_string()]));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (text(&o.stdout).trim().to_string(), text(&o.stderr))
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
    let logged = http_server_logged(&server, "/hello.txt").expect("python logged the request");
    assert!(
        logged.starts_with(&format!("{CLIENT} ")),
        "python should log the client's address {CLIENT}: {logged}"
    );
    let status = io_server_status(l.d()).expect("status answers");
    assert!(status.contains("Stack smoltcp: sockets"), "{status}");
    l.assert_sandbox_quiet();
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

/// [`ECHO_SERVER`] on `port` under a relayed node of `l`, once it listens.
fn echo_server(l: &Layout, port: u16) -> Proc {
    let mut cmd = unix_node(l.d(), "echo", "off");
    cmd.args([PYTHON, "-u", "-c", ECHO_SERVER, &port.to_string()]);
    let server = Proc::spawn(&mut cmd);
    let up = wait_for(Duration::from_secs(30), || {
        server.stdout().contains("listening").then_some(())
    });
    assert!(up.is_some(), "echo server: {}", server.stderr());
    server
}

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
    let server = echo_server(&l, port);
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
    l.assert_sandbox_quiet();
    // The stack's counters saw the bytes, in Prometheus's format.
    let metrics = l.metrics();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in:\n{metrics}"))
    };
    assert!(value("saps_stack_bytes_total{direction=\"in\"}") >= 100 << 20);
    assert!(value("saps_stack_bytes_total{direction=\"out\"}") >= 100 << 20);
    assert_eq!(value("saps_stack_up"), 1);
    assert!(value("saps_stack_sockets{state=\"LISTEN\"}") >= 1);
    if have("promtool") {
        let check = format!(
            "ip netns exec {} curl -sS http://{METRICS}/metrics | promtool check metrics",
            l.gw
        );
        assert_eq!(sh(&check), Ok(()));
    }
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
    l.assert_sandbox_quiet();
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

/// GETs `url` from the client namespace into `out`; curl's exit code.
fn fetch(l: &Layout, url: &str, out: &Path) -> i32 {
    let o = run(l.in_client("curl").args([
        "-sS",
        "--max-time",
        "60",
        "-o",
        out.to_str().unwrap(),
        url,
    ]));
    o.status.code().unwrap_or(-1)
}

#[test]
fn nginx_serves_a_small_and_a_large_file_through_the_tap() {
    if !have("nginx") {
        return;
    }
    let Some(l) = Layout::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("www")).unwrap();
    let small: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let big: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i * 13 % 253) as u8)
        .collect();
    std::fs::write(d.join("www/1k.bin"), &small).unwrap();
    std::fs::write(d.join("www/10m.bin"), &big).unwrap();
    let port = port();
    let conf = format!(
        "daemon off; master_process on; worker_processes 2; user root;\n\
         pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 1024; use epoll; }}\n\
         http {{ access_log {d}/access.log; sendfile on;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
           uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{ listen {port}; root {d}/www; }} }}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let mut cmd = unix_node(l.d(), "nginx", "off");
    cmd.args(["nginx", "-c", d.join("nginx.conf").to_str().unwrap()])
        .args(["-e", d.join("error.log").to_str().unwrap()]);
    let server = Proc::spawn(&mut cmd);
    let out = d.join("fetched");
    let url = |f: &str| format!("http://{SINGLE}:{port}/{f}");
    let up = wait_for(Duration::from_secs(30), || {
        (fetch(&l, &url("1k.bin"), &out) == 0).then_some(())
    });
    assert!(
        up.is_some(),
        "nginx never answered: {}\nio-server: {}",
        server.stderr(),
        l.io_stderr()
    );
    assert!(std::fs::read(&out).unwrap() == small, "1 KiB file differs");
    assert_eq!(fetch(&l, &url("10m.bin"), &out), 0);
    assert!(std::fs::read(&out).unwrap() == big, "10 MiB file differs");
}

/// Connects, checks one echo, then holds the connection open reading
/// until it ends; prints "echoed" then "ended".
const HOLD: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b"ping")
assert s.recv(4) == b"ping"
print("echoed", flush=True)
try:
    while s.recv(4096):
        pass
except OSError:
    pass
print("ended", flush=True)
"#;

/// One echo through a new connection; prints "ok" if it came back.
const ONCE: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"pong")
s.shutdown(socket.SHUT_WR)
print("ok" if s.recv(4) == b"pong" else "bad", flush=True)
"#;

#[test]
fn a_node_killed_mid_stream_leaves_the_other_serving() {
    let Some(l) = Layout::new() else { return };
    let port = port();
    let node = |name: &str| {
        let mut cmd = unix_node(l.d(), name, "off");
        cmd.args([PYTHON, "-u", "-c", ECHO_SERVER, &port.to_string()]);
        let p = Proc::spawn(&mut cmd);
        let up = wait_for(Duration::from_secs(30), || {
            p.stdout().contains("listening").then_some(())
        });
        assert!(up.is_some(), "{name}: {}", p.stderr());
        p
    };
    let a = node("a");
    let held = Proc::spawn(
        l.in_client(PYTHON)
            .args(["-u", "-c", HOLD, SINGLE, &port.to_string()]),
    );
    let echoed = wait_for(Duration::from_secs(20), || {
        held.stdout().contains("echoed").then_some(())
    });
    assert!(echoed.is_some(), "{}\n{}", held.stderr(), l.io_stderr());
    let b = node("b");
    // Both members now; `a` (which holds the connection) dies.
    let members = wait_for(Duration::from_secs(10), || {
        let s = io_server_status(l.d())?;
        (s.contains("-> a (") && s.contains("-> b (")).then_some(())
    });
    assert!(members.is_some(), "{:?}", io_server_status(l.d()));
    drop(a);
    let ended = wait_for(Duration::from_secs(20), || {
        held.stdout().contains("ended").then_some(())
    });
    assert!(
        ended.is_some(),
        "the held connection did not end: {}",
        held.stdout()
    );
    for i in 0..5 {
        let (said, err) = l.once(port);
        assert_eq!(
            said,
            "ok",
            "connection {i} after the kill: {err}\nb: {}\nio-server: {}",
            b.stderr(),
            l.io_stderr()
        );
    }
}

#[test]
fn a_tap_handed_over_as_a_descriptor_serves() {
    let Some(l) = Layout::with(Tap::ByFd) else {
        return;
    };
    let port = port();
    let _server = echo_server(&l, port);
    let (said, err) = l.once(port);
    assert_eq!(said, "ok", "{err}\nio-server: {}", l.io_stderr());
}

/// Listens, serves one connection, closes its listener; twice on the
/// same port (iperf3's pattern), the second time with a larger backlog
/// asked by a second listen(2).
const TWICE: &str = r#"
import socket, sys
for i in range(2):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(1)
    if i == 1:
        s.listen(8)
    print("listening", i, flush=True)
    c, a = s.accept()
    c.sendall(b"round %d" % i)
    c.close()
    s.close()
"#;

/// Reads what the server says first.
const READ: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(s.recv(100).decode(), flush=True)
"#;

#[test]
fn a_program_that_closes_its_listener_and_listens_again_is_served_both_times() {
    let Some(l) = Layout::new() else { return };
    let port = port();
    let mut cmd = unix_node(l.d(), "twice", "off");
    cmd.args([PYTHON, "-u", "-c", TWICE, &port.to_string()]);
    let server = Proc::spawn(&mut cmd);
    for round in 0..2 {
        let listening = format!("listening {round}");
        let up = wait_for(Duration::from_secs(30), || {
            server.stdout().contains(&listening).then_some(())
        });
        assert!(up.is_some(), "round {round}: {}", server.stderr());
        // The listen's answer may come before the port is open again.
        let said = wait_for(Duration::from_secs(20), || {
            let o = run(l
                .in_client(PYTHON)
                .args(["-c", READ, SINGLE, &port.to_string()]));
            let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
            (!out.is_empty()).then_some(out)
        });
        assert_eq!(
            said.as_deref(),
            Some(format!("round {round}").as_str()),
            "{}\nio-server: {}",
            server.stderr(),
            l.io_stderr()
        );
    }
}

/// A connect's outcome: "ok" or the errno.
const PROBE: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("ok")
except OSError as e:
    print(e.errno)
"#;

#[test]
fn the_port_of_a_node_that_left_is_closed_on_the_stack_after_the_grace() {
    let Some(l) = Layout::new() else { return };
    let port = port();
    let probe = || {
        let o = run(l
            .in_client(PYTHON)
            .args(["-c", PROBE, SINGLE, &port.to_string()]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let mut cmd = unix_node(l.d(), "only", "off");
    cmd.args([PYTHON, "-u", "-c", ECHO_SERVER, &port.to_string()]);
    let node = Proc::spawn(&mut cmd);
    let up = wait_for(Duration::from_secs(30), || (probe() == "ok").then_some(()));
    assert!(up.is_some(), "{}\n{}", node.stderr(), l.io_stderr());
    drop(node);
    // Orphaned, then closed once the grace (1 s) is over: the stack
    // refuses the port as the kernel would, and listens on nothing.
    let refused = libc::ECONNREFUSED.to_string();
    let closed = wait_for(Duration::from_secs(20), || {
        (probe() == refused).then_some(())
    });
    assert!(closed.is_some(), "still {}", probe());
    let none = wait_for(Duration::from_secs(10), || {
        let s = io_server_status(l.d())?;
        s.contains("listening ports 0,").then_some(())
    });
    assert!(none.is_some(), "{:?}", io_server_status(l.d()));
}

//! Helpers shared by the end-to-end tests: the built binaries, child
//! processes that die with the test, polling with a deadline, and network
//! namespaces the tests make themselves (so a client's address is not
//! loopback).

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// A binary of the workspace (`saps-run`, `io-server`), built once per
/// test process in the debug profile, in a target directory of its own
/// (`TARGET/e2e`): `cargo test --workspace` builds the same binaries with
/// other features (dev-dependencies unify), and both builds copy their
/// result to `TARGET/debug/NAME`, so that path may hold the other, older
/// build's binary.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = target_dir().join("e2e");
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "saps-run", "-p", "saps-io-server"])
            .arg("--target-dir")
            .arg(&dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building saps-run and io-server failed");
    });
    dir.join("debug").join(name)
}

/// `saps-run --address 127.0.0.1 --zero-relay MODE -- PROGRAM ARGS…` on the
/// embedded io-server.
pub fn saps_run_local(zero_relay: &str, program: &[&str]) -> Command {
    let mut c = Command::new(bin("saps-run"));
    c.args(["--address", "127.0.0.1", "--zero-relay", zero_relay, "--"])
        .args(program);
    c
}

/// Debian's interpreter, by absolute path: a `python3` found on `PATH` may be
/// a version manager's shim (pyenv's is a bash script that forks helpers and,
/// without `HOME`, looks users up over a unix socket), whose extra processes
/// and syscalls are not the program under test.
pub const PYTHON: &str = "/usr/bin/python3";

/// Whether a program is installed. Where it is not, a test needing it
/// skips with a printed reason on a developer's machine, and fails under
/// `CI=true` (where `.ci/run` installs everything), naming the Debian
/// package to install: a suite that passes because its programs are
/// missing proves nothing.
pub fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        cannot_run(&format!(
            "`{program}` is not installed (apt-get install {})",
            debian_package(program)
        ));
    }
    found
}

/// The Debian package that installs a program the tests run.
fn debian_package(program: &str) -> &str {
    match program {
        "python3" => "python3",
        "ip" | "tc" => "iproute2",
        "killall" | "fuser" => "psmisc",
        "promtool" => "prometheus",
        "systemd-analyze" => "systemd",
        "nft" => "nftables",
        other => other,
    }
}

/// Says why a test cannot run here: a printed skip on a developer's
/// machine, a failure under `CI=true`.
pub fn cannot_run(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot run on CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Writes a token file as an operator must: private to its owner (mode
/// 0600); io-server and saps-run refuse one other users may read.
pub fn write_token(path: &Path, token: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(token.as_bytes()))
        .unwrap_or_else(|e| panic!("writing the token file {}: {e}", path.display()));
}

/// A port free on 127.0.0.1 right now, below the kernel's ephemeral
/// range: a port from that range may be taken by an outgoing connection
/// (the tests make many) before the server under test binds it.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(12000, 65535);
    let span = low - 10000;
    let start = std::process::id() * 97 % span;
    for _ in 0..span {
        let port = 10000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind((Ipv4Addr::UNSPECIFIED, port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port below {low}")
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A child process killed (with its process group) when dropped, whose
/// output is collected in files so it never blocks on a full pipe.
pub struct Proc {
    child: Option<Child>,
    out: tempfile::NamedTempFile,
    err: tempfile::NamedTempFile,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let out = tempfile::NamedTempFile::new().unwrap();
        let err = tempfile::NamedTempFile::new().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.reopen().unwrap())
            .stderr(err.reopen().unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            out,
            err,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn stdout(&self) -> String {
        read_all(self.out.path())
    }

    pub fn stderr(&self) -> String {
        read_all(self.err.path())
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for exit within `timeout`; the exit code, or 128 + signal.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let status = wait_for(timeout, || child.try_wait().ok().flatten())?;
        self.child = None;
        use std::os::unix::process::ExitStatusExt;
        Some(
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        )
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the process group we created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

fn read_all(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Runs a command to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// `curl` with a bounded time; returns (exit code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Polls until `url` answers with HTTP 200.
pub fn wait_http(url: &str, timeout: Duration) -> bool {
    wait_for(timeout, || {
        let (code, out, _) = curl(&["-o", "/dev/null", "-w", "%{http_code}", url]);
        (code == 0 && out == "200").then_some(())
    })
    .is_some()
}

/// A network namespace joined to the host by a veth pair: the host end is
/// `host_ip`, the namespace end `ns_ip`. Removed when dropped.
pub struct Netns {
    pub name: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    veth: String,
}

impl Netns {
    /// Makes one, or `None` (with a printed reason) where namespaces are
    /// not available.
    pub fn new() -> Option<Netns> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // A /30 of TEST-NET-3 (203.0.113.0/24, RFC 5737) per namespace,
        // chosen by pid and count so concurrent test processes differ.
        let base = ((std::process::id() as u8 % 16) * 4 + (n % 4) as u8) * 4;
        let name = format!("saps-t{}-{n}", std::process::id());
        let veth = format!("sv{}x{n}", std::process::id() % 100000);
        let host_ip = Ipv4Addr::new(203, 0, 113, base + 1);
        let ns_ip = Ipv4Addr::new(203, 0, 113, base + 2);
        let ns = Netns {
            name: name.clone(),
            host_ip,
            ns_ip,
            veth: veth.clone(),
        };
        let steps = [
            format!("ip netns add {name}"),
            format!("ip link add {veth} type veth peer name {veth}p"),
            format!("ip link set {veth}p netns {name}"),
            format!("ip addr add {host_ip}/30 dev {veth}"),
            format!("ip link set {veth} up"),
            format!("ip -n {name} addr add {ns_ip}/30 dev {veth}p"),
            format!("ip -n {name} link set {veth}p up"),
            format!("ip -n {name} link set lo up"),
        ];
        for s in &steps {
            let o = run(Command::new("sh").args(["-c", s]));
            if !o.status.success() {
                cannot_run(&format!(
                    "cannot make a network namespace ({s}: {})",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                return None;
            }
        }
        Some(ns)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["link", "del", &self.veth]));
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// A standalone io-server on the `unix:` fabric `DIR/saps.sock`, control
/// socket `DIR/control.sock`, address 127.0.0.1, scheduler `rr`, with the
/// token in `DIR/token` (written if missing); returned once `status`
/// answers.
pub fn unix_io_server(d: &Path) -> Proc {
    if !d.join("token").exists() {
        write_token(&d.join("token"), "cluster secret\n");
    }
    let fabric = format!("unix:{}", d.join("saps.sock").display());
    start_io_server(Command::new(bin("io-server")), d, &fabric, "127.0.0.1")
}

/// The io-server `cmd` runs (the binary itself, or `ip netns exec NS
/// io-server`) on `fabric` and `address`, scheduler `rr`, with the token
/// in `DIR/token` and control socket `DIR/control.sock`; returned once
/// `status` answers.
pub fn start_io_server(mut cmd: Command, d: &Path, fabric: &str, address: &str) -> Proc {
    let io = Proc::spawn(cmd.args([
        "--fabric",
        fabric,
        "--address",
        address,
        "--scheduler",
        "rr",
        "--token-file",
        d.join("token").to_str().unwrap(),
        "--control",
        d.join("control.sock").to_str().unwrap(),
    ]));
    let up = wait_for(Duration::from_secs(20), || io_server_status(d));
    assert!(up.is_some(), "io-server did not start: {}", io.stderr());
    io
}

/// `io-server status` of the io-server in `d`, if it answers.
pub fn io_server_status(d: &Path) -> Option<String> {
    let o = run(Command::new(bin("io-server")).args([
        "status",
        "--control",
        d.join("control.sock").to_str().unwrap(),
    ]));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `saps-run --node NAME --zero-relay ZR --`, joined to the io-server of
/// [`unix_io_server`] in `d`; the program and its arguments follow.
pub fn unix_node(d: &Path, name: &str, zero_relay: &str) -> Command {
    let mut c = Command::new(bin("saps-run"));
    c.args([
        "--io-server",
        &format!("unix:{}", d.join("saps.sock").display()),
        "--token-file",
        d.join("token").to_str().unwrap(),
        "--node",
        name,
        "--zero-relay",
        zero_relay,
        "--",
    ]);
    c
}

/// A python program that listens on port `argv[1]` with backlog `argv[2]`
/// (default 128) and never accepts: a program stuck before its accept
/// loop.
pub const NEVER_ACCEPTS: &str = r#"
import socket, sys, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(int(sys.argv[2]) if len(sys.argv) > 2 else 128)
while True:
    time.sleep(3600)
"#;

/// A python program on port `argv[1]` that answers each connection's
/// request (up to its newline) with "B " and the request, then closes it;
/// a thread per connection.
pub const ANSWERS: &str = r#"
import socket, sys, threading
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(128)
def serve(c):
    data = b""
    while not data.endswith(b"\n"):
        d = c.recv(1 << 16)
        if not d:
            break
        data += d
    c.sendall(b"B " + data)
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// `program` (python source, [`NEVER_ACCEPTS`], [`ANSWERS`] …) run with
/// `args` under a node of [`unix_node`].
pub fn python_node(d: &Path, name: &str, zero_relay: &str, program: &str, args: &[&str]) -> Proc {
    Proc::spawn(
        unix_node(d, name, zero_relay)
            .args([PYTHON, "-c", program])
            .args(args),
    )
}

/// Runs `cmd` with `sh -c` (the system's `ip`, `tc`, `sysctl` on PATH):
/// `Err` with the command and its stderr when it fails.
pub fn sh(cmd: &str) -> Result<(), String> {
    let o = Command::new("sh")
        .args(["-c", cmd])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| e.to_string())?;
    match o.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

/// Two new namespaces: `client` reaches the world through `gw`, which
/// forwards, over the veth `VETH` (`gw`'s end, `router`/24) and `VETHp`
/// (`client`'s end, `client_addr`/24, default route via `router`). The
/// caller removes the namespaces, also on `Err`.
pub fn client_behind_gateway(
    gw: &str,
    client: &str,
    veth: &str,
    router: &str,
    client_addr: &str,
) -> Result<(), String> {
    let steps = [
        format!("ip netns add {gw}"),
        format!("ip netns add {client}"),
        format!("ip link add {veth} netns {gw} type veth peer name {veth}p netns {client}"),
        format!("ip -n {gw} link set lo up"),
        format!("ip -n {client} link set lo up"),
        format!("ip -n {gw} addr add {router}/24 dev {veth}"),
        format!("ip -n {gw} link set {veth} up"),
        format!("ip -n {client} addr add {client_addr}/24 dev {veth}p"),
        format!("ip -n {client} link set {veth}p up"),
        format!("ip -n {client} route add default via {router}"),
        format!("ip netns exec {gw} sysctl -qw net.ipv4.ip_forward=1"),
    ];
    steps.iter().try_for_each(|s| sh(s))
}

/// The line python's `http.server` (running as `server`) logged for a
/// request of `path` ("ADDRESS - - [date] "GET PATH HTTP/1.1" 200 -"),
/// once it has logged it (at most 5 s).
pub fn http_server_logged(server: &Proc, path: &str) -> Option<String> {
    let request = format!("GET {path} ");
    wait_for(Duration::from_secs(5), || {
        let log = server.stderr();
        log.lines()
            .find(|l| l.contains(&request))
            .map(str::to_owned)
    })
}

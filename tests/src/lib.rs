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
    e2e_build(&BUILT, "debug").join(name)
}

/// The release build of `name` (`saps-run`, `io-server`), built once per
/// test process in `target/e2e`: for the tests that measure a load a
/// gateway carries, which a debug build relays at a fraction of the speed
/// (the upgrade under load: see tests/tests/upgrade_load.rs).
pub fn release_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    e2e_build(&BUILT, "release").join(name)
}

/// saps-run and io-server built in `profile` (`debug` or `release`) in
/// `TARGET/e2e`, once (`built`): the directory of the binaries.
fn e2e_build(built: &OnceLock<()>, profile: &str) -> PathBuf {
    let dir = target_dir().join("e2e");
    built.get_or_init(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-q", "-p", "saps-run", "-p", "saps-io-server"]);
        if profile == "release" {
            cargo.arg("--release");
        }
        let status = cargo
            .arg("--target-dir")
            .arg(&dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap_or_else(|e| panic!("running cargo build ({profile}): {e}"));
        assert!(
            status.success(),
            "building saps-run and io-server ({profile}) failed"
        );
    });
    dir.join(profile)
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

/// The settings of an io-server daemon that `io-server upgrade` replaces:
/// the same for the daemon and for every `upgrade`, as the command must
/// name the listeners the running process serves. A `unix:` fabric
/// `DIR/saps.sock` (with its `.handoff` socket, for zero-relay nodes), a
/// `tcp://127.0.0.1:PORT` fabric (relayed nodes), control socket
/// `DIR/control.sock`, metrics on `127.0.0.1:PORT`, address 127.0.0.1,
/// scheduler `rr`, the token in `DIR/token`, then [`UpgradeSettings::extra`].
pub struct UpgradeSettings {
    pub dir: PathBuf,
    pub metrics: u16,
    /// The `tcp://` fabric's port (0: whichever the kernel picks).
    pub tcp_fabric: u16,
    /// More flags, the same for the daemon and every upgrade.
    pub extra: Vec<String>,
    /// The build of the binaries: [`bin`] or [`release_bin`].
    build: fn(&str) -> PathBuf,
}

impl UpgradeSettings {
    /// The debug build's daemon, its `tcp://` fabric on any port.
    pub fn new(dir: &Path) -> UpgradeSettings {
        UpgradeSettings::with(dir, bin, 0)
    }

    /// The release build's daemon ([`release_bin`]), its `tcp://` fabric
    /// on a port known beforehand, for nodes to join.
    pub fn release(dir: &Path) -> UpgradeSettings {
        UpgradeSettings::with(dir, release_bin, free_port())
    }

    fn with(dir: &Path, build: fn(&str) -> PathBuf, tcp_fabric: u16) -> UpgradeSettings {
        write_token(&dir.join("token"), "cluster secret\n");
        UpgradeSettings {
            dir: dir.to_path_buf(),
            metrics: free_port(),
            tcp_fabric,
            extra: Vec::new(),
            build,
        }
    }

    /// The `unix:` fabric's URL.
    pub fn unix_fabric(&self) -> String {
        format!("unix:{}", self.dir.join("saps.sock").display())
    }

    /// The `tcp://` fabric's URL.
    pub fn tcp_fabric(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.tcp_fabric)
    }

    pub fn args(&self) -> Vec<String> {
        let p = |name: &str| self.dir.join(name).display().to_string();
        [
            "--fabric",
            &self.unix_fabric(),
            "--fabric",
            &self.tcp_fabric(),
            "--address",
            "127.0.0.1",
            "--scheduler",
            "rr",
            "--token-file",
            &p("token"),
            "--control",
            &p("control.sock"),
            "--metrics",
            &format!("127.0.0.1:{}", self.metrics),
        ]
        .map(String::from)
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect()
    }

    /// The daemon's command with these settings.
    pub fn command(&self) -> Command {
        let mut c = Command::new((self.build)("io-server"));
        c.args(self.args());
        c
    }

    /// The daemon with these settings (and `env`), once `status` answers.
    pub fn start(&self, env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        let io = Proc::spawn(&mut cmd);
        let up = wait_for(Duration::from_secs(20), || io_server_status(&self.dir));
        assert!(up.is_some(), "io-server did not start: {}", io.stderr());
        io
    }

    /// `io-server [settings] upgrade` (with `env`): its exit code, what it
    /// printed, and what its standard error holds (the new daemon's log
    /// too, for as long as the test reads it).
    pub fn upgrade_output(&self, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
        let mut cmd = self.command();
        cmd.arg("upgrade").envs(env.iter().copied());
        let mut p = Proc::spawn(&mut cmd);
        let code = p.wait_timeout(Duration::from_secs(60));
        (code, p.stdout(), p.stderr())
    }

    /// `io-server [settings] upgrade` with its standard error (and so the
    /// log of the process it starts, for that process's whole life) in
    /// `log`: its exit code (`None` if it did not end within a minute) and
    /// what it printed.
    pub fn upgrade(&self, log: &Path) -> (Option<i32>, String) {
        use std::os::unix::process::CommandExt;
        let err = std::fs::File::create(log).unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut child = self
            .command()
            .arg("upgrade")
            .stdin(Stdio::null())
            .stdout(out.reopen().unwrap())
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning io-server upgrade: {e}"));
        let code = wait_for(Duration::from_secs(60), || child.try_wait().ok().flatten());
        if code.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        (code.and_then(|s| s.code()), read_all(out.path()))
    }

    /// A counter or gauge without labels, as `GET /metrics` shows it now.
    pub fn metric(&self, name: &str) -> Option<u64> {
        metric_value(self.metrics, name)
    }
}

/// A counter or gauge without labels, as `GET /metrics` on
/// `127.0.0.1:port` shows it now.
pub fn metric_value(port: u16, name: &str) -> Option<u64> {
    let text = scrape_metrics(port).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `GET /metrics` on `127.0.0.1:port`: the body, or why not.
pub fn scrape_metrics(port: u16) -> Result<String, String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    if !text.lines().next().is_some_and(|l| l.contains(" 200 ")) {
        return Err(text.lines().next().unwrap_or("").to_string());
    }
    Ok(text)
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn pid_alive(pid: i32) -> bool {
    // A zombie (exited, not yet waited for) is not alive.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? == "Z"))
        .unwrap_or(false);
    // SAFETY: kill(2) with signal 0 only checks.
    !zombie && unsafe { libc::kill(pid, 0) == 0 }
}

/// `io-server upgrade`'s answer, `pid N took over from pid M (upgrade K)`,
/// as (N, M, K).
pub fn took_over(line: &str) -> Option<(i32, i32, u64)> {
    let rest = line.trim().strip_prefix("pid ")?;
    let (new, rest) = rest.split_once(" took over from pid ")?;
    let (old, rest) = rest.split_once(" (upgrade ")?;
    let k = rest.strip_suffix(')')?;
    Some((new.parse().ok()?, old.parse().ok()?, k.parse().ok()?))
}

/// The io-server daemon serving now, which after an upgrade is no child
/// of the test: stopped with SIGTERM when the test ends, however it ends;
/// with [`UpgradedDaemon::in_dir`], so is every io-server whose command
/// line names the test's directory (one an upgrade started before the
/// test failed, and never learnt the pid of).
pub struct UpgradedDaemon(std::sync::Mutex<i32>, Option<PathBuf>);

impl UpgradedDaemon {
    pub fn new(pid: i32) -> UpgradedDaemon {
        UpgradedDaemon(std::sync::Mutex::new(pid), None)
    }
    /// Also ends, at the end, the io-servers of the test's `dir`.
    pub fn in_dir(mut self, dir: &Path) -> UpgradedDaemon {
        self.1 = Some(dir.to_path_buf());
        self
    }
    pub fn set(&self, pid: i32) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = pid;
    }
    pub fn pid(&self) -> i32 {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The processes whose arguments (`/proc/PID/cmdline`, the program
/// first) `matching` holds of.
pub fn processes(matching: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                matching(&args)
            })
        })
        .collect()
}

/// The io-server processes whose command line names `dir`.
fn io_servers_of(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    processes(|args| {
        args.first().is_some_and(|p| p.contains("io-server"))
            && args.iter().any(|a| a.contains(&needle))
    })
}

impl Drop for UpgradedDaemon {
    fn drop(&mut self) {
        let mut pids = vec![self.pid()];
        if let Some(dir) = &self.1 {
            pids.extend(io_servers_of(dir));
        }
        pids.retain(|&p| p > 0 && pid_alive(p));
        for &pid in &pids {
            // SAFETY: kill(2) on a daemon the test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for pid in pids {
            wait_for(Duration::from_secs(20), || (!pid_alive(pid)).then_some(()));
        }
    }
}

/// The nodes `io-server status` lists under "Nodes", as (name, id), in
/// its order.
pub fn status_nodes(status: &str) -> Vec<(String, u64)> {
    let Some(nodes) = status.split("\nNodes\n").nth(1) else {
        return Vec::new();
    };
    nodes
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            let id = words.next()?.strip_prefix('(')?.strip_suffix(')')?;
            Some((name.to_string(), id.parse().ok()?))
        })
        .collect()
}

/// Raises this process's descriptor limit (soft and hard) to at least
/// `want` where it may (`CAP_SYS_RESOURCE`, or a hard limit already that
/// high); the processes it starts inherit it. Returns the soft limit now.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) and setrlimit(2) with a live rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max.max(want),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                let soft = libc::rlimit {
                    rlim_cur: want.min(lim.rlim_max),
                    rlim_max: lim.rlim_max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

//! The program's process tree (docs/interceptor.md, "The program's process
//! tree"): saps-run serves a daemonized rest after the main process has
//! exited, exits with the main status once the last process has, takes the
//! main process down when it is killed, and stops the rest on SIGTERM.

use saps_tests::*;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bound of every wait for something that should happen at once.
const SOON: Duration = Duration::from_secs(20);

/// `python3 -c SERVER PORT PIDFILE`: writes its pid, accepts one
/// connection on 0.0.0.0:PORT, answers it and exits.
const SERVER: &str = r#"
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
with open(sys.argv[2], "w") as f:
    f.write(str(os.getpid()))
c, _ = s.accept()
c.sendall(b"the daemon answers\n")
c.close()
"#;

/// `python3 -c WAITER PIDFILE SIGFILE [PORT]`: writes its pid, then waits
/// without trapped calls (a sleep loop) or, given a port, blocked in
/// `accept`; on SIGTERM writes the signal's number and exits 0. With
/// `IGNORE` in the environment it ignores SIGTERM.
const WAITER: &str = r#"
import os, signal, socket, sys, time
def bye(n, _):
    with open(sys.argv[2], "w") as f:
        f.write(str(n))
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE") else bye)
s = None
if len(sys.argv) > 3:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[3])))
    s.listen(1)
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
if s:
    s.accept()
while True:
    time.sleep(0.05)
"#;

/// `saps-run … -- sh -c SCRIPT` on the embedded io-server.
fn saps_run_sh(zero_relay: &str, script: &str) -> Proc {
    Proc::spawn(&mut saps_run_local(zero_relay, &["sh", "-c", script]))
}

fn python(code: &str, args: &[&dyn std::fmt::Display]) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    format!("{PYTHON} -c '{code}' {}", args.join(" "))
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pid a process of the program wrote to `path`.
fn wait_pid(path: &Path, p: &Proc) -> i32 {
    wait_for(SOON, || read_pid(path)).unwrap_or_else(|| {
        panic!(
            "no pid in {}; saps-run's stderr:\n{}",
            path.display(),
            p.stderr()
        )
    })
}

/// Whether `pid` has exited: gone from /proc, or a zombie that its new
/// parent (init, outside saps-run) did not reap yet.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_exited(pid: i32, what: &str, p: &Proc) {
    assert!(
        wait_for(SOON, || exited(pid).then_some(())).is_some(),
        "{what} (pid {pid}) did not exit; saps-run's stderr:\n{}",
        p.stderr()
    );
}

/// Connects to 127.0.0.1:`port` and reads until EOF; `None` if the
/// connection was refused or nothing came.
fn ask(port: u16) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut got = String::new();
    s.read_to_string(&mut got).ok()?;
    (!got.is_empty()).then_some(got)
}

/// (a) The main process (sh) exits at once with 3; the server it started
/// in the background is still served: its accept goes through the
/// supervisor. saps-run exits with the main status once the server has.
fn a_daemonized_server_is_served_after_the_main_process_exits(zero_relay: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (main_pid, server_pid) = (file(dir.path(), "main"), file(dir.path(), "server"));
    let port = free_port();
    let server = python(SERVER, &[&port, &server_pid.display()]);
    let script = format!("{server} & echo $$ > '{}'; exit 3", main_pid.display());
    let mut p = saps_run_sh(zero_relay, &script);

    let main = wait_pid(&main_pid, &p);
    wait_exited(main, "the main process", &p);
    let daemon = wait_pid(&server_pid, &p);
    assert!(
        p.running(),
        "saps-run exited with its main process although the daemon lives; stderr:\n{}",
        p.stderr()
    );
    assert!(!exited(daemon), "the daemon died early");

    let got = wait_for(SOON, || ask(port));
    assert_eq!(
        got.as_deref(),
        Some("the daemon answers\n"),
        "stderr:\n{}",
        p.stderr()
    );
    wait_exited(daemon, "the daemon", &p);
    assert_eq!(
        p.wait_timeout(SOON),
        Some(3),
        "saps-run should exit with the main process's status once the tree is gone; stderr:\n{}",
        p.stderr()
    );
}

#[test]
fn a_daemonized_server_is_served_after_the_main_process_exits_relayed() {
    a_daemonized_server_is_served_after_the_main_process_exits("off");
}

#[test]
fn a_daemonized_server_is_served_after_the_main_process_exits_zero_relay() {
    a_daemonized_server_is_served_after_the_main_process_exits("on");
}

/// Kills a process that should have died, should the test fail (once
/// saps-run is gone, `Proc` no longer kills its group).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !exited(self.0) {
            // SAFETY: kill(2) of a pid this test saw running just now.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// (b) The main process has PR_SET_PDEATHSIG(SIGKILL): SIGKILL to saps-run
/// takes it down.
#[test]
fn killing_saps_run_kills_the_main_process() {
    let dir = tempfile::tempdir().unwrap();
    let (pid_file, sig_file) = (file(dir.path(), "pid"), file(dir.path(), "sig"));
    let mut p = Proc::spawn(&mut saps_run_local(
        "on",
        &[
            PYTHON,
            "-c",
            WAITER,
            &pid_file.display().to_string(),
            &sig_file.display().to_string(),
        ],
    ));
    let main = wait_pid(&pid_file, &p);
    let _cleanup = KillOnDrop(main);
    assert!(!exited(main));
    p.signal(libc::SIGKILL);
    assert_eq!(p.wait_timeout(SOON), Some(128 + libc::SIGKILL));
    wait_exited(main, "the main process", &p);
}

/// (c) The main process has exited; SIGTERM to saps-run reaches the two
/// processes it left behind — one in a sleep loop, one blocked in a trapped
/// `accept` — and saps-run exits with the main status at once, well within
/// its 10 s grace period.
#[test]
fn sigterm_after_the_main_process_exited_stops_the_rest_of_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| file(dir.path(), n);
    let port = free_port();
    let sleeper = python(
        WAITER,
        &[&d("sleeper").display(), &d("sleeper.sig").display()],
    );
    let acceptor = python(
        WAITER,
        &[
            &d("acceptor").display(),
            &d("acceptor.sig").display(),
            &port,
        ],
    );
    let script = format!(
        "{sleeper} & {acceptor} & echo $$ > '{}'; exit 0",
        d("main").display()
    );
    let mut p = saps_run_sh("on", &script);
    let main = wait_pid(&d("main"), &p);
    let rest = [wait_pid(&d("sleeper"), &p), wait_pid(&d("acceptor"), &p)];
    wait_exited(main, "the main process", &p);
    assert!(p.running(), "saps-run left early:\n{}", p.stderr());

    let sent = Instant::now();
    p.signal(libc::SIGTERM);
    let status = p.wait_timeout(SOON);
    assert_eq!(status, Some(0), "stderr:\n{}", p.stderr());
    assert!(
        sent.elapsed() < Duration::from_secs(8),
        "saps-run took {:?}: the rest did not get SIGTERM",
        sent.elapsed()
    );
    for (name, pid) in ["sleeper", "acceptor"].into_iter().zip(rest) {
        assert!(exited(pid), "{name} outlived saps-run");
        let sig = std::fs::read_to_string(d(&format!("{name}.sig"))).unwrap_or_default();
        assert_eq!(sig, libc::SIGTERM.to_string(), "{name} did not get SIGTERM");
    }
}

/// A terminating signal that reached the main process while it ran goes to
/// the rest of the tree once the main process has exited; saps-run exits
/// with the main status (sh killed by SIGTERM: 143).
#[test]
fn sigterm_to_the_main_process_reaches_the_rest_when_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| file(dir.path(), n);
    let sleeper = python(
        WAITER,
        &[&d("sleeper").display(), &d("sleeper.sig").display()],
    );
    // `wait` keeps sh (the main process) alive, killable by SIGTERM.
    let script = format!("{sleeper} & echo $$ > '{}'; wait", d("main").display());
    let mut p = saps_run_sh("on", &script);
    let main = wait_pid(&d("main"), &p);
    let sleeper = wait_pid(&d("sleeper"), &p);
    assert!(!exited(main));

    let sent = Instant::now();
    p.signal(libc::SIGTERM);
    assert_eq!(
        p.wait_timeout(SOON),
        Some(128 + libc::SIGTERM),
        "stderr:\n{}",
        p.stderr()
    );
    assert!(sent.elapsed() < Duration::from_secs(8));
    assert!(exited(sleeper));
    let sig = std::fs::read_to_string(d("sleeper.sig")).unwrap_or_default();
    assert_eq!(sig, libc::SIGTERM.to_string());
}

/// A process of the rest that ignores SIGTERM is SIGKILLed 10 s after it
/// was sent; saps-run then exits with the main status.
#[test]
fn the_rest_of_the_tree_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| file(dir.path(), n);
    let stubborn = python(
        WAITER,
        &[&d("stubborn").display(), &d("stubborn.sig").display()],
    );
    let script = format!(
        "IGNORE=1 {stubborn} & echo $$ > '{}'; exit 5",
        d("main").display()
    );
    let mut p = saps_run_sh("on", &script);
    let main = wait_pid(&d("main"), &p);
    let stubborn = wait_pid(&d("stubborn"), &p);
    wait_exited(main, "the main process", &p);

    let sent = Instant::now();
    p.signal(libc::SIGTERM);
    assert_eq!(
        p.wait_timeout(Duration::from_secs(30)),
        Some(5),
        "stderr:\n{}",
        p.stderr()
    );
    assert!(
        sent.elapsed() >= Duration::from_secs(9),
        "killed after {:?}, before the grace period",
        sent.elapsed()
    );
    assert!(exited(stubborn), "the stubborn process outlived saps-run");
    assert!(!d("stubborn.sig").exists());
}

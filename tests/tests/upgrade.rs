//! `io-server upgrade` (issue 19): a new process takes the running
//! io-server's listening sockets and state over, and the old one exits;
//! while it happens, clients of its listeners are never refused. Refused,
//! with the old process serving on: a state version it cannot read, a
//! node joined (channels and relays do not move yet), other settings. And
//! systemd hears of it in order: `RELOADING=1` and `MAINPID=` from the old
//! process, `READY=1` from the new one.

use saps_tests::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An io-server's settings, the same for the daemon and every `upgrade`.
struct Settings {
    dir: PathBuf,
    metrics: u16,
}

impl Settings {
    fn new(dir: &Path) -> Settings {
        write_token(&dir.join("token"), "cluster secret\n");
        Settings {
            dir: dir.to_path_buf(),
            metrics: free_port(),
        }
    }

    fn args(&self) -> Vec<String> {
        let d = &self.dir;
        let p = |name: &str| d.join(name).display().to_string();
        vec![
            "--fabric".into(),
            format!("unix:{}", p("saps.sock")),
            "--fabric".into(),
            "tcp://127.0.0.1:0".into(),
            "--address".into(),
            "127.0.0.1".into(),
            "--scheduler".into(),
            "rr".into(),
            "--token-file".into(),
            p("token"),
            "--control".into(),
            p("control.sock"),
            "--metrics".into(),
            format!("127.0.0.1:{}", self.metrics),
        ]
    }

    /// The daemon with these settings (and `env`), once `status` answers.
    fn start(&self, env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        let io = Proc::spawn(&mut cmd);
        let up = wait_for(Duration::from_secs(20), || io_server_status(&self.dir));
        assert!(up.is_some(), "io-server did not start: {}", io.stderr());
        io
    }

    fn command(&self) -> Command {
        let mut c = Command::new(bin("io-server"));
        c.args(self.args());
        c
    }

    /// `io-server [settings] upgrade`: its exit code, what it printed, and
    /// what its standard error holds (the new daemon's log too).
    fn upgrade(&self, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
        let mut cmd = self.command();
        cmd.arg("upgrade").envs(env.iter().copied());
        let mut p = Proc::spawn(&mut cmd);
        let code = p.wait_timeout(Duration::from_secs(60));
        (code, p.stdout(), p.stderr())
    }

    fn metric(&self, name: &str) -> Option<u64> {
        let text = scrape(self.metrics).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }
}

/// `GET /metrics` on `port`: the body, or why not.
fn scrape(port: u16) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    if !text.lines().next().is_some_and(|l| l.contains(" 200 ")) {
        return Err(text.lines().next().unwrap_or("").to_string());
    }
    Ok(text)
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// `pid N took over from pid M (upgrade K)` → (N, M, K).
fn took_over(line: &str) -> Option<(i32, i32, u64)> {
    let rest = line.trim().strip_prefix("pid ")?;
    let (new, rest) = rest.split_once(" took over from pid ")?;
    let (old, rest) = rest.split_once(" (upgrade ")?;
    let k = rest.strip_suffix(')')?;
    Some((new.parse().ok()?, old.parse().ok()?, k.parse().ok()?))
}

/// The daemon running now, which is no child of the test after an
/// upgrade: stopped with SIGTERM when the test ends, however it ends.
struct Daemon(std::sync::Mutex<i32>);

impl Daemon {
    fn set(&self, pid: i32) {
        *self.0.lock().unwrap() = pid;
    }
    fn pid(&self) -> i32 {
        *self.0.lock().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.pid();
        if pid > 0 && alive(pid) {
            // SAFETY: kill(2) on the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            wait_for(Duration::from_secs(20), || (!alive(pid)).then_some(()));
        }
    }
}

#[test]
fn ten_upgrades_keep_every_listener_serving_and_refuse_no_client() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Settings::new(d);
    let mut first = s.start(&[]);
    let daemon = Daemon(std::sync::Mutex::new(first.pid()));

    // Clients of the metrics listener, one after another, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let scraper = {
        let (stop, served, failed, port) =
            (stop.clone(), served.clone(), failed.clone(), s.metrics);
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut longest = Duration::ZERO;
            let deadline = Instant::now() + Duration::from_secs(240);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let t = Instant::now();
                let r = scrape(port);
                longest = longest.max(t.elapsed());
                match r {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            (errors, longest)
        })
    };

    let mut old = first.pid();
    for k in 1..=10u64 {
        let before = served.load(Ordering::Relaxed);
        let (code, out, err) = s.upgrade(&[]);
        assert_eq!(code, Some(0), "upgrade {k}: {out}{err}");
        let (new, from, count) = took_over(&out).unwrap_or_else(|| panic!("{out}"));
        daemon.set(new);
        assert_eq!((from, count), (old, k), "{out}");
        // The first is the test's child (reaped here); the others were the
        // upgrade commands' children, reaped by init.
        let gone = if k == 1 {
            let code = first.wait_timeout(Duration::from_secs(20));
            assert!(code.is_none_or(|c| c == 0), "the first process exits 0");
            code.map(drop)
        } else {
            wait_for(Duration::from_secs(20), || (!alive(old)).then_some(()))
        };
        assert!(
            gone.is_some(),
            "upgrade {k}: the old process {old} is still there"
        );
        assert!(
            alive(new),
            "upgrade {k}: the new process {new} is gone: {err}"
        );
        // Everything it serves on is the same socket, still there.
        assert!(d.join("saps.sock").exists() && d.join("saps.sock.handoff").exists());
        assert!(io_server_status(d).is_some(), "upgrade {k}: no status");
        assert_eq!(s.metric("saps_upgrades_total"), Some(k));
        // Scrapes went on through the handover.
        let more = wait_for(Duration::from_secs(20), || {
            (served.load(Ordering::Relaxed) > before).then_some(())
        });
        assert!(more.is_some(), "upgrade {k}: no scrape served since");
        old = new;
    }
    stop.store(true, Ordering::Relaxed);
    let (errors, longest) = scraper.join().unwrap();
    println!(
        "ten upgrades: {} scrapes served, {} failed, the longest took {:?}",
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        longest
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "refused or cut scrapes: {errors:?}"
    );
    assert!(served.load(Ordering::Relaxed) >= 10);

    // The fabric and hand-off listeners moved too: a node joins the tenth
    // process and its program is reached through it.
    let port = free_port();
    let node = python_node(d, "web1", "on", ANSWERS, &[&port.to_string()]);
    let answered = wait_for(Duration::from_secs(30), || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        c.write_all(b"after ten\n").ok()?;
        let mut got = String::new();
        c.read_to_string(&mut got).ok()?;
        (got == "B after ten\n").then_some(())
    });
    assert!(
        answered.is_some(),
        "the node is not reached: {}",
        node.stderr()
    );

    // With a node joined, the upgrade is refused and nothing changes.
    let (code, out, err) = s.upgrade(&[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("node(s) joined"), "{err}");
    assert!(alive(old));
    assert_eq!(s.metric("saps_upgrades_total"), Some(10));
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"still\n").unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "B still\n");
}

#[test]
fn a_state_version_the_running_io_server_cannot_read_is_refused_and_it_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Settings::new(d);
    let mut io = s.start(&[]);
    let (code, out, err) = s.upgrade(&[("SAPS_TEST_STATE_VERSION", "999")]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("the new binary reads 999") && err.contains("goes on serving"),
        "{err}"
    );
    assert!(io.running(), "{}", io.stderr());
    assert!(io_server_status(d).is_some());
    assert_eq!(s.metric("saps_upgrades_total"), Some(0));
    // Other listeners than the running one's: refused too.
    let mut cmd = Command::new(bin("io-server"));
    let mut args = s.args();
    args.drain(2..4); // without the tcp:// fabric listener
    cmd.args(&args).arg("upgrade");
    let mut p = Proc::spawn(&mut cmd);
    assert_eq!(p.wait_timeout(Duration::from_secs(60)), Some(1));
    assert!(p.stderr().contains("--fabric differs"), "{}", p.stderr());
    assert!(io.running());
    // And then an upgrade as it should be goes through.
    let (code, out, _) = s.upgrade(&[]);
    assert_eq!(code, Some(0), "{out}");
    let (new, from, _) = took_over(&out).unwrap();
    let _daemon = Daemon(std::sync::Mutex::new(new));
    assert_eq!(from, io.pid());
    assert_eq!(
        io.wait_timeout(Duration::from_secs(20)),
        Some(0),
        "{}",
        io.stderr()
    );
}

#[test]
fn a_new_process_that_dies_at_any_step_before_the_commit_leaves_the_old_one_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Settings::new(d);
    let mut io = s.start(&[]);
    for point in ["request", "state", "fds", "prepared"] {
        let (code, out, err) = s.upgrade(&[("SAPS_TEST_UPGRADE_FAIL_AT", point)]);
        assert_eq!(code, Some(1), "{point}: {out}{err}");
        assert!(err.contains("without a word"), "{point}: {err}");
        // The old process notices (the pair's end closes) and resumes.
        let serving = wait_for(Duration::from_secs(20), || {
            (io_server_status(d).is_some() && scrape(s.metrics).is_ok()).then_some(())
        });
        assert!(serving.is_some(), "{point}: {}", io.stderr());
        assert!(io.running(), "{point}: {}", io.stderr());
        assert_eq!(s.metric("saps_upgrades_total"), Some(0), "{point}");
    }
    // Still able to hand over afterwards.
    let (code, out, _) = s.upgrade(&[]);
    assert_eq!(code, Some(0), "{out}");
    let (new, from, k) = took_over(&out).unwrap();
    let _daemon = Daemon(std::sync::Mutex::new(new));
    assert_eq!((from, k), (io.pid(), 1));
    assert_eq!(io.wait_timeout(Duration::from_secs(20)), Some(0));
    assert!(d.join("saps.sock").exists());
}

/// The live processes whose command line holds `needle` and ends with
/// `upgrade` and that lead their own session: the processes that took
/// over.
fn taken_over_by(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.contains(needle)) && args.last().is_some_and(|a| a == "upgrade") {
            pids.push(pid);
        }
    }
    // Only the daemons, each the leader of its own session (`setsid`): not
    // the command that forked one, nor a daemon's launcher (forks with the
    // same command line).
    let session = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(3)?.parse().ok()
    };
    pids.retain(|&p| session(p) == Some(p));
    pids
}

#[test]
fn sigusr2_upgrades_as_the_command_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Settings::new(d);
    let mut io = s.start(&[]);
    let daemon = Daemon(std::sync::Mutex::new(0));
    for k in 1..=2u64 {
        let old = if k == 1 { io.pid() } else { daemon.pid() };
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(old, libc::SIGUSR2) };
        let needle = d.join("control.sock").display().to_string();
        let new = wait_for(Duration::from_secs(30), || {
            let pids: Vec<i32> = taken_over_by(&needle)
                .into_iter()
                .filter(|&p| p != old)
                .collect();
            (s.metric("saps_upgrades_total") == Some(k) && pids.len() == 1).then(|| pids[0])
        });
        let new = new.unwrap_or_else(|| panic!("SIGUSR2 {k}: no takeover: {}", io.stderr()));
        daemon.set(new);
        let gone = if k == 1 {
            io.wait_timeout(Duration::from_secs(20)).map(drop)
        } else {
            wait_for(Duration::from_secs(20), || (!alive(old)).then_some(()))
        };
        assert!(
            gone.is_some(),
            "SIGUSR2 {k}: the old process {old} is still there"
        );
        assert!(io_server_status(d).is_some());
    }
}

/// One notification and the pid that sent it (`SO_PASSCRED`).
fn notification(rx: &UnixDatagram) -> (String, i32) {
    use nix_free::recv_with_pid;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no notification within 30 s");
        rx.set_read_timeout(Some(left)).unwrap();
        let (text, pid) = recv_with_pid(rx);
        if text != "WATCHDOG=1\n" {
            return (text, pid);
        }
    }
}

/// `recvmsg` with `SCM_CREDENTIALS`, in libc (the tests crate has no nix).
mod nix_free {
    use super::*;

    pub fn recv_with_pid(rx: &UnixDatagram) -> (String, i32) {
        let mut buf = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain data; zeroed is its empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: every pointer in `msg` points into live locals.
        let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut msg, 0) };
        assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        let mut pid = 0;
        // SAFETY: walking the control messages the kernel just wrote.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                    let cred = libc::CMSG_DATA(c).cast::<libc::ucred>().read_unaligned();
                    pid = cred.pid;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        (
            String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
            pid,
        )
    }
}

#[test]
fn systemd_hears_reloading_and_mainpid_from_the_old_process_then_ready_from_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Settings::new(d);
    let socket = d.join("notify");
    let rx = UnixDatagram::bind(&socket).unwrap();
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) with a live int.
    let r = unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of_val(&one) as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    let env = [("NOTIFY_SOCKET", socket.to_str().unwrap())];
    let mut io = s.start(&env);
    let (ready, pid) = notification(&rx);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert_eq!(pid, io.pid());

    let (code, out, err) = s.upgrade(&env);
    assert_eq!(code, Some(0), "{out}{err}");
    let (new, _, _) = took_over(&out).unwrap();
    let _daemon = Daemon(std::sync::Mutex::new(new));
    let (reloading, from) = notification(&rx);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert!(reloading.contains("STATUS=upgrading"), "{reloading:?}");
    assert_eq!(from, io.pid());
    let (mainpid, from) = notification(&rx);
    assert_eq!(mainpid, format!("MAINPID={new}\n"));
    assert_eq!(
        from,
        io.pid(),
        "MAINPID= comes from the main process, the old one"
    );
    let (ready, from) = notification(&rx);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert_eq!(from, new);
    assert_eq!(io.wait_timeout(Duration::from_secs(20)), Some(0));

    // A refused upgrade is refused before anything stops: systemd hears
    // nothing of it. The next notification is the new process's own
    // answer to a SIGHUP.
    let (code, _, _) = s.upgrade(&[
        ("NOTIFY_SOCKET", socket.to_str().unwrap()),
        ("SAPS_TEST_STATE_VERSION", "7"),
    ]);
    assert_eq!(code, Some(1));
    assert!(alive(new));
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(new, libc::SIGHUP) };
    let (next, from) = notification(&rx);
    assert!(
        next.starts_with("RELOADING=1\n") && next.ends_with("STATUS=reloading\n"),
        "{next:?}"
    );
    assert_eq!(from, new);
}

//! `io-server upgrade` (issue 19): a new process takes the running
//! io-server's listening sockets and state over, and the old one exits;
//! while it happens, clients of its listeners are never refused. Refused,
//! with the old process serving on: a state version it cannot read,
//! other settings. Joined nodes move with their open connections. And
//! systemd hears of it in order: `RELOADING=1` and `MAINPID=` from the old
//! process, `READY=1` from the new one.

use saps_tests::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn ten_upgrades_keep_every_listener_serving_and_refuse_no_client() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = UpgradeSettings::new(d);
    let mut first = s.start(&[]);
    let daemon = UpgradedDaemon::new(first.pid()).in_dir(d);

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
                let r = scrape_metrics(port);
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
        let (code, out, err) = s.upgrade_output(&[]);
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
            wait_for(Duration::from_secs(20), || (!pid_alive(old)).then_some(()))
        };
        assert!(
            gone.is_some(),
            "upgrade {k}: the old process {old} is still there"
        );
        assert!(
            pid_alive(new),
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

    // With a node joined, the upgrade carries it over.
    let (code, out, err) = s.upgrade_output(&[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(s.metric("saps_upgrades_total"), Some(11));
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"still\n").unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "B still\n");
}

/// A python program that echoes every connection on port `argv[1]` until
/// the client closes it.
const ECHO: &str = r#"
import asyncio, sys
async def echo(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(echo, "0.0.0.0", int(sys.argv[1]), backlog=1024)
    await s.serve_forever()
asyncio.run(main())
"#;

/// One echoed exchange of `msg` on `c`.
fn echoes(c: &mut std::net::TcpStream, msg: &[u8]) -> Result<(), String> {
    c.write_all(msg).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).map_err(|e| e.to_string())?;
    match got == msg {
        true => Ok(()),
        false => Err(format!("echoed {:?}", String::from_utf8_lossy(&got))),
    }
}

/// `io-server status`'s node lines (`  NAME (ID) from PEER[, zero-relay]`),
/// sorted, counters cut off.
fn nodes(dir: &Path) -> Vec<String> {
    let Some(table) = io_server_status(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = table
        .lines()
        .skip_while(|l| *l != "Nodes")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            l.split("  ")
                .find(|w| !w.is_empty())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn joined_nodes_and_their_open_connections_move_to_the_new_process() {
    if !have("python3") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = UpgradeSettings::new(d);
    let mut io = s.start(&[]);
    let daemon = UpgradedDaemon::new(io.pid()).in_dir(d);
    // One node takes accepted sockets itself (zero-relay), one is relayed.
    let (handed, relayed) = (free_port(), free_port());
    let zero = python_node(d, "zero", "on", ECHO, &[&handed.to_string()]);
    let relay = python_node(d, "relay", "off", ECHO, &[&relayed.to_string()]);
    let mut conns = Vec::new();
    for port in [handed, relayed] {
        for i in 0..20 {
            let mut c = wait_for(Duration::from_secs(30), || {
                let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
                c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                echoes(&mut c, b"hello\n").ok().map(|_| c)
            })
            .unwrap_or_else(|| {
                panic!(
                    "port {port}, connection {i}: no echo: {} {}",
                    zero.stderr(),
                    relay.stderr()
                )
            });
            // Half of them with octets the server has not echoed yet.
            if i % 2 == 0 {
                c.write_all(b"in flight\n").unwrap();
            }
            conns.push((port, i, c));
        }
    }
    // Both joined, the same-host one taking its sockets itself.
    let before = wait_for(Duration::from_secs(20), || {
        let n = nodes(d);
        (n.len() == 2 && n.iter().any(|l| l.ends_with(", zero-relay"))).then_some(n)
    })
    .unwrap_or_else(|| panic!("{:?}", nodes(d)));
    // A new process that dies before the commit: the old one goes on, its
    // nodes and connections with it.
    // (At `restore` it refuses what it rebuilt, running its destructors:
    // none may shut a socket down or remove a path the old one serves on.)
    for point in ["fds", "prepared", "commit", "restore"] {
        let (code, out, err) = s.upgrade_output(&[("SAPS_TEST_UPGRADE_FAIL_AT", point)]);
        assert_ne!(code, Some(0), "{point}: {out}{err}");
        assert!(
            point != "restore" || err.contains("FAIL_AT=restore"),
            "{err}"
        );
        assert!(pid_alive(io.pid()), "{point}: the old process is gone");
        assert_eq!(
            nodes(d),
            before,
            "{point}: the upgrade said:\n{err}\nthe io-server:\n{}\nthe nodes:\n{}\n{}",
            io.stderr(),
            zero.stderr(),
            relay.stderr()
        );
        assert!(d.join("saps.sock").exists() && d.join("saps.sock.handoff").exists());
        for (port, i, c) in &mut conns {
            let msg = format!("after a failed upgrade at {point}, conn {i}\n");
            let want = match (point, *i % 2) {
                ("fds", 0) => format!("in flight\n{msg}"),
                _ => msg.clone(),
            };
            c.write_all(msg.as_bytes()).unwrap();
            let mut got = vec![0u8; want.len()];
            c.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{point}: port {port} conn {i}: {e}"));
            assert_eq!(String::from_utf8_lossy(&got), want);
        }
    }
    for round in 1..=3u64 {
        let (code, out, err) = s.upgrade_output(&[]);
        assert_eq!(code, Some(0), "upgrade {round}: {out}{err}");
        let (new, old, k) = took_over(&out).unwrap_or_else(|| panic!("{out}"));
        assert_eq!(k, round);
        // The first is the test's child, reaped here.
        let gone = match round {
            1 => io.wait_timeout(Duration::from_secs(20)).map(drop),
            _ => wait_for(Duration::from_secs(20), || (!pid_alive(old)).then_some(())),
        };
        assert!(gone.is_some(), "the old process {old} is still there");
        daemon.set(new);
        assert_eq!(nodes(d), before, "the nodes kept their ids");
        for (port, i, c) in &mut conns {
            let msg = format!("round {round} conn {i}\n");
            echoes(c, msg.as_bytes()).unwrap_or_else(|e| panic!("port {port} conn {i}: {e}"));
        }
        for port in [handed, relayed] {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            echoes(&mut c, b"new\n").unwrap_or_else(|e| panic!("new on {port}: {e}"));
        }
    }
    drop((zero, relay, io));
}

/// A listening socket on 127.0.0.1 whose accept queue is full: the
/// kernel drops the SYNs of further connects, which stay in progress
/// (retransmitting) until the queue has room. Its port, the listener and
/// the clients filling the queue.
fn full_listener() -> (u16, std::net::TcpListener, Vec<std::net::TcpStream>) {
    // SAFETY: plain socket calls on a descriptor made here and then owned.
    let l = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let l = <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0);
        assert_eq!(libc::listen(fd, 0), 0);
        l
    };
    let port = l.local_addr().unwrap().port();
    // A backlog of 0 holds one connection; the second fills nothing but
    // makes sure.
    let fillers = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(
                &(std::net::Ipv4Addr::LOCALHOST, port).into(),
                Duration::from_millis(500),
            )
            .ok()
        })
        .collect();
    (port, l, fillers)
}

/// Whether a TCP socket of this host is in SYN_SENT towards `port`
/// (`/proc/net/tcp`: state 02, the remote address's port in hex).
fn syn_sent_to(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[2].ends_with(&remote) && f[3] == "02"
    })
}

/// Connects to `argv[1]` on 127.0.0.1, says so, and prints what comes back.
const CONNECTS: &str = r#"
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
c.sendall(b"from node\n")
print("got", c.recv(100).decode().strip(), flush=True)
"#;

#[test]
fn an_outbound_connect_in_progress_moves_and_the_new_process_answers_it() {
    if !have("python3") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut s = UpgradeSettings::new(d);
    s.extra.push("--allow-connect-local".into());
    let mut io = s.start(&[]);
    let daemon = UpgradedDaemon::new(io.pid()).in_dir(d);
    let (port, listener, fillers) = full_listener();
    // Loopback through the io-server, so that its connect is the one in
    // progress.
    let node = Proc::spawn(
        Command::new(bin("saps-run"))
            .args([
                "--io-server",
                &format!("unix:{}", d.join("saps.sock").display()),
            ])
            .args(["--token-file", d.join("token").to_str().unwrap()])
            .args(["--node", "out", "--loopback", "cluster", "--"])
            .args([PYTHON, "-c", CONNECTS, &port.to_string()]),
    );
    let in_progress = wait_for(Duration::from_secs(30), || syn_sent_to(port).then_some(()));
    assert!(
        in_progress.is_some(),
        "no connect in progress: {}",
        node.stderr()
    );

    let (code, out, err) = s.upgrade_output(&[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (new, _, _) = took_over(&out).unwrap_or_else(|| panic!("{out}"));
    daemon.set(new);
    assert!(
        io.wait_timeout(Duration::from_secs(20)).is_some(),
        "the old process is still there"
    );
    assert!(
        syn_sent_to(port),
        "the connect is still in progress after the upgrade"
    );

    // Room in the queue: the next SYN gets through, to the new process.
    drop(fillers);
    listener.set_nonblocking(false).unwrap();
    let answered = wait_for(Duration::from_secs(30), || {
        let (mut c, _) = listener.accept().ok()?;
        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut line = [0u8; 10];
        c.read_exact(&mut line).ok()?;
        (&line == b"from node\n").then_some(c)
    });
    let mut c =
        answered.unwrap_or_else(|| panic!("the node's connection never came: {}", node.stderr()));
    c.write_all(b"from server\n").unwrap();
    let got = wait_for(Duration::from_secs(30), || {
        node.stdout().contains("got from server").then_some(())
    });
    assert!(got.is_some(), "{} {}", node.stdout(), node.stderr());
}

#[test]
fn a_state_version_the_running_io_server_cannot_read_is_refused_and_it_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = UpgradeSettings::new(d);
    let mut io = s.start(&[]);
    let (code, out, err) = s.upgrade_output(&[("SAPS_TEST_STATE_VERSION", "999")]);
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
    let (code, out, _) = s.upgrade_output(&[]);
    assert_eq!(code, Some(0), "{out}");
    let (new, from, _) = took_over(&out).unwrap();
    let _daemon = UpgradedDaemon::new(new).in_dir(d);
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
    let s = UpgradeSettings::new(d);
    let mut io = s.start(&[]);
    for point in ["request", "state", "fds", "prepared", "commit"] {
        let (code, out, err) = s.upgrade_output(&[("SAPS_TEST_UPGRADE_FAIL_AT", point)]);
        assert_eq!(code, Some(1), "{point}: {out}{err}");
        assert!(err.contains("without a word"), "{point}: {err}");
        // The old process notices (the pair's end closes) and resumes.
        let serving = wait_for(Duration::from_secs(20), || {
            (io_server_status(d).is_some() && scrape_metrics(s.metrics).is_ok()).then_some(())
        });
        assert!(serving.is_some(), "{point}: {}", io.stderr());
        assert!(io.running(), "{point}: {}", io.stderr());
        assert_eq!(s.metric("saps_upgrades_total"), Some(0), "{point}");
    }
    // Still able to hand over afterwards.
    let (code, out, _) = s.upgrade_output(&[]);
    assert_eq!(code, Some(0), "{out}");
    let (new, from, k) = took_over(&out).unwrap();
    let _daemon = UpgradedDaemon::new(new).in_dir(d);
    assert_eq!((from, k), (io.pid(), 1));
    assert_eq!(io.wait_timeout(Duration::from_secs(20)), Some(0));
    assert!(d.join("saps.sock").exists());
}

/// The live processes whose command line holds `needle` and ends with
/// `upgrade` and that lead their own session: the processes that took
/// over.
fn taken_over_by(needle: &str) -> Vec<i32> {
    let mut pids = processes(|args| {
        args.iter().any(|a| a.contains(needle)) && args.last().is_some_and(|a| a == "upgrade")
    });
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
    let s = UpgradeSettings::new(d);
    let mut io = s.start(&[]);
    let daemon = UpgradedDaemon::new(0).in_dir(d);
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
            wait_for(Duration::from_secs(20), || (!pid_alive(old)).then_some(()))
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
    let s = UpgradeSettings::new(d);
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

    let (code, out, err) = s.upgrade_output(&env);
    assert_eq!(code, Some(0), "{out}{err}");
    let (new, _, _) = took_over(&out).unwrap();
    let _daemon = UpgradedDaemon::new(new).in_dir(d);
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
    let (code, _, _) = s.upgrade_output(&[
        ("NOTIFY_SOCKET", socket.to_str().unwrap()),
        ("SAPS_TEST_STATE_VERSION", "7"),
    ]);
    assert_eq!(code, Some(1));
    assert!(pid_alive(new));
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(new, libc::SIGHUP) };
    let (next, from) = notification(&rx);
    assert!(
        next.starts_with("RELOADING=1\n") && next.ends_with("STATUS=reloading\n"),
        "{next:?}"
    );
    assert_eq!(from, new);
}

#[test]
fn a_daemon_whose_log_pipe_is_closed_still_serves_and_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = UpgradeSettings::new(d);
    // Its standard error a pipe whose reader goes away once it serves (a
    // terminal closed, a log reader that died): every later log line
    // fails to be written.
    let mut io = s
        .command()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _daemon = UpgradedDaemon::new(io.id() as i32).in_dir(d);
    let up = wait_for(Duration::from_secs(20), || io_server_status(d));
    assert!(up.is_some(), "io-server did not start");
    drop(io.stderr.take());
    for k in 1..=2u64 {
        let (code, out, err) = s.upgrade_output(&[]);
        assert_eq!(code, Some(0), "upgrade {k}: {out}{err}");
        let (_, _, n) = took_over(&out).unwrap_or_else(|| panic!("{out}"));
        assert_eq!(n, k);
    }
    assert!(io_server_status(d).is_some());
    let status = wait_for(Duration::from_secs(20), || io.try_wait().ok().flatten());
    assert_eq!(status.and_then(|s| s.code()), Some(0), "the first daemon");
}

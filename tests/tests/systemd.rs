//! The io-server under systemd (issue 19): the readiness protocol on a
//! `NOTIFY_SOCKET` the test listens on — READY=1 once serving, WATCHDOG=1
//! when asked, RELOADING=1 with MONOTONIC_USEC= and READY=1 again on
//! SIGHUP, STOPPING=1 on SIGTERM, in that order, all sent from inside the
//! io-server's sandbox without a refused call — and the unit files of
//! `dist/systemd`, checked by `systemd-analyze verify`.

use saps_tests::*;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The next notification other than WATCHDOG=1 (those are counted in
/// `watchdogs`), within 20 s.
fn next(rx: &UnixDatagram, watchdogs: &mut usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no notification within 20 s");
        rx.set_read_timeout(Some(left)).unwrap();
        let n = rx.recv(&mut buf).expect("a notification");
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if m == "WATCHDOG=1\n" {
            *watchdogs += 1;
            continue;
        }
        return m;
    }
}

#[test]
fn the_io_server_notifies_ready_reloading_and_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_token(&d.join("token"), "cluster secret\n");
    let socket = d.join("notify");
    let rx = UnixDatagram::bind(&socket).unwrap();
    let mut cmd = Command::new(bin("io-server"));
    cmd.env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID");
    let fabric = format!("unix:{}", d.join("saps.sock").display());
    let mut io = start_io_server(cmd, d, &fabric, "127.0.0.1");
    let mut watchdogs = 0;

    let ready = next(&rx, &mut watchdogs);
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving nodes on unix:"),
        "{ready:?}"
    );
    // Ready means bound: the fabric socket is there.
    assert!(d.join("saps.sock").exists());
    // WATCHDOG_USEC=200000: a ping every 100 ms.
    let pinged = wait_for(Duration::from_secs(10), || {
        rx.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).ok()?;
        (&buf[..n] == b"WATCHDOG=1\n").then_some(())
    });
    assert!(pinged.is_some(), "no WATCHDOG=1");

    io.signal(libc::SIGHUP);
    let reloading = next(&rx, &mut watchdogs);
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|r| r.split_once('\n'))
        .and_then(|(v, rest)| (rest == "STATUS=reloading\n").then_some(v))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(usec.is_some_and(|u| u > 0), "{reloading:?}");
    let ready = next(&rx, &mut watchdogs);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(io.running(), "SIGHUP does not stop it: {}", io.stderr());
    assert!(io_server_status(d).is_some());
    // Every message was sent from inside the sandbox, none refused.
    assert_eq!(control_sandbox(d), "ok: 0 system calls refused\n");

    io.signal(libc::SIGTERM);
    let stopping = next(&rx, &mut watchdogs);
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=shutting down"),
        "{stopping:?}"
    );
    assert_eq!(
        io.wait_timeout(Duration::from_secs(20)),
        Some(0),
        "{}",
        io.stderr()
    );
}

fn control_sandbox(d: &Path) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.join("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"sandbox\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's program exists: point it at the
    // built binaries; and the template is verified as an instance.
    let bins = bin("io-server").parent().unwrap().display().to_string();
    for (from, to) in [
        ("io-server.service", "io-server.service"),
        ("saps-run@.service", "saps-run@web1.service"),
    ] {
        let text = std::fs::read_to_string(units.join(from)).unwrap();
        let text = text.replace("/usr/local/bin", &bins);
        std::fs::write(dir.path().join(to), text).unwrap();
    }
    for unit in ["io-server.service", "saps-run@web1.service"] {
        let o = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join(unit)));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.trim().is_empty(), "{unit}: {err}");
    }
}

//! The io-server confines its own threads to an allow-list of system calls
//! once it serves (saps-sandbox): a call outside the list fails with EPERM
//! and is logged, and the io-server goes on serving; `--no-sandbox` turns
//! it off.

use saps_tests::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// One control command, as `io-server status` sends it; the reply.
fn control(d: &Path, command: &str) -> String {
    let mut s = UnixStream::connect(d.join("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn a_call_outside_the_io_servers_allow_list_fails_with_eperm_and_it_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = unix_io_server(d);
    assert_eq!(control(d, "sandbox"), "ok: 0 system calls refused\n");
    assert_eq!(
        control(d, "sandbox probe"),
        "ok: mkdir returned EPERM: Operation not permitted\n"
    );
    assert_eq!(control(d, "sandbox"), "ok: 1 system calls refused\n");
    // glibc's mkdir is the mkdir system call where the ABI has one.
    #[cfg(target_arch = "x86_64")]
    let nr = libc::SYS_mkdir;
    #[cfg(not(target_arch = "x86_64"))]
    let nr = libc::SYS_mkdirat;
    let refused = format!("io-server: sandbox: refused system call {nr} with EPERM");
    assert!(
        wait_for(Duration::from_secs(10), || io
            .stderr()
            .contains(&refused)
            .then_some(()))
        .is_some(),
        "{}",
        io.stderr()
    );

    // Still serving: a node joins and its program answers a client.
    let port = free_port();
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("who"), "confined\n").unwrap();
    let _node = Proc::spawn(
        unix_node(d, "a", "off")
            .args([PYTHON, "-m", "http.server", &port.to_string()])
            .current_dir(www.path()),
    );
    let url = format!("http://127.0.0.1:{port}/who");
    assert!(wait_http(&url, Duration::from_secs(30)), "{}", io.stderr());
    assert_eq!(curl(&[&url]).1, "confined\n");
    assert!(io_server_status(d).is_some_and(|s| s.contains("a (")));
}

#[test]
fn no_sandbox_leaves_the_io_server_unconfined() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_token(&d.join("token"), "s3cret\n");
    let _io = Proc::spawn(Command::new(bin("io-server")).args([
        "--fabric",
        &format!("unix:{}", d.join("saps.sock").display()),
        "--token-file",
        d.join("token").to_str().unwrap(),
        "--control",
        d.join("control.sock").to_str().unwrap(),
        "--no-sandbox",
    ]));
    assert!(wait_for(Duration::from_secs(20), || io_server_status(d)).is_some());
    assert_eq!(
        control(d, "sandbox probe"),
        "ok: mkdir returned ENOENT: No such file or directory\n"
    );
}

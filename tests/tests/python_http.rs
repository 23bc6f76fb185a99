//! `saps-run -- python3 -m http.server`: the quick start, end to end.

use saps_tests::*;
use std::process::Command;
use std::time::Duration;

/// A python http.server in a fresh directory holding `hello.txt`.
fn python_server(dir: &std::path::Path, port: u16, extra: &[&str]) -> Proc {
    std::fs::write(dir.join("hello.txt"), "hello through one address\n").unwrap();
    let mut cmd = Command::new(bin("saps-run"));
    cmd.args(extra)
        .args(["--", PYTHON, "-u", "-m", "http.server", &port.to_string()])
        .current_dir(dir);
    Proc::spawn(&mut cmd)
}

/// The README's quick start, with its flags: none (native sockets).
#[test]
fn python_http_server_serves_a_file_through_the_embedded_io_server() {
    serves_a_file(&[]);
}

#[test]
fn python_http_server_serves_a_file_through_virtual_sockets() {
    serves_a_file(&["--address", "127.0.0.1"]);
}

fn serves_a_file(flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = python_server(dir.path(), port, flags);
    let url = format!("http://127.0.0.1:{port}/hello.txt");
    assert!(
        wait_http(&url, Duration::from_secs(20)),
        "server never answered; stderr:\n{}",
        server.stderr()
    );
    let (code, body, err) = curl(&[&url]);
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(body, "hello through one address\n");
}

/// The client is in another network namespace, so its address is not
/// loopback: python must log exactly that address.
/// `zero_relay` "native": saps-run's defaults (the kernel's own sockets).
fn python_sees_the_clients_real_address(zero_relay: &str) {
    let Some(ns) = Netns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let address = ns.host_ip.to_string();
    let flags = match zero_relay {
        "native" => vec![],
        z => vec!["--address", &address, "--zero-relay", z],
    };
    let server = python_server(dir.path(), port, &flags);
    let url = format!("http://{}:{port}/hello.txt", ns.host_ip);
    let got = wait_for(Duration::from_secs(20), || {
        let o = run(ns.command("curl").args(["-sS", "--max-time", "5", &url]));
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    assert_eq!(
        got.as_deref(),
        Some("hello through one address\n"),
        "stderr:\n{}",
        server.stderr()
    );
    let logged = http_server_logged(&server, "/hello.txt").expect("python logged the request");
    assert!(
        logged.starts_with(&format!("{} ", ns.ns_ip)),
        "python should log the client's address {}: {logged}",
        ns.ns_ip
    );
}

#[test]
fn python_sees_the_clients_real_address_relayed() {
    python_sees_the_clients_real_address("off");
}

#[test]
fn python_sees_the_clients_real_address_zero_relay() {
    python_sees_the_clients_real_address("on");
}

#[test]
fn python_sees_the_clients_real_address_native_sockets() {
    python_sees_the_clients_real_address("native");
}

#[test]
fn the_program_exit_status_is_saps_runs() {
    let o = run(Command::new(bin("saps-run")).args(["--", "sh", "-c", "exit 7"]));
    assert_eq!(o.status.code(), Some(7));
    let o = run(Command::new(bin("saps-run")).args(["--", "sh", "-c", "kill -TERM $$"]));
    assert_eq!(o.status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let o = run(Command::new(bin("saps-run")).args(["--", "/nonexistent/program"]));
    assert_eq!(o.status.code(), Some(127));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/program") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn sigterm_to_saps_run_stops_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = python_server(dir.path(), port, &["--address", "127.0.0.1"]);
    assert!(wait_http(
        &format!("http://127.0.0.1:{port}/hello.txt"),
        Duration::from_secs(20)
    ));
    server.signal(libc::SIGTERM);
    let code = server
        .wait_timeout(Duration::from_secs(10))
        .expect("saps-run exits after SIGTERM");
    // python dies of the forwarded SIGTERM.
    assert_eq!(code, 128 + libc::SIGTERM);
}

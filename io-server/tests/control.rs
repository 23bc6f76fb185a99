//! The operator's side: `io-server status` / `io-server weight` over the
//! control socket, graceful shutdown, and the binary's CLI messages.

mod common;
use common::*;
use saps_io_server::{control, SchedulerKind};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_weight_over_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    let server = server(saps_io_server::Config {
        control: Some(ctl.clone()),
        ..config(SchedulerKind::Wrr)
    })
    .await;
    let (a, b, addr) = two_nodes(&server, (3, App::Echo), (1, App::Echo)).await;
    let mut s = connect_one(addr, None, &[&a, &b]).await;
    echoes(&mut s, b"12345").await;
    let text = control::request(&ctl, "status").await.unwrap();
    println!("{text}");
    assert!(text.contains(&format!("TCP  {addr} wrr")), "{text}");
    assert!(
        text.contains("  -> a (") && text.contains("  -> b ("),
        "{text}"
    );
    let reply = control::request(&ctl, "weight b 0").await.unwrap();
    assert_eq!(reply, "ok: weight of b is now 0\n");
    assert_eq!(
        server
            .status()
            .nodes
            .iter()
            .find(|n| n.name == "b")
            .unwrap()
            .weight,
        0
    );
    let err = control::request(&ctl, "weight nobody 1").await.unwrap_err();
    assert!(err.to_string().contains("no node named nobody"), "{err}");
    let err = control::request(&ctl, "frobnicate").await.unwrap_err();
    assert!(err.to_string().contains("unknown command"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stops_accepting_and_lets_connections_finish() {
    let server = server(config(SchedulerKind::Rr)).await;
    let (a, b, addr) = two_nodes(&server, (1, App::Echo), (1, App::Echo)).await;
    let mut open = connect_one(addr, None, &[&a, &b]).await;
    let srv = server.clone();
    let shutdown = tokio::spawn(async move { srv.shutdown(LIMIT).await });
    // New clients are refused once the listeners are closed.
    wait_until("the listener to close", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    // The open connection still works, then finishes.
    echoes(&mut open, b"bye").await;
    drop(open);
    let cut = tokio::time::timeout(LIMIT, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cut, 0, "nothing was cut");
}

fn io_server(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_io-server"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn cli_help_and_errors_are_clear() {
    let (ok, help) = io_server(&["--help"]);
    assert!(ok);
    for flag in [
        "--fabric",
        "--address",
        "--scheduler",
        "--token-file",
        "--allow-ports",
        "--control",
        "--config",
        "status",
        "weight",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}");
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "  s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let token = token.to_str().unwrap();
    let (ok, err) = io_server(&["--fabric", "unix:/tmp/x.sock"]);
    assert!(!ok && err.contains("no token"), "{err}");
    // --stack smoltcp without a specific address, then without a TAP.
    for (more, says) in [
        (&[][..], "--stack smoltcp needs the single address"),
        (&["--address", "192.0.2.2"][..], "--tap NAME or --tap-fd N"),
    ] {
        let mut args = vec![
            "--fabric",
            "unix:/tmp/x.sock",
            "--token-file",
            token,
            "--stack",
            "smoltcp",
        ];
        args.extend_from_slice(more);
        let (ok, err) = io_server(&args);
        assert!(!ok && err.contains(says), "{err}");
    }
    let (ok, err) = io_server(&["--token-file", token]);
    assert!(!ok && err.contains("no --fabric given"), "{err}");
    let (ok, err) = io_server(&["--allow-ports", "80-x"]);
    assert!(!ok && err.contains("bad port list"), "{err}");
    let ctl = dir.path().join("none.ctl");
    let (ok, err) = io_server(&["status", "--control", ctl.to_str().unwrap()]);
    assert!(!ok && err.contains("is the io-server running"), "{err}");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "scheduler = \"fast\"\n").unwrap();
    let (ok, err) = io_server(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("is not valid"), "{err}");
}

//! Application nodes behind a standalone io-server: two nodes share one
//! port (the single address of the cluster), and a node survives an
//! io-server restart.

use saps_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// An io-server on `DIR/saps.sock` with control socket `DIR/control.sock`.
fn io_server(d: &Path) -> Proc {
    let sock = d.join("saps.sock");
    if !d.join("token").exists() {
        std::fs::write(d.join("token"), "cluster secret\n").unwrap();
    }
    let io = Proc::spawn(Command::new(bin("io-server")).args([
        "--fabric",
        &format!("unix:{}", sock.display()),
        "--address",
        "127.0.0.1",
        "--scheduler",
        "rr",
        "--token-file",
        d.join("token").to_str().unwrap(),
        "--control",
        d.join("control.sock").to_str().unwrap(),
    ]));
    let up = wait_for(Duration::from_secs(20), || {
        let o = run(Command::new(bin("io-server")).args([
            "status",
            "--control",
            d.join("control.sock").to_str().unwrap(),
        ]));
        o.status.success().then_some(())
    });
    assert!(up.is_some(), "io-server did not start: {}", io.stderr());
    io
}

/// `saps-run --node NAME -- python3 -m http.server PORT` serving
/// `DIR/NAME/who` = "node NAME".
fn python_node(d: &Path, name: &str, port: u16) -> Proc {
    let www = d.join(name);
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("who"), format!("node {name}\n")).unwrap();
    Proc::spawn(
        Command::new(bin("saps-run"))
            .args([
                "--io-server",
                &format!("unix:{}", d.join("saps.sock").display()),
                "--token-file",
                d.join("token").to_str().unwrap(),
                "--node",
                name,
                "--",
                PYTHON,
                "-m",
                "http.server",
                &port.to_string(),
            ])
            .current_dir(&www),
    )
}

#[test]
fn two_python_nodes_share_one_port_behind_one_io_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = io_server(d);
    let port = free_port();
    let nodes: Vec<Proc> = ["a", "b"].iter().map(|n| python_node(d, n, port)).collect();
    let url = format!("http://127.0.0.1:{port}/who");
    // Both nodes have joined the group once each has answered; round robin
    // then alternates, so a few requests reach both.
    let mut seen = std::collections::BTreeSet::new();
    let ok = wait_for(Duration::from_secs(30), || {
        let (code, body, _) = curl(&[&url]);
        if code == 0 {
            seen.insert(body);
        }
        (seen.len() == 2).then_some(())
    });
    assert!(
        ok.is_some(),
        "saw only {seen:?}\nio-server: {}\nnode a: {}\nnode b: {}",
        io.stderr(),
        nodes[0].stderr(),
        nodes[1].stderr()
    );
    let status = run(Command::new(bin("io-server")).args([
        "status",
        "--control",
        d.join("control.sock").to_str().unwrap(),
    ]));
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for name in ["a", "b"] {
        assert!(
            table.split_whitespace().any(|w| w == name),
            "status lists node {name}:\n{table}"
        );
    }
}

#[test]
fn a_node_rejoins_a_restarted_io_server_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut first = io_server(d);
    let port = free_port();
    let mut node = python_node(d, "a", port);
    let url = format!("http://127.0.0.1:{port}/who");
    assert!(
        wait_http(&url, Duration::from_secs(30)),
        "node never served: {}",
        node.stderr()
    );
    first.signal(libc::SIGKILL);
    assert!(first.wait_timeout(Duration::from_secs(10)).is_some());
    let (code, _, _) = curl(&[&url]);
    assert_ne!(code, 0, "nothing listens while the io-server is down");
    let second = io_server(d);
    assert!(
        wait_http(&url, Duration::from_secs(30)),
        "node did not serve again after the restart\nnode: {}\nio-server: {}",
        node.stderr(),
        second.stderr()
    );
    assert!(node.running(), "saps-run and python kept running");
}

//! Two application nodes behind one io-server share a port: the single
//! address of the cluster.

use saps_tests::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn two_python_nodes_share_one_port_behind_one_io_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("saps.sock");
    std::fs::write(d.join("token"), "cluster secret\n").unwrap();
    let port = free_port();
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
    assert!(
        wait_for(Duration::from_secs(20), || sock.exists().then_some(())).is_some(),
        "io-server did not start: {}",
        io.stderr()
    );
    let nodes: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|name| {
            let www = d.join(name);
            std::fs::create_dir_all(&www).unwrap();
            std::fs::write(www.join("who"), format!("node {name}\n")).unwrap();
            Proc::spawn(
                Command::new(bin("saps-run"))
                    .args([
                        "--io-server",
                        &format!("unix:{}", sock.display()),
                        "--token-file",
                        d.join("token").to_str().unwrap(),
                        "--node",
                        name,
                        "--",
                        "python3",
                        "-m",
                        "http.server",
                        &port.to_string(),
                    ])
                    .current_dir(&www),
            )
        })
        .collect();
    let url = format!("http://127.0.0.1:{port}/who");
    // Both nodes have joined the group once each has answered; round robin
    // then alternates, so 20 requests reach both.
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
    assert!(table.contains(" a ") || table.contains("a "), "{table}");
    eprintln!("{table}");
}

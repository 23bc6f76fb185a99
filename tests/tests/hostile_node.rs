//! Issue 24, through real programs under saps-run joined to a standalone
//! io-server (`--loopback cluster`, so that the program's loopback is the
//! gateway's): a node's `connect()` to the io-server's own metrics address
//! is refused (EACCES: Python's PermissionError), one to a service of the
//! gateway host that no listener group serves answers ECONNREFUSED, a
//! listener group of the cluster stays reachable, and a node announcing a
//! weight above `--max-weight` is refused with the cap in its error.

use saps_tests::*;
use std::process::Command;

const SCRIPT: &str = r#"
import socket, sys
def attempt(port):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", port))
        return "ok"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
metrics, service = int(sys.argv[1]), int(sys.argv[2])
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
group = l.getsockname()[1]
print("metrics=%s service=%s group=%s" % (attempt(metrics), attempt(service), attempt(group)))
"#;

#[test]
fn a_node_cannot_reach_the_gateway_itself_nor_ask_a_weight_above_the_cap() {
    if !have("python3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_token(&d.join("token"), "cluster secret\n");
    let metrics = free_port();
    let fabric = format!("unix:{}", d.join("saps.sock").display());
    let mut cmd = Command::new(bin("io-server"));
    cmd.args(["--metrics", &format!("127.0.0.1:{metrics}")]);
    let io = start_io_server(cmd, d, &fabric, "127.0.0.1");
    // A service of the gateway host, outside SAPS.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    // --loopback cluster: the program's loopback is the gateway's (by
    // default saps-run keeps loopback connects on the node).
    let mut node = Command::new(bin("saps-run"));
    node.args(["--io-server", &fabric, "--token-file"])
        .arg(d.join("token"))
        .args(["--node", "probe", "--loopback", "cluster", "--"]);
    let o = run(node.args([
        "python3",
        "-c",
        SCRIPT,
        &metrics.to_string(),
        &service_port.to_string(),
    ]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.trim(),
        "metrics=PermissionError service=ConnectionRefusedError group=ok",
        "stderr: {}\nio-server: {}",
        String::from_utf8_lossy(&o.stderr),
        io.stderr()
    );
    let log = io.stderr();
    assert!(
        log.contains("the io-server's own metrics or fabric address"),
        "the refusal is logged with its reason: {log}"
    );
    // A weight above the cap: saps-run says why it was refused.
    let o = run(Command::new(bin("saps-run"))
        .args(["--io-server", &fabric, "--token-file"])
        .arg(d.join("token"))
        .args(["--node", "heavy", "--weight", "100000", "--", "true"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "refused: {err}");
    assert!(
        err.contains("weight 100000 is above the io-server's cap of 256 (--max-weight)"),
        "{err}"
    );
}

//! iperf3 served through SAPS in both directions, and outbound connections
//! leaving from the single address (a client program under saps-run).

use saps_tests::*;
use std::process::Command;
use std::time::Duration;

/// iperf3 closes and reopens its listener for every test: the second run
/// also proves the port is released when the program closes a listener.
fn iperf3_server_completes_in_both_directions(zero_relay: &str) {
    if !have("iperf3") {
        return;
    }
    let port = free_port();
    let server = Proc::spawn(&mut saps_run_local(
        zero_relay,
        &["iperf3", "-s", "-p", &port.to_string()],
    ));
    for reverse in [false, true] {
        // The first attempts may come before the server listens.
        let report = wait_for(Duration::from_secs(30), || {
            let mut c = Command::new("iperf3");
            c.args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "2", "-J"]);
            if reverse {
                c.arg("-R");
            }
            let o = run(&mut c);
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            // iperf3 -J may exit 0 with an "error" member.
            (o.status.success() && !out.contains("\"error\"")).then_some(out)
        })
        .unwrap_or_else(|| {
            panic!(
                "iperf3 (reverse={reverse}) failed; server:\n{}",
                server.stderr()
            )
        });
        assert!(
            report.contains("\"sum_received\""),
            "iperf3 -J report lacks a result: {report}"
        );
        let bps = report
            .split("\"sum_received\"")
            .nth(1)
            .and_then(|s| s.split("\"bits_per_second\":").nth(1))
            .and_then(|s| s.split([',', '}']).next())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .expect("bits_per_second in the report");
        assert!(bps > 0.0);
        eprintln!(
            "iperf3 reverse={reverse} zero-relay={zero_relay}: {:.2} Gbit/s through SAPS",
            bps / 1e9
        );
    }
}

#[test]
fn iperf3_relayed_completes_in_both_directions() {
    iperf3_server_completes_in_both_directions("off");
}

#[test]
fn iperf3_zero_relay_completes_in_both_directions() {
    iperf3_server_completes_in_both_directions("on");
}

#[test]
fn curl_under_saps_run_reaches_a_server_in_another_namespace() {
    let Some(ns) = Netns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "from the namespace\n").unwrap();
    let port = free_port();
    let _server = Proc::spawn(
        ns.command(PYTHON)
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                &ns.ns_ip.to_string(),
            ])
            .current_dir(dir.path()),
    );
    let url = format!("http://{}:{port}/index.html", ns.ns_ip);
    let saps_curl = |url: &str| {
        run(Command::new(bin("saps-run")).args([
            "--address",
            &ns.host_ip.to_string(),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            url,
        ]))
    };
    let body = wait_for(Duration::from_secs(20), || {
        let o = saps_curl(&url);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    assert_eq!(body.as_deref(), Some("from the namespace\n"));

    // Nothing listens on port+1 there (ports above are free on the host,
    // and the namespace has only the python server).
    let refused = saps_curl(&format!("http://{}:{}/", ns.ns_ip, free_port()));
    assert_eq!(
        refused.status.code(),
        Some(7),
        "curl exits 7: could not connect"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("Connection refused") || err.contains("Couldn't connect"),
        "{err}"
    );
}

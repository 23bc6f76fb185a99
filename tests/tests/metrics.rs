//! `--metrics` (issues 19 and 24): Prometheus's text format that
//! `promtool check metrics` accepts, whose counters move with the traffic
//! through a node; and an endpoint that strangers cannot tie up: a
//! scraper that sends nothing is closed after `--metrics-timeout`, one
//! beyond `--metrics-max-connections` waits and is then served, an
//! oversized request is refused, and the io-server's descriptors return
//! to where they were.

use saps_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `request` to the metrics address and reads the answer to its
/// end: (status line, body).
fn http(port: u16, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

fn scrape(port: u16) -> String {
    let (status, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: saps\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 200 OK", "{body}");
    body
}

/// The value of the sample of `name` whose labels include `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        let ok = n == name
            && labels
                .iter()
                .all(|(k, want)| rest.contains(&format!("{k}=\"{want}\"")));
        ok.then(|| v.parse().ok()).flatten()
    })
}

/// An io-server on a unix fabric in `d` with `--metrics` on a free port
/// and `extra` flags; the process and the port.
fn io_server_with_metrics(d: &Path, extra: &[&str]) -> (Proc, u16) {
    write_token(&d.join("token"), "cluster secret\n");
    let port = free_port();
    let mut cmd = Command::new(bin("io-server"));
    cmd.args(["--metrics", &format!("127.0.0.1:{port}")])
        .args(extra);
    let fabric = format!("unix:{}", d.join("saps.sock").display());
    (start_io_server(cmd, d, &fabric, "127.0.0.1"), port)
}

#[test]
fn metrics_pass_promtool_and_a_connection_through_a_node_raises_its_counters() {
    if !have("python3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (io, metrics) = io_server_with_metrics(d, &[]);
    let port = free_port();
    let www = tempfile::tempdir().unwrap();
    let blob = vec![b'x'; 100_000];
    std::fs::write(www.path().join("blob"), &blob).unwrap();
    let _node = Proc::spawn(
        unix_node(d, "web", "off")
            .args([PYTHON, "-m", "http.server", &port.to_string()])
            .current_dir(www.path()),
    );
    let url = format!("http://127.0.0.1:{port}/blob");
    assert!(wait_http(&url, Duration::from_secs(30)), "{}", io.stderr());

    let node = [("node", "web")];
    let group = format!("127.0.0.1:{port}");
    let before = wait_for(Duration::from_secs(10), || {
        let m = scrape(metrics);
        value(&m, "saps_node_up", &node).map(|_| m)
    })
    .expect("the node appears in the metrics");
    assert_eq!(value(&before, "saps_node_up", &node), Some(1.0));
    assert_eq!(value(&before, "saps_node_weight", &node), Some(1.0));
    assert_eq!(
        value(&before, "saps_group_members", &[("group", &group)]),
        Some(1.0),
        "{before}"
    );
    assert_eq!(value(&before, "saps_upgrades_total", &[]), Some(0.0));
    let conns = |m: &str| value(m, "saps_node_connections_total", &node).unwrap();
    let out = |m: &str| {
        value(
            m,
            "saps_node_bytes_total",
            &[("node", "web"), ("direction", "out")],
        )
        .unwrap()
    };
    let all = |m: &str| value(m, "saps_connections_total", &[]).unwrap();

    let (code, body, _) = curl(&[&url]);
    assert_eq!((code, body.len()), (0, blob.len()));
    // The snapshot is at most --metrics-interval (1 s) old: poll.
    let after = wait_for(Duration::from_secs(10), || {
        let m = scrape(metrics);
        (conns(&m) > conns(&before)).then_some(m)
    })
    .unwrap_or_else(|| panic!("the node's connection counter did not move:\n{before}"));
    assert!(
        out(&after) >= out(&before) + blob.len() as f64,
        "node → client bytes: {} then {}",
        out(&before),
        out(&after)
    );
    assert!(all(&after) > all(&before));
    let group_total = |m: &str| value(m, "saps_group_connections_total", &[("group", &group)]);
    assert!(group_total(&after) > group_total(&before));

    // `GET /` is still the status report.
    let (status, report) = http(metrics, "GET / HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert!(report.starts_with("SAPS io-server"), "{report}");

    if have("promtool") {
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(after.as_bytes())
            .unwrap();
        let o = check.wait_with_output().unwrap();
        assert!(
            o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
            "promtool check metrics: {}{}\n{after}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Connections to `port` that process `pid` has accepted (holds a
/// descriptor for), from its descriptors' socket inodes and the kernel's TCP
/// tables. A connection still in the listen queue has no inode yet, so it is
/// not counted; the listening socket itself is not counted either.
fn accepted_at(pid: i32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let local = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        // Fields: sl local remote st … uid timeout inode.
        .filter(|f| f.len() > 9 && f[1].ends_with(&local) && f[3] != "0A")
        .filter(|f| inodes.contains(&f[9]))
        .count()
}

#[test]
fn a_stalled_scraper_holds_one_bounded_slot_and_others_are_served_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (io, metrics) = io_server_with_metrics(
        d,
        &[
            "--metrics-max-connections",
            "2",
            "--metrics-timeout",
            "2",
            "--metrics-max-request",
            "256",
        ],
    );
    let held = || accepted_at(io.pid(), metrics);
    // At rest: the first scrape's connection closed at the io-server too
    // (it closes its end after answering, a moment after the client read).
    scrape(metrics);
    wait_for(Duration::from_secs(10), || (held() == 0).then_some(()))
        .expect("the first scrape's connection was closed");
    // Two scrapers that send nothing take both slots; their time starts
    // when they are accepted, after this.
    let started = Instant::now();
    let stalled: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", metrics)).unwrap())
        .collect();
    wait_for(Duration::from_secs(10), || (held() == 2).then_some(()))
        .unwrap_or_else(|| panic!("the io-server holds {} of 2 stalled scrapers", held()));
    // The control socket answers meanwhile.
    assert!(io_server_status(d).is_some());
    // A third waits, unaccepted, until a slot frees, and is then served.
    let body = scrape(metrics);
    assert!(body.contains("# TYPE saps_node_up gauge"), "{body}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "served before a slot was free: {waited:?}"
    );
    // Each stalled one was closed with nothing written.
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "closed without an answer");
    }
    assert!(io
        .stderr()
        .contains("no complete request within --metrics-timeout"));
    // An oversized request is refused.
    let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(400));
    let (status, _) = http(metrics, &big);
    assert_eq!(status, "HTTP/1.0 431 Request Header Fields Too Large");
    assert_eq!(
        http(metrics, "GET /nothing HTTP/1.1\r\n\r\n").0,
        "HTTP/1.0 404 Not Found"
    );
    // Every descriptor of those connections is released.
    let back = wait_for(Duration::from_secs(10), || (held() == 0).then_some(()));
    assert!(
        back.is_some(),
        "the io-server still holds {} scrapers",
        held()
    );
    eprintln!("the third scrape waited {waited:?} (--metrics-timeout 2)");
}

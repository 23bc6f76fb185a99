//! `io-server upgrade` under load (issue 19): one io-server daemon serves
//! a relayed node (joined over `tcp://`) and a zero-relay node (joined
//! over `unix:`, taking its clients' sockets through the `.handoff`
//! socket); through each run keep-alive `wrk` against nginx, an `iperf3`
//! stream each way, a verified stream each way (a seeded pseudo-random
//! sequence checked octet by octet as it comes back), a 1-byte ping-pong
//! that measures the longest pause a client sees, and idle connections
//! opened before the first upgrade. The io-server is upgraded
//! [`UPGRADES`] times (`SAPS_UPGRADES` overrides it; 0 checks the harness
//! alone; `SAPS_IDLE` the number of idle connections) while all of it
//! runs. Nothing may fail: no wrk socket error or non-2xx answer, no reset
//! or early end on any connection, iperf3's receiver count trailing its
//! sender's by no more than the path holds ([`in_flight_bound`]), every verified
//! octet right, every idle connection echoing afterwards, both nodes
//! joined with the ids they had, and `saps_upgrades_total` counting every
//! upgrade.
//!
//! Everything runs on this one machine: load generators, both nodes and
//! the gateway share its CPUs. With the kernel's session autogroups
//! (`kernel.sched_autogroup_enabled`, on in Debian's kernels) the
//! io-server's one event-loop thread was seen runnable and not run for
//! 6–7 s at a time under this load (its quiesce bound of 3 s overrun by
//! seconds, the nodes dropping it as silent), with or without a session
//! of its own and with `--threads 2`; with autogroups off, never. A
//! gateway serves with its clients and nodes on other machines, so the
//! test turns autogroups off for its run where it may ([`NoAutogroups`])
//! and says so (bench/notes/2026-12-03-upgrade-load.md).

use saps_tests::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `kernel.sched_autogroup_enabled` set to 0 for as long as it lives (the
/// value it found put back), where it was 1 and may be written (root).
struct NoAutogroups(Option<String>);

const AUTOGROUP: &str = "/proc/sys/kernel/sched_autogroup_enabled";

impl NoAutogroups {
    fn new() -> NoAutogroups {
        let was = std::fs::read_to_string(AUTOGROUP).ok();
        match was.as_deref().map(str::trim) {
            Some("1") => match std::fs::write(AUTOGROUP, "0") {
                Ok(()) => {
                    println!("{AUTOGROUP}: 0 for this test (1 again after it)");
                    NoAutogroups(was)
                }
                Err(e) => {
                    println!("{AUTOGROUP} stays 1 ({e}): the io-server may be starved of CPU under this load");
                    NoAutogroups(None)
                }
            },
            _ => NoAutogroups(None),
        }
    }
}

impl Drop for NoAutogroups {
    fn drop(&mut self) {
        if let Some(was) = &self.0 {
            let _ = std::fs::write(AUTOGROUP, was.trim());
        }
    }
}

/// The upgrades the test runs (`SAPS_UPGRADES` for fewer while the
/// harness is developed).
const UPGRADES: u64 = 10;

/// Idle connections in all, half to each node's echo server.
const IDLE_CONNECTIONS: usize = 10_000;

/// How long every load runs; the upgrades are spread over it.
const LOAD_SECONDS: u64 = 60;

/// The rate of each iperf3 stream. iperf3 (3.12) stops counting at the
/// receiver when the test's time is up (its control connection says so),
/// so its count is short of the sender's by what was still in flight:
/// about nothing for a paced stream over a direct loopback connection, up
/// to what the path's buffers hold through a relay whose pauses let a
/// backlog build ([`in_flight_bound`]).
const IPERF_RATE: &str = "100M";

/// iperf3's block (`-l`), the unit both ends count in. At the end of the
/// test's time one block may be counted by one end and not by the other,
/// either way (a receiver counting a block more than its sender was seen
/// too): the most iperf3's sender and receiver counts may differ by. The
/// verified streams check every octet.
const IPERF_BLOCK: u64 = 128 << 10;

/// The most an iperf3 receiver's count may trail its sender's: what the
/// path can hold when the test's time is up, the client's socket send
/// buffer and two sockets' receive buffers at their kernel maximum
/// (`tcp_wmem`, `tcp_rmem`) and the io-server's credit window. That the
/// octets themselves all arrive, in order, the verified streams beside
/// iperf3 check octet by octet.
fn in_flight_bound() -> u64 {
    let max = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(32 << 20)
    };
    max("/proc/sys/net/ipv4/tcp_wmem") + 2 * max("/proc/sys/net/ipv4/tcp_rmem") + (2 << 20)
}

/// The rate of each verified stream (it shares the echo server with the
/// ping-pong and the idle connections).
const VERIFIED_BYTES_PER_SECOND: u64 = 2 << 20;

/// Descriptors this test and the processes it starts may open: the idle
/// connections' client ends here, their server ends in the echo servers,
/// and the io-server's own (one per relayed client, with room).
const NOFILE: u64 = 65_536;

/// Per node, the echo server of the idle, verified and ping-pong
/// connections (the bench's): echoes whatever arrives until the client
/// ends.
const ECHO: &str = include_str!("../../bench/echo_server.py");

/// A node and the ports its programs listen on.
struct Node {
    name: &'static str,
    zero_relay: bool,
    proc: Proc,
    http: u16,
    /// iperf3 servers: the forward stream's, the reverse stream's.
    iperf: [u16; 2],
    echo: u16,
}

impl Node {
    /// `saps-run --node NAME` over the `unix:` fabric (zero-relay) or the
    /// `tcp://` one (relayed), running nginx, two `iperf3 -s` and the echo
    /// server under one shell.
    fn start(s: &UpgradeSettings, name: &'static str, zero_relay: bool) -> Node {
        let d = s.dir.join(name);
        std::fs::create_dir_all(d.join("www")).unwrap();
        let page: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(d.join("www/1k.bin"), page).unwrap();
        std::fs::write(d.join("echo.py"), ECHO).unwrap();
        let (http, iperf, echo) = (free_port(), [free_port(), free_port()], free_port());
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; user root;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 1024; use epoll; }}\n\
             http {{ access_log off; sendfile on; keepalive_requests 1000000;\n\
               keepalive_timeout 300s;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
               uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{ listen {http}; root {d}/www; }} }}\n",
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let script = format!(
            "nginx -c {d}/nginx.conf -e {d}/error.log & \
             iperf3 -s -p {} & iperf3 -s -p {} & \
             {PYTHON} {d}/echo.py {echo} & wait",
            iperf[0],
            iperf[1],
            d = d.display()
        );
        let fabric = if zero_relay {
            s.unix_fabric()
        } else {
            s.tcp_fabric()
        };
        let proc = Proc::spawn(
            Command::new(release_bin("saps-run"))
                .args(["--io-server", &fabric, "--token-file"])
                .arg(s.dir.join("token"))
                .args(["--node", name, "--zero-relay"])
                .arg(if zero_relay { "on" } else { "off" })
                .args(["--", "sh", "-c", &script])
                .current_dir(&d),
        );
        Node {
            name,
            zero_relay,
            proc,
            http,
            iperf,
            echo,
        }
    }

    fn label(&self) -> String {
        let how = if self.zero_relay {
            "zero-relay, unix:"
        } else {
            "relayed, tcp://"
        };
        format!("node {} ({how})", self.name)
    }

    /// Whether `status` shows this node as the member of a group on each
    /// of its ports, and its kind of node.
    fn serves_in(&self, status: &str) -> bool {
        let ports = [self.http, self.iperf[0], self.iperf[1], self.echo];
        let member = format!("-> {} (", self.name);
        let groups = ports.iter().all(|p| {
            let head = format!("TCP  127.0.0.1:{p} ");
            let mut lines = status.lines();
            lines.any(|l| l.starts_with(&head)) && lines.next().is_some_and(|l| l.contains(&member))
        });
        let kind = status
            .split("\nNodes\n")
            .nth(1)
            .and_then(|n| {
                n.lines()
                    .find(|l| l.split_whitespace().next() == Some(self.name))
            })
            .is_some_and(|l| l.contains(", zero-relay") == self.zero_relay);
        groups && kind
    }
}

/// What went wrong on a connection, in words: a reset and an early end
/// named as such.
fn why(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset => format!("reset ({e})"),
        ErrorKind::UnexpectedEof => "early EOF".into(),
        _ => e.to_string(),
    }
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// The message idle connection `i` echoes in `round`.
fn idle_message(i: usize, round: u32) -> [u8; 8] {
    let mut m = [0u8; 8];
    m[..4].copy_from_slice(&(i as u32).to_be_bytes());
    m[4..].copy_from_slice(&round.to_be_bytes());
    m
}

/// How long a round of [`echo_round`] may take in all: past it, each
/// connection still to answer gets [`LATE_READ`] (a failure then costs
/// seconds, not each connection's own read timeout in turn).
const ROUND_BOUND: Duration = Duration::from_secs(60);
const LATE_READ: Duration = Duration::from_millis(200);

/// Each connection sends its message of `round`, then each reads it
/// back, a batch at a time: the errors, by connection.
fn echo_round(conns: &mut [TcpStream], round: u32) -> Vec<String> {
    let mut errors = Vec::new();
    let deadline = Instant::now() + ROUND_BOUND;
    for (b, batch) in conns.chunks_mut(250).enumerate() {
        let base = b * 250;
        let mut sent = vec![false; batch.len()];
        for (j, c) in batch.iter_mut().enumerate() {
            match c.write_all(&idle_message(base + j, round)) {
                Ok(()) => sent[j] = true,
                Err(e) => errors.push(format!("idle {}: send: {}", base + j, why(&e))),
            }
        }
        for (j, c) in batch.iter_mut().enumerate().filter(|(j, _)| sent[*j]) {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.min(Duration::from_secs(30)).max(LATE_READ);
            if let Err(e) = c.set_read_timeout(Some(wait)) {
                errors.push(format!("idle {}: read timeout: {e}", base + j));
                continue;
            }
            let mut got = [0u8; 8];
            match c.read_exact(&mut got) {
                Ok(()) if got == idle_message(base + j, round) => {}
                Ok(()) => errors.push(format!("idle {}: echoed {got:?}", base + j)),
                Err(e) => errors.push(format!("idle {}: {}", base + j, why(&e))),
            }
        }
    }
    errors
}

/// `n` connections to `port`, each having echoed once (so each reached
/// the program, not only a listen queue).
fn open_idle(port: u16, n: usize) -> Result<Vec<TcpStream>, String> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(connect(port).map_err(|e| format!("idle {i}: connect: {}", why(&e)))?);
    }
    let errors = echo_round(&mut conns, 0);
    match errors.first() {
        None => Ok(conns),
        Some(e) => Err(format!("{} of {n} did not echo, first: {e}", errors.len())),
    }
}

/// The ping-pong: one byte back and forth until `until`; the longest
/// time between two answers and how many there were.
fn pause_probe(port: u16, until: Instant) -> Result<(Duration, u64), String> {
    let mut c = connect(port).map_err(|e| why(&e))?;
    let (mut longest, mut n) = (Duration::ZERO, 0u64);
    let mut last = Instant::now();
    let mut byte = [0u8; 1];
    while Instant::now() < until {
        c.write_all(&[n as u8])
            .and_then(|()| c.read_exact(&mut byte))
            .map_err(|e| format!("after {n} answers: {}", why(&e)))?;
        if byte[0] != n as u8 {
            return Err(format!("answer {n} was {}", byte[0]));
        }
        let now = Instant::now();
        longest = longest.max(now - last);
        last = now;
        n += 1;
    }
    Ok((longest, n))
}

/// A seeded pseudo-random octet sequence (xorshift64*).
struct Sequence(u64);

impl Sequence {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Sends the sequence seeded with `seed` to the echo server at
/// [`VERIFIED_BYTES_PER_SECOND`] until `until`, then ends its side, and
/// checks every octet that comes back up to the echo server's end: the
/// octets checked.
fn verified_stream(port: u16, seed: u64, until: Instant) -> Result<u64, String> {
    let mut rx = connect(port).map_err(|e| why(&e))?;
    let mut tx = rx.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> Result<u64, String> {
        let mut seq = Sequence(seed);
        let mut buf = vec![0u8; 16 << 10];
        let (start, mut sent) = (Instant::now(), 0u64);
        while Instant::now() < until {
            seq.fill(&mut buf);
            tx.write_all(&buf)
                .map_err(|e| format!("sending after {sent} octets: {}", why(&e)))?;
            sent += buf.len() as u64;
            // The pace, not a wait for a condition.
            let due = Duration::from_secs_f64(sent as f64 / VERIFIED_BYTES_PER_SECOND as f64);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        tx.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        Ok(sent)
    });
    // What must come back, generated ahead in whole 8-octet steps.
    let mut want = Sequence(seed);
    let (mut buf, mut expect, mut at) = (vec![0u8; 64 << 10], Vec::new(), 0usize);
    let mut checked = 0u64;
    let read = loop {
        let n = match rx.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(format!("after {checked} octets: {}", why(&e))),
        };
        if at + n > expect.len() {
            expect.drain(..at);
            at = 0;
            let more = expect.len();
            expect.resize(more + buf.len(), 0);
            want.fill(&mut expect[more..]);
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != expect[at + i]) {
            break Err(format!("octet {} differs", checked + i as u64));
        }
        at += n;
        checked += n as u64;
    };
    let sent = writer.join().unwrap()?;
    read?;
    if checked != sent {
        return Err(format!("early EOF: {checked} of {sent} octets came back"));
    }
    Ok(checked)
}

/// What one wrk run reported, and whether it saw no error.
struct Wrk {
    report: String,
}

impl Wrk {
    fn errors(&self) -> Option<String> {
        let bad = self
            .report
            .lines()
            .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
            .map(str::trim)
            .collect::<Vec<_>>();
        match (bad.is_empty(), self.report.contains("Requests/sec")) {
            (true, true) => None,
            (true, false) => Some(format!("no result: {}", self.report)),
            (false, _) => Some(bad.join("; ")),
        }
    }

    /// The figure after `label` on its line (`Requests/sec:`, `99%`).
    fn figure(&self, label: &str) -> String {
        self.report
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string()
    }
}

fn wrk(port: u16, secs: u64) -> Wrk {
    let o = run(Command::new("wrk").args([
        "-c8",
        "-t2",
        &format!("-d{secs}s"),
        "--timeout",
        "10s",
        "--latency",
        &format!("http://127.0.0.1:{port}/1k.bin"),
    ]));
    Wrk {
        report: String::from_utf8_lossy(&o.stdout).into_owned()
            + &String::from_utf8_lossy(&o.stderr),
    }
}

/// `"KEY": {` … `"bytes": N` in iperf3's `-J` report: N.
fn iperf_bytes(report: &str, key: &str) -> Option<u64> {
    let after = report.split(&format!("\"{key}\"")).nth(1)?;
    let n = after.split("\"bytes\":").nth(1)?;
    n.split([',', '}']).next()?.trim().parse().ok()
}

/// What an iperf3 client reported: octets sent, octets received, and the
/// receiver's rate.
struct Iperf {
    sent: u64,
    received: u64,
    gbps: f64,
}

/// One paced iperf3 stream for `secs` (`reverse`: the node sends), or why
/// not.
fn iperf3(port: u16, secs: u64, reverse: bool) -> Result<Iperf, String> {
    let mut c = Command::new("iperf3");
    c.args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-J",
        "-b",
        IPERF_RATE,
        "-l",
        &IPERF_BLOCK.to_string(),
    ])
    .args(["-t", &secs.to_string(), "--connect-timeout", "10000"]);
    if reverse {
        c.arg("-R");
    }
    let o = run(&mut c);
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() || report.contains("\"error\"") {
        let error = report.lines().find(|l| l.contains("\"error\""));
        return Err(format!(
            "iperf3 failed: {}",
            error.map_or(report.trim(), str::trim)
        ));
    }
    let sent = iperf_bytes(&report, "sum_sent");
    let received = iperf_bytes(&report, "sum_received");
    match (sent, received) {
        (Some(sent), Some(received)) => Ok(Iperf {
            sent,
            received,
            gbps: received as f64 * 8.0 / secs as f64 / 1e9,
        }),
        _ => Err(format!("no byte counts: {report}")),
    }
}

/// The last lines of a log, enough to see why something failed.
fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The upgrades to run: `SAPS_UPGRADES`, or [`UPGRADES`].
fn upgrades() -> u64 {
    std::env::var("SAPS_UPGRADES")
        .ok()
        .map(|v| v.parse().expect("SAPS_UPGRADES: a number"))
        .unwrap_or(UPGRADES)
}

/// The io-server's own pauses, `paused_ms=N` in the logs of the
/// processes that handed over.
fn logged_pauses(logs: &[String]) -> Vec<u64> {
    logs.iter()
        .flat_map(|log| log.lines())
        .filter_map(|l| {
            let rest = l.split("paused_ms=").nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// One node's clients, all running until the same moment.
struct Load {
    wrk: JoinHandle<Wrk>,
    iperf: [JoinHandle<Result<Iperf, String>>; 2],
    verified: JoinHandle<Result<u64, String>>,
    probe: JoinHandle<Result<(Duration, u64), String>>,
}

impl Load {
    fn start(node: &Node, seed: u64, until: Instant) -> Load {
        let (http, echo, [fwd, rev]) = (node.http, node.echo, node.iperf);
        Load {
            wrk: std::thread::spawn(move || wrk(http, LOAD_SECONDS)),
            iperf: [
                std::thread::spawn(move || iperf3(fwd, LOAD_SECONDS, false)),
                std::thread::spawn(move || iperf3(rev, LOAD_SECONDS, true)),
            ],
            verified: std::thread::spawn(move || verified_stream(echo, seed, until)),
            probe: std::thread::spawn(move || pause_probe(echo, until)),
        }
    }

    /// Waits for every client to end: a line of figures, and what failed
    /// added to `failures`.
    fn finish(self, label: &str, failures: &mut Vec<String>) -> String {
        let wrk = self.wrk.join().unwrap();
        if let Some(e) = wrk.errors() {
            failures.push(format!("{label}: wrk: {e}"));
        }
        let mut line = format!(
            "{label}: wrk {} req/s, p99 {}",
            wrk.figure("Requests/sec:"),
            wrk.figure("99%")
        );
        for (way, iperf) in ["forward", "reverse"].into_iter().zip(self.iperf) {
            match iperf.join().unwrap() {
                Ok(Iperf {
                    sent,
                    received,
                    gbps,
                }) => {
                    line += &format!(
                        "; iperf3 {way} {gbps:.2} Gbit/s, {sent} octets sent, {received} received"
                    );
                    let short = sent.saturating_sub(received);
                    if received > sent + IPERF_BLOCK || short > in_flight_bound() || received == 0 {
                        failures.push(format!(
                            "{label}: iperf3 {way}: {sent} octets sent, {received} received"
                        ));
                    }
                }
                Err(e) => failures.push(format!("{label}: iperf3 {way}: {e}")),
            }
        }
        match self.verified.join().unwrap() {
            Ok(octets) => line += &format!("; {octets} octets verified each way"),
            Err(e) => failures.push(format!("{label}: verified stream: {e}")),
        }
        match self.probe.join().unwrap() {
            Ok((longest, n)) => {
                line += &format!(
                    "; longest pause: {:.1} ms over {n} round trips",
                    longest.as_secs_f64() * 1e3
                )
            }
            Err(e) => failures.push(format!("{label}: ping-pong: {e}")),
        }
        line
    }
}

#[test]
fn ten_upgrades_under_load_lose_no_request_byte_or_connection_of_relayed_and_zero_relay_nodes() {
    for program in ["wrk", "iperf3", "nginx", "python3"] {
        if !have(program) {
            return;
        }
    }
    let limit = raise_nofile(NOFILE);
    assert!(
        limit >= IDLE_CONNECTIONS as u64 + 1024,
        "the descriptor limit is {limit}: {IDLE_CONNECTIONS} idle connections need more"
    );
    let upgrades = upgrades();
    let _autogroups = NoAutogroups::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = UpgradeSettings::release(d);
    let mut first = s.start(&[]);
    // The first daemon is `first`'s to end; the ones the upgrades start
    // are this one's.
    let daemon = UpgradedDaemon::new(0).in_dir(d);
    let nodes = [Node::start(&s, "r", false), Node::start(&s, "z", true)];

    // Both joined, each the member of a group on each of its ports.
    let joined = wait_for(Duration::from_secs(60), || {
        let status = io_server_status(d)?;
        nodes.iter().all(|n| n.serves_in(&status)).then_some(status)
    });
    let status = joined.unwrap_or_else(|| {
        panic!(
            "the nodes did not join:\n{}\n{}\n{}",
            io_server_status(d).unwrap_or_default(),
            nodes[0].proc.stderr(),
            nodes[1].proc.stderr()
        )
    });
    let ids = status_nodes(&status);
    for n in &nodes {
        let url = format!("http://127.0.0.1:{}/1k.bin", n.http);
        assert!(
            wait_http(&url, Duration::from_secs(30)),
            "{}: nginx does not answer: {}",
            n.label(),
            n.proc.stderr()
        );
    }

    // The idle connections, each having echoed once.
    let per_node = std::env::var("SAPS_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(IDLE_CONNECTIONS)
        / nodes.len();
    let mut idle: Vec<Vec<TcpStream>> = nodes
        .iter()
        .map(|n| {
            open_idle(n.echo, per_node).unwrap_or_else(|e| {
                panic!("{}: idle connections: {e}\n{}", n.label(), n.proc.stderr())
            })
        })
        .collect();

    // The load, and the upgrades spread over it.
    let started = Instant::now();
    let until = started + Duration::from_secs(LOAD_SECONDS);
    let loads: Vec<Load> = nodes
        .iter()
        .zip([0x5eed_0001u64, 0x5eed_0002])
        .map(|(n, seed)| Load::start(n, seed, until))
        .collect();
    let mut logs = Vec::new();
    let mut old = first.pid();
    let spacing = Duration::from_secs(LOAD_SECONDS) / (upgrades as u32 + 2);
    let mut last_done = started;
    for k in 1..=upgrades {
        // The schedule: the k-th upgrade at k spacings into the load.
        if let Some(wait) = (spacing * k as u32).checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let log = d.join(format!("upgrade-{k}.log"));
        let (code, out) = s.upgrade(&log);
        // What the replaced process, the new one and the nodes logged.
        let context = || {
            let replaced = match logs.last() {
                None => first.stderr(),
                Some(l) => std::fs::read_to_string(l).unwrap_or_default(),
            };
            let new = std::fs::read_to_string(&log).unwrap_or_default();
            format!(
                "\n--- the process upgraded:\n{}\n--- upgrade {k}:\n{}\n--- node r:\n{}\n--- node z:\n{}",
                last_lines(&replaced),
                last_lines(&new),
                last_lines(&nodes[0].proc.stderr()),
                last_lines(&nodes[1].proc.stderr())
            )
        };
        assert_eq!(code, Some(0), "upgrade {k}: {out}{}", context());
        let (new, from, count) =
            took_over(&out).unwrap_or_else(|| panic!("upgrade {k}: {out}{}", context()));
        daemon.set(new);
        assert_eq!((from, count), (old, k), "upgrade {k}: {out}");
        let status = io_server_status(d);
        let same = status.as_deref().map(status_nodes);
        assert_eq!(
            same.as_ref(),
            Some(&ids),
            "upgrade {k}: the nodes changed:\n{}{}",
            status.as_deref().unwrap_or("no status"),
            context()
        );
        let gone = if k == 1 {
            first.wait_timeout(Duration::from_secs(20)).map(drop)
        } else {
            wait_for(Duration::from_secs(20), || (!pid_alive(old)).then_some(()))
        };
        assert!(gone.is_some(), "upgrade {k}: pid {old} is still there");
        logs.push(log);
        old = new;
        last_done = Instant::now();
    }
    let mut failures = Vec::new();
    if upgrades > 0 && last_done.duration_since(started) > Duration::from_secs(LOAD_SECONDS) {
        failures.push(format!(
            "the upgrades took {:?}, longer than the load ({LOAD_SECONDS} s)",
            last_done.duration_since(started)
        ));
    }

    let mut reports: Vec<String> = nodes
        .iter()
        .zip(loads)
        .map(|(n, load)| load.finish(&n.label(), &mut failures))
        .collect();

    // Every idle connection still echoes.
    for (n, conns) in nodes.iter().zip(idle.iter_mut()) {
        let errors = echo_round(conns, 1);
        reports.push(format!(
            "{}: {} of {} idle connections echoed after the last upgrade",
            n.label(),
            conns.len() - errors.len(),
            conns.len()
        ));
        if let Some(e) = errors.first() {
            failures.push(format!(
                "{}: {} idle connections failed, first: {e}",
                n.label(),
                errors.len()
            ));
        }
    }
    let status = io_server_status(d).unwrap_or_default();
    if status_nodes(&status) != ids {
        failures.push(format!("the nodes changed:\n{status}"));
    }
    let counted = s.metric("saps_upgrades_total");
    if counted != Some(upgrades) {
        failures.push(format!(
            "saps_upgrades_total is {counted:?}, not {upgrades}"
        ));
    }
    let mut logged = vec![first.stderr()];
    logged.extend(
        logs.iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default()),
    );
    let pauses = logged_pauses(&logged);
    println!("{upgrades} upgrades, {IDLE_CONNECTIONS} idle connections, {LOAD_SECONDS} s of load");
    for r in &reports {
        println!("{r}");
    }
    println!(
        "the io-server's own pauses (ms, as it logs them): {pauses:?}, longest {:?}",
        pauses.iter().max()
    );
    // What the io-servers said of each handover, and what went wrong.
    let said: Vec<&str> = logged
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains("upgrade:") || l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        failures.is_empty(),
        "{}\nio-server status:\n{status}\nio-servers:\n{}\nnode r: {}\nnode z: {}",
        failures.join("\n"),
        said.join("\n"),
        nodes[0].proc.stderr(),
        nodes[1].proc.stderr()
    );
}

//! Golden test of `saps-run --trace` (issue 6, "Must show"): a fixed small
//! python3 client/server program is run natively under `strace -f -T -e
//! trace=network` and under `saps-run --trace --loopback cluster` (so every
//! call goes through SAPS); the socket-family lines of both, with pids,
//! ports and durations normalised, must be equal argument for argument.
//!
//! Both runs use `-tt` and lines are put in order of their start time: the
//! supervisor may write a deferred call's line (a blocking `connect`) after
//! lines of calls the program made once it returned. For a single-threaded
//! program, start order is program order.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The program: a listener with SO_REUSEADDR, a client connecting to it,
/// accept, the name queries, SO_ERROR and a half close.
/// Debian's interpreter, by absolute path: a `python3` found on `PATH` may be
/// a version manager's shim (pyenv's is a bash script that forks helpers and,
/// without `HOME`, looks users up over a unix socket), whose extra processes
/// and syscalls are not the program under test.
const PYTHON: &str = "/usr/bin/python3";

const PROGRAM: &str = r#"
import socket
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(5)
port = srv.getsockname()[1]
cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
cli.connect(("127.0.0.1", port))
conn, peer = srv.accept()
conn.getsockname()
conn.getpeername()
cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
cli.shutdown(socket.SHUT_WR)
conn.close(); cli.close(); srv.close()
"#;

/// The syscalls `--trace` reports.
const TRACED: &[&str] = &[
    "socket",
    "bind",
    "listen",
    "accept",
    "accept4",
    "connect",
    "shutdown",
    "setsockopt",
    "getsockopt",
    "getsockname",
    "getpeername",
];

/// Calls SAPS lets the kernel run natively even under `--loopback cluster`
/// (`shutdown` of a connected virtual socket acts on its socketpair, DESIGN.md
/// "Virtual TCP sockets"): their result is `?`; their arguments must match.
const NATIVE: &[&str] = &["shutdown"];

/// How long either run may take.
const DEADLINE: Duration = Duration::from_secs(30);

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("saps-trace-golden-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch dir");
    dir
}

/// Waits for `child` with a deadline, killing it if it overstays.
fn wait(mut child: Child, what: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        match child.try_wait().expect("waiting for a child") {
            Some(status) => {
                assert!(status.success(), "{what} failed: {status}");
                return;
            }
            None if Instant::now() > end => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {DEADLINE:?}");
            }
            // Poll for the exit (bounded by the deadline above).
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn run(cmd: &mut Command, what: &str) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    wait(child, what);
}

/// Replaces the number after each `marker` by `N`.
fn mask_numbers_after(line: &str, marker: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find(marker) {
        let (head, tail) = rest.split_at(i + marker.len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(if digits > 0 { "N" } else { "" });
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// The traced syscalls' lines of an `-f -tt -o` trace file in start
/// order, without pid and time, with ports, durations and column padding
/// normalised.
fn normalised(path: &Path) -> Vec<String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut lines: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| {
            // "PID   HH:MM:SS.uuuuuu name(...": strip the pid column.
            let rest = l
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            let (time, call) = match rest.split_once(' ') {
                Some((t, c)) if t.len() == 15 && t.as_bytes()[2] == b':' => (t, c),
                _ => ("", rest),
            };
            let name = &call[..call.find('(')?];
            if !TRACED.contains(&name) {
                return None;
            }
            let (head, result) = call.rsplit_once(" = ")?;
            let result = result.rsplit_once(" <").map_or(result, |(r, _)| r);
            let head = mask_numbers_after(head.trim_end(), "htons(");
            Some((time.to_owned(), format!("{head} = {result}")))
        })
        .collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    lines.into_iter().map(|(_, l)| l).collect()
}

/// Whether `got` (SAPS) says the same as `want` (strace): equal, or a
/// [`NATIVE`] call with the same arguments and an unknown result.
fn same_call(got: &str, want: &str) -> bool {
    if got == want {
        return true;
    }
    let native = NATIVE.iter().any(|n| got.starts_with(&format!("{n}(")));
    match (got.strip_suffix(" = ?"), want.rsplit_once(" = ")) {
        (Some(g), Some((w, _))) => native && g == w,
        _ => false,
    }
}

#[test]
fn trace_lines_equal_strace_for_the_same_program() {
    let dir = scratch_dir("run");
    let program = dir.join("client_server.py");
    std::fs::write(&program, PROGRAM).unwrap();
    let native = dir.join("strace.txt");
    let saps = dir.join("saps.txt");

    // Both runs get a HOME: without one, python's startup looks the user
    // up through nscd's unix socket, and only part of that (the `connect`,
    // not the AF_UNIX `socket`) traps, so the two traces would differ for a
    // reason outside the program under test.
    run(
        Command::new("strace")
            .env("HOME", &dir)
            .args(["-f", "-tt", "-T", "-e", "trace=network", "-o"])
            .arg(&native)
            .arg(PYTHON)
            .arg(&program),
        "strace python3",
    );
    run(
        Command::new(env!("CARGO_BIN_EXE_saps-run"))
            .env("HOME", &dir)
            .args([
                "--trace",
                "--tt",
                "--loopback",
                "cluster",
                // Zero-relay hands accepted sockets over as real sockets whose
                // calls run natively (`= ?`); compare the virtual path.
                "--zero-relay",
                "off",
                "--no-annotate",
                "-o",
            ])
            .arg(&saps)
            .arg("--")
            .arg(PYTHON)
            .arg(&program),
        "saps-run --trace python3",
    );

    let want = normalised(&native);
    let got = normalised(&saps);
    assert!(want.len() >= 13, "strace saw too little: {want:#?}");
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(
            same_call(g, w),
            "line {i} differs:\n saps-run: {g}\n   strace: {w}"
        );
    }
    assert_eq!(
        got.len(),
        want.len(),
        "saps-run: {got:#?}\nstrace: {want:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn normalisation_orders_by_start_and_drops_pids_ports_durations() {
    let dir = scratch_dir("norm");
    let f = dir.join("t.txt");
    std::fs::write(
        &f,
        "19594 08:00:00.000200 listen(3, 5)      = 0 <0.000033>\n\
         19594 08:00:00.000300 +++ exited with 0 +++\n\
         12 08:00:00.000100 connect(4, {sa_family=AF_INET, sin_port=htons(32997), \
         sin_addr=inet_addr(\"127.0.0.1\")}, 16) = -1 EINPROGRESS (Operation now in progress) <0.000126>\n",
    )
    .unwrap();
    assert_eq!(
        normalised(&f),
        [
            "connect(4, {sa_family=AF_INET, sin_port=htons(N), sin_addr=inet_addr(\"127.0.0.1\")}, 16) \
             = -1 EINPROGRESS (Operation now in progress)",
            "listen(3, 5) = 0",
        ]
    );
    assert!(same_call(
        "shutdown(4, SHUT_WR) = ?",
        "shutdown(4, SHUT_WR) = 0"
    ));
    assert!(!same_call(
        "shutdown(4, SHUT_RD) = ?",
        "shutdown(4, SHUT_WR) = 0"
    ));
    assert!(!same_call(
        "connect(4, 0x1, 16) = ?",
        "connect(4, 0x1, 16) = 0"
    ));
}

//! Problems real programs met under saps-run (issue 17), each as the
//! program that met it: the supervisor must answer as the kernel would and
//! never hang. The line-by-line comparison with the kernel is the
//! conformance suite (`conformance.rs`); these are the cases that need
//! several processes, a trace, or a look from outside.

use saps_tests::*;
use std::process::Command;
use std::time::Duration;

/// Several processes each close, again and again, a listener with clients
/// queued on it and bind its port again. Closing such a listener once
/// deadlocked the supervisor: it held the listeners' lock while moving the
/// queue to the orphans, which take that lock again.
const CLOSE_WITH_CLIENTS_QUEUED: &str = r#"
import os, select, socket, sys
procs, rounds = int(sys.argv[1]), int(sys.argv[2])
def one():
    for r in range(rounds):
        l = socket.socket()
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", 0))
        port = l.getsockname()[1]
        l.listen(8)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        # The clients wait in the listener's queue: it polls readable.
        if not select.select([l], [], [], 10)[0]:
            sys.exit("round %d: the listener never became readable" % r)
        l.close()
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("0.0.0.0", port))
        again.close()
        for c in clients:
            c.close()
kids = []
for _ in range(procs):
    pid = os.fork()
    if pid == 0:
        one()
        os._exit(0)
    kids.append(pid)
bad = sum(os.waitpid(k, 0)[1] != 0 for k in kids)
print("done", bad, flush=True)
sys.exit(1 if bad else 0)
"#;

fn closing_listeners_with_clients_queued_never_hangs(zero_relay: &str, trace: bool) {
    let mut cmd = Command::new(bin("saps-run"));
    cmd.args(["--address", "127.0.0.1", "--zero-relay", zero_relay]);
    if trace {
        cmd.args(["--trace", "-o", "/dev/null"]);
    }
    cmd.args(["--", PYTHON, "-c", CLOSE_WITH_CLIENTS_QUEUED, "3", "8"]);
    let mut p = Proc::spawn(&mut cmd);
    let status = p.wait_timeout(Duration::from_secs(90));
    assert_eq!(
        status,
        Some(0),
        "saps-run did not finish (a hung supervisor?)\nstdout: {}\nstderr: {}",
        p.stdout(),
        p.stderr()
    );
    assert!(p.stdout().contains("done 0"), "{}", p.stdout());
}

#[test]
fn closing_listeners_with_clients_queued_never_hangs_zero_relay() {
    closing_listeners_with_clients_queued_never_hangs("on", false);
}

#[test]
fn closing_listeners_with_clients_queued_never_hangs_relayed() {
    closing_listeners_with_clients_queued_never_hangs("off", false);
}

#[test]
fn closing_listeners_with_clients_queued_never_hangs_traced() {
    closing_listeners_with_clients_queued_never_hangs("on", true);
}

//! Shared harness of the integration tests: launch a real program under the
//! filter and serve its trapped syscalls with a tiny supervisor loop on a
//! thread. Every wait is bounded by a deadline.

// Each test crate uses its own part of the harness.
#![allow(dead_code)]

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use saps_interceptor::{ExitStatus, Notification, Notifier, Reply, Target, TargetMemory};

/// Upper bound for any one test's target.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Debian's interpreter, by absolute path: a `python3` found on `PATH` may be
/// a version manager's shim (pyenv's is a bash script that forks helpers and,
/// without `HOME`, looks users up over a unix socket), whose extra processes
/// and syscalls are not the program under test.
pub const PYTHON: &str = "/usr/bin/python3";

/// Runs `python3 -c SCRIPT` under the filter.
pub fn python(script: &str) -> (Target, Notifier) {
    Target::spawn(
        PYTHON.as_ref(),
        &[OsString::from("-c"), OsString::from(script)],
    )
    .expect("spawn python3")
}

/// Blocks until `fd` is readable or `left` has passed; returns the events.
pub fn wait_readable(fd: impl AsFd, left: Duration) -> PollFlags {
    let timeout =
        PollTimeout::try_from(left.min(Duration::from_millis(100))).unwrap_or(PollTimeout::ZERO);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
        Err(nix::errno::Errno::EINTR) => PollFlags::empty(),
        Err(e) => panic!("poll: {e}"),
    }
}

/// Whether `n` is a `connect` to a unix-domain address. Without `HOME`,
/// python's startup looks the user up through nscd's unix socket; a BPF
/// filter cannot read the address, so that `connect` traps. The supervisor
/// lets such calls run, and so does this harness, without handing them to a
/// test's handler or counting them as its calls.
pub fn is_unix_connect(n: &Notification) -> bool {
    i64::from(n.nr) == libc::SYS_connect
        && TargetMemory::new(n.pid)
            .read(n.args[1], 2)
            .is_ok_and(|b| u16::from_ne_bytes([b[0], b[1]]) == libc::AF_UNIX as u16)
}

/// Serves trapped syscalls until every process of the target is gone (the
/// listener hangs up). `handler` answers by returning a reply, or `None` if
/// it already answered (ADDFD with SEND). Returns every notification seen.
pub fn serve<F>(notifier: Notifier, mut handler: F) -> JoinHandle<Vec<Notification>>
where
    F: FnMut(&Notifier, &Notification) -> Option<Reply> + Send + 'static,
{
    std::thread::spawn(move || {
        let deadline = Instant::now() + LIMIT;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let events = wait_readable(&notifier, left);
            if events.contains(PollFlags::POLLIN) {
                let n = match notifier.try_recv() {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => panic!("recv: {e}"),
                };
                if is_unix_connect(&n) {
                    notifier.respond(n.id, Reply::Continue).expect("respond");
                    continue;
                }
                seen.push(n);
                if let Some(reply) = handler(&notifier, &n) {
                    notifier.respond(n.id, reply).expect("respond");
                }
            } else if events.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return seen;
            }
        }
        panic!("supervisor loop still running after {LIMIT:?}");
    })
}

/// Waits for the main process within [`LIMIT`], killing it on timeout.
pub fn wait_within_limit(target: &Target) -> ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = target.try_wait().expect("try_wait") {
            return status;
        }
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) => drop(wait_readable(target, left)),
            None => {
                target.signal(libc::SIGKILL).expect("kill");
                target.wait().expect("reap");
                panic!("target did not exit within {LIMIT:?}");
            }
        }
    }
}

/// Runs `script` under the filter with `handler`; asserts it exits 0 and
/// returns the notifications.
pub fn run_python<F>(script: &str, handler: F) -> Vec<Notification>
where
    F: FnMut(&Notifier, &Notification) -> Option<Reply> + Send + 'static,
{
    let (target, notifier) = python(script);
    let server = serve(notifier, handler);
    let status = wait_within_limit(&target);
    let seen = server.join().expect("supervisor thread");
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "python failed; notifications: {seen:?}"
    );
    seen
}

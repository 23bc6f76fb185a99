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
use saps_interceptor::{ExitStatus, Notification, Notifier, Reply, Target};

/// Upper bound for any one test's target.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Runs `python3 -c SCRIPT` under the filter.
pub fn python(script: &str) -> (Target, Notifier) {
    Target::spawn(
        "python3".as_ref(),
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

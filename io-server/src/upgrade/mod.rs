//! `io-server upgrade` (issue 19): the old process freezes, hands its
//! descriptors and its state to a new one, which resumes where it stopped
//! (design note `bench/notes/2026-12-03-upgrade-design.md`).
//!
//! [`state`] is the state's format and its capture and rebuild for what
//! lives in memory without a task (the listener groups, their schedulers,
//! queues, ramps and ledger; the server's counters; the listening
//! sockets); [`nodes`] quiesces the joined nodes and moves their endpoints,
//! relays and hand-offs; [`handover`] is the transfer between the two
//! processes over the control socket.

pub mod handover;
pub(crate) mod nodes;
pub mod state;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_groups;

/// The launcher behind `SIGUSR2` (`io-server upgrade` by a signal): a
/// child, forked before the sandbox (which allows no `execve`), that runs
/// `program args… upgrade` once for every octet written to the returned
/// pipe. The daemon writes one on `SIGUSR2`; the new process, once it has
/// taken over, starts a launcher of its own.
pub fn launcher(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &std::ffi::OsStr| {
        std::ffi::CString::new(s.as_bytes()).map_err(|e| std::io::Error::other(e.to_string()))
    };
    let mut argv = vec![c(program.as_os_str())?];
    for a in args {
        argv.push(c(a)?);
    }
    argv.push(c(std::ffi::OsStr::new("upgrade"))?);
    crate::sys::spawn_launcher(&argv)
}

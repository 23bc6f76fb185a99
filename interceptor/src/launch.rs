//! Starting the target program under the filter (DESIGN.md "Dependencies":
//! build the BPF in the parent; between `fork` and `exec` the child only
//! makes raw syscalls — `prctl(PR_SET_NO_NEW_PRIVS)`, `seccomp` with
//! `SECCOMP_FILTER_FLAG_NEW_LISTENER`, `sendmsg` of the listener — then
//! `execve`s).
//!
//! [`Target::spawn`] returns once the child has exec'd (or failed to), so an
//! exec error is reported synchronously, like a shell would. The supervisor
//! must serve every process of the tree (the filter is inherited) and reap
//! grandchildren itself (e.g. as `PR_SET_CHILD_SUBREAPER`); the main process's
//! status, from [`Target::wait`], is what `saps-run` exits with.

use std::ffi::{CString, OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use crate::error::{ChildStage, Error, Result};
use crate::filter::{Filter, FilterOptions};
use crate::notify::Notifier;
use crate::sys;

/// How the target's main process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by `signal`.
    Signal { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal.
    pub fn exit_code(&self) -> i32 {
        match *self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal { signal, .. } => 128 + signal,
        }
    }
}

/// The main process of the target program.
#[derive(Debug)]
pub struct Target {
    pid: u32,
    pidfd: OwnedFd,
}

impl Target {
    /// Runs `program` (searched in `PATH` like `execvp`) with `args` under
    /// the default filter; returns the target and the listener of its filter.
    pub fn spawn(program: &OsStr, args: &[OsString]) -> Result<(Target, Notifier)> {
        Self::spawn_with(program, args, &FilterOptions::default())
    }

    /// [`Target::spawn`] with explicit filter options.
    pub fn spawn_with(
        program: &OsStr,
        args: &[OsString],
        options: &FilterOptions,
    ) -> Result<(Target, Notifier)> {
        let argv = std::iter::once(program)
            .chain(args.iter().map(OsString::as_os_str))
            .map(cstring)
            .collect::<Result<_>>()?;
        let envp = std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                cstring(&kv).ok()
            })
            .collect();
        let plan = sys::ChildPlan::new(
            Filter::build(options),
            exec_candidates(program)?,
            argv,
            envp,
        );

        let (parent_sock, child_sock) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::io("socketpair")(e.into()))?;
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("pipe2")(e.into()))?;
        let pid = sys::fork_filtered(&plan, child_sock.as_fd(), err_write.as_fd())
            .map_err(Error::io("fork"))?;
        drop((child_sock, err_write));
        // The child stays a zombie until we reap it, so its pid cannot be
        // reused before this.
        let pidfd = sys::pidfd_open(pid).map_err(|e| {
            // Without a pidfd the child cannot be supervised: end it.
            let child = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            Error::io("pidfd_open")(e)
        })?;
        let target = Target {
            pid: pid as u32,
            pidfd,
        };

        let listener = sys::recv_fd(parent_sock.as_fd())
            .map_err(Error::io("receiving the seccomp listener"))?;
        let mut report = Vec::with_capacity(8);
        std::fs::File::from(err_read)
            .read_to_end(&mut report)
            .map_err(Error::io("reading the exec status"))?;
        let failure = (report.len() == 8).then(|| {
            let word = |i: usize| {
                u32::from_ne_bytes([report[i], report[i + 1], report[i + 2], report[i + 3]])
            };
            (
                ChildStage::from_u32(word(0)),
                nix::errno::Errno::from_raw(word(4) as i32),
            )
        });
        match (listener, failure) {
            (Some(listener), None) => Ok((target, Notifier::new(listener))),
            (_, failure) => {
                // The child has exited (127); reap it before reporting.
                target.wait()?;
                Err(match failure {
                    Some((Some(ChildStage::Exec), errno)) => Error::Exec {
                        program: program.to_string_lossy().into_owned(),
                        errno,
                    },
                    Some((Some(stage), errno)) => Error::ChildSetup { stage, errno },
                    _ => Error::NoListener,
                })
            }
        }
    }

    /// The main process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Blocks until the main process exits and reaps it.
    pub fn wait(&self) -> Result<ExitStatus> {
        // Without WNOHANG the kernel always reports a status.
        Ok(self.wait_flags(0)?.unwrap_or(ExitStatus::Code(0)))
    }

    /// Reaps the main process if it has exited (poll [`Target::as_fd`] for
    /// readability to know when).
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.wait_flags(libc::WNOHANG)
    }

    fn wait_flags(&self, flags: i32) -> Result<Option<ExitStatus>> {
        let status = sys::waitid_pidfd(self.pidfd.as_fd(), flags).map_err(Error::io("waitid"))?;
        Ok(status.map(|(code, status)| match code {
            libc::CLD_EXITED => ExitStatus::Code(status),
            _ => ExitStatus::Signal {
                signal: status,
                core_dumped: code == libc::CLD_DUMPED,
            },
        }))
    }

    /// Sends `sig` to the main process (saps-run forwards its signals).
    pub fn signal(&self, sig: i32) -> Result<()> {
        sys::pidfd_send_signal(self.pidfd.as_fd(), sig).map_err(Error::io("pidfd_send_signal"))
    }
}

/// The pidfd: readable once the main process has exited.
impl AsFd for Target {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

fn cstring(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| Error::NulByte(s.to_string_lossy().into_owned()))
}

/// The paths `execvp` would try for `program`, in order.
fn exec_candidates(program: &OsStr) -> Result<Vec<CString>> {
    if program.as_bytes().contains(&b'/') {
        return Ok(vec![cstring(program)?]);
    }
    if program.is_empty() {
        return Ok(Vec::new());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    path.as_bytes()
        .split(|&b| b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { b".".as_slice() } else { dir };
            let mut full = dir.to_vec();
            full.push(b'/');
            full.extend_from_slice(program.as_bytes());
            cstring(OsStr::from_bytes(&full))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_path_unless_program_has_a_slash() {
        let c = exec_candidates(OsStr::new("./x")).unwrap();
        assert_eq!(c, vec![CString::new("./x").unwrap()]);
        let c = exec_candidates(OsStr::new("sh")).unwrap();
        assert!(c.iter().all(|p| p.to_bytes().ends_with(b"/sh")));
        assert!(exec_candidates(OsStr::new("")).unwrap().is_empty());
        assert!(matches!(
            exec_candidates(OsStr::from_bytes(b"a\0b")),
            Err(Error::NulByte(_))
        ));
    }

    #[test]
    fn exit_code_is_shell_style() {
        assert_eq!(ExitStatus::Code(7).exit_code(), 7);
        assert_eq!(
            ExitStatus::Signal {
                signal: 9,
                core_dumped: false
            }
            .exit_code(),
            137
        );
    }
}

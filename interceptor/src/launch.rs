//! Starting the target program under the filter (DESIGN.md "Dependencies":
//! build the BPF in the parent; between `fork` and `exec` the child only
//! makes raw syscalls — `prctl(PR_SET_PDEATHSIG)`, `prctl(PR_SET_NO_NEW_PRIVS)`,
//! `seccomp` with `SECCOMP_FILTER_FLAG_NEW_LISTENER`, `sendmsg` of the
//! listener — then `execve`s).
//!
//! [`Target::spawn`] returns once the child has exec'd (or failed to), so an
//! exec error is reported synchronously, like a shell would. The supervisor
//! must serve every process of the tree (the filter is inherited) until the
//! last one has exited: a caller that made itself a subreaper
//! ([`become_subreaper`]) before spawning hands the reaping of the whole
//! tree to a thread with [`Target::reap_tree`], whose [`Tree`] becomes
//! readable when the tree is gone and can signal what remains of it. The
//! main process's status, from [`Target::wait`], is what `saps-run` exits
//! with.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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
    /// From `waitid`'s `si_code` and `si_status`.
    fn from_waitid(code: i32, status: i32) -> Self {
        match code {
            libc::CLD_EXITED => ExitStatus::Code(status),
            _ => ExitStatus::Signal {
                signal: status,
                core_dumped: code == libc::CLD_DUMPED,
            },
        }
    }

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
    /// Who reaps the main process, and its status once reaped.
    main: Arc<MainSlot>,
}

/// Who reaps the main process.
#[derive(Clone, Copy, Debug)]
enum Reaping {
    /// [`Target::wait`]/[`Target::try_wait`], through the pidfd.
    ByCaller,
    /// The tree's reaper thread ([`Target::reap_tree`]).
    ByReaper,
    /// The reaper thread ended without seeing the main process (it failed):
    /// [`Target::wait`] tries the pidfd.
    ReaperGone,
    /// Done: its status.
    Reaped(ExitStatus),
}

#[derive(Debug)]
struct MainSlot {
    state: Mutex<Reaping>,
    changed: Condvar,
}

impl MainSlot {
    fn lock(&self) -> MutexGuard<'_, Reaping> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, r: Reaping) {
        *self.lock() = r;
        self.changed.notify_all();
    }
}

impl Target {
    /// Runs `program` (searched in `PATH` like `execvp`) with `args` under
    /// the default filter; returns the target and the listener of its filter.
    ///
    /// The main process gets `SIGKILL` when its parent dies
    /// (`PR_SET_PDEATHSIG`), which the kernel ties to the *thread* that
    /// called this: that thread must outlive the target.
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
            Filter::build(options)?,
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
            main: Arc::new(MainSlot {
                state: Mutex::new(Reaping::ByCaller),
                changed: Condvar::new(),
            }),
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

    /// Blocks until the main process exits and reaps it (or, once
    /// [`Target::reap_tree`] runs, until its reaper has); the status again
    /// on later calls.
    pub fn wait(&self) -> Result<ExitStatus> {
        {
            let mut state = self.main.lock();
            loop {
                match *state {
                    Reaping::Reaped(status) => return Ok(status),
                    Reaping::ByReaper => {
                        state = self
                            .main
                            .changed
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                    Reaping::ByCaller | Reaping::ReaperGone => break,
                }
            }
        }
        // Without WNOHANG the kernel always reports a status.
        Ok(self.wait_flags(0)?.unwrap_or(ExitStatus::Code(0)))
    }

    /// Reaps the main process if it has exited (poll [`Target::as_fd`] for
    /// readability to know when); with [`Target::reap_tree`], the status its
    /// reaper recorded, if any yet.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        let state = *self.main.lock();
        match state {
            Reaping::Reaped(status) => Ok(Some(status)),
            Reaping::ByReaper => Ok(None),
            Reaping::ByCaller | Reaping::ReaperGone => self.wait_flags(libc::WNOHANG),
        }
    }

    fn wait_flags(&self, flags: i32) -> Result<Option<ExitStatus>> {
        let status = sys::waitid_pidfd(self.pidfd.as_fd(), flags).map_err(Error::io("waitid"))?;
        let status = status.map(|(code, status)| ExitStatus::from_waitid(code, status));
        if let Some(s) = status {
            self.main.set(Reaping::Reaped(s));
        }
        Ok(status)
    }

    /// Whether the main process has exited (reaped or not): its pidfd is
    /// readable.
    pub fn has_exited(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Resolves once the main process has exited (reaped or not); needs a
    /// tokio runtime with IO enabled.
    pub async fn exited(&self) -> Result<()> {
        let fd = self
            .pidfd
            .try_clone()
            .map_err(Error::io("dup of the pidfd"))?;
        let fd = sys::async_readable(fd).map_err(Error::io("watching the pidfd"))?;
        let _ready = fd
            .readable()
            .await
            .map_err(Error::io("watching the pidfd"))?;
        Ok(())
    }

    /// Starts a thread that reaps every child of this process — the main
    /// process, and the orphans of its tree that the kernel reparents to a
    /// subreaper ([`become_subreaper`], which must have been called before
    /// [`Target::spawn`]) — until none is left. [`Target::wait`] then
    /// returns the main status the thread recorded.
    ///
    /// The thread reaps with `waitid(P_ALL)`: this process must have no
    /// children of its own besides the target, and nothing else may wait
    /// for them. Call it before anyone waits for the target.
    pub fn reap_tree(&self) -> Result<Tree> {
        let (done_read, done_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("pipe2")(e.into()))?;
        let previous = std::mem::replace(&mut *self.main.lock(), Reaping::ByReaper);
        if let Reaping::Reaped(status) = previous {
            // Already reaped by the caller: the reaper reaps the rest.
            self.main.set(Reaping::Reaped(status));
        }
        let (main, pid) = (self.main.clone(), self.pid as libc::pid_t);
        let spawned = std::thread::Builder::new()
            .name("saps-reaper".into())
            .spawn(move || reap_until_none(pid, &main, done_write));
        if let Err(e) = spawned {
            self.main.set(previous);
            return Err(Error::io("starting the reaper thread")(e));
        }
        Ok(Tree { done: done_read })
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

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`): the
/// descendants the target's processes orphan (a daemon that forked and let
/// its parent exit) are reparented to this process, so that
/// [`Target::reap_tree`] sees and reaps them. Call it before
/// [`Target::spawn`].
pub fn become_subreaper() -> Result<()> {
    sys::set_child_subreaper().map_err(Error::io("prctl(PR_SET_CHILD_SUBREAPER)"))
}

/// The reaper thread of [`Target::reap_tree`]: reaps every child until none
/// is left, records the main process's status, then closes `done` (also
/// when it fails or panics: the write end drops with the thread).
fn reap_until_none(main_pid: libc::pid_t, main: &MainSlot, done: OwnedFd) {
    let mut seen_main = false;
    loop {
        match sys::wait_any() {
            Ok(Some((pid, code, status))) => {
                let status = ExitStatus::from_waitid(code, status);
                if pid == main_pid {
                    seen_main = true;
                    main.set(Reaping::Reaped(status));
                } else {
                    tracing::debug!(pid, ?status, "reaped a process of the program's tree");
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "reaping the program's processes failed");
                break;
            }
        }
    }
    if !seen_main {
        let mut state = main.lock();
        if matches!(*state, Reaping::ByReaper) {
            *state = Reaping::ReaperGone;
            main.changed.notify_all();
        }
    }
    let _ = std::fs::File::from(done).write_all(&[1]);
}

/// The target's whole process tree, reaped by a thread of its own
/// ([`Target::reap_tree`]). Readable ([`AsFd`]) once the last process of
/// the tree has exited and been reaped.
#[derive(Debug)]
pub struct Tree {
    done: OwnedFd,
}

impl Tree {
    /// Whether the whole tree has exited.
    pub fn is_done(&self) -> bool {
        self.wait_done(Duration::ZERO)
    }

    /// Waits up to `timeout` for the whole tree to exit; whether it has.
    pub fn wait_done(&self, timeout: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.done.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(n) if n > 0 => return true,
                Err(nix::errno::Errno::EINTR) if !left.is_zero() => continue,
                _ if Instant::now() < deadline => continue,
                _ => return false,
            }
        }
    }

    /// Sends `sig` to every live descendant of this process (the main
    /// process included if it still runs); returns how many got it.
    ///
    /// Descendants are found from the parent pids of every process in
    /// `/proc` (`/proc/PID/task/TID/children` needs `CONFIG_PROC_CHILDREN`,
    /// which not every kernel has), parents before children. A process is
    /// signalled through a pidfd opened *before* its parent was checked
    /// again, and only if both it and that parent were still unreaped after
    /// the check, so a recycled pid never gets the signal. A process forked
    /// while the walk runs may be missed; [`Tree::kill`] walks again until
    /// nothing is left.
    pub fn signal(&self, sig: i32) -> usize {
        let me = std::process::id() as libc::pid_t;
        let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
        for (pid, ppid) in processes() {
            children.entry(ppid).or_default().push(pid);
        }
        let mut queue: VecDeque<(libc::pid_t, libc::pid_t, Option<Arc<OwnedFd>>)> = children
            .get(&me)
            .into_iter()
            .flatten()
            .map(|&pid| (pid, me, None))
            .collect();
        let alive = |fd: &OwnedFd| sys::pidfd_send_signal(fd.as_fd(), 0).is_ok();
        let mut signalled = 0;
        while let Some((pid, parent, parent_fd)) = queue.pop_front() {
            let Ok(fd) = sys::pidfd_open(pid) else {
                continue;
            };
            // Read after the pidfd was opened: if the process is still
            // unreaped afterwards, this is its parent, not a recycled pid's.
            let Some(ppid) = parent_pid(pid) else {
                continue;
            };
            let parent_still = parent_fd.as_deref().is_none_or(alive);
            let ours = ppid == me || (ppid == parent && parent_still);
            if !ours || !alive(&fd) {
                continue;
            }
            if sys::pidfd_send_signal(fd.as_fd(), sig).is_ok() {
                signalled += 1;
            }
            let fd = Arc::new(fd);
            for &child in children.get(&pid).into_iter().flatten() {
                queue.push_back((child, pid, Some(fd.clone())));
            }
        }
        signalled
    }

    /// `SIGKILL`s every descendant, again and again until the whole tree
    /// has been reaped or `timeout` has passed; whether it was.
    pub fn kill(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_done() {
                return true;
            }
            self.signal(libc::SIGKILL);
            let left = deadline.saturating_duration_since(Instant::now());
            if self.wait_done(left.min(Duration::from_millis(20))) {
                return true;
            }
            if left.is_zero() {
                return false;
            }
        }
    }
}

/// Readable once the whole tree has exited.
impl AsFd for Tree {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.done.as_fd()
    }
}

/// `(pid, parent pid)` of every process in `/proc`.
fn processes() -> Vec<(libc::pid_t, libc::pid_t)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid = e.ok()?.file_name().to_str()?.parse().ok()?;
        Some((pid, parent_pid(pid)?))
    })
    .collect()
}

/// The parent pid in `/proc/PID/stat` (the field after the state, which
/// follows the command name's last `)`).
fn parent_pid(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_ppid(&stat)
}

fn parse_ppid(stat: &[u8]) -> Option<libc::pid_t> {
    let end = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[end + 1..]).ok()?;
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
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
    fn ppid_follows_the_last_parenthesis() {
        assert_eq!(parse_ppid(b"42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid(b"1 (init) S 0 1 1"), Some(0));
        assert_eq!(parse_ppid(b"1 (trunc"), None);
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

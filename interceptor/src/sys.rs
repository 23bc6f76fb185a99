//! The only `unsafe` code of the crate: thin wrappers over the raw syscalls
//! that neither `nix` nor `libc` wrap safely — `seccomp(2)` with
//! `SECCOMP_FILTER_FLAG_NEW_LISTENER`, libseccomp's notification calls
//! (receive, respond, id-valid) and the two listener ioctls it does not
//! offer (`SECCOMP_IOCTL_NOTIF_ADDFD`, `SECCOMP_IOCTL_NOTIF_SET_FLAGS`),
//! `pidfd_open`/`pidfd_getfd`/`pidfd_send_signal`, `waitid(P_PIDFD)` and
//! `waitid(P_ALL)`, `prctl(PR_SET_CHILD_SUBREAPER)`, and the fork-to-exec
//! path of the launcher (DESIGN.md "Dependencies": between `fork` and `exec`
//! the child makes only raw, async-signal-safe syscalls).
//!
//! Everything here is a small function returning `io::Result`; the typed API
//! lives in `notify`, `fds` and `launch`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;

use crate::error::ChildStage;

/// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (linux/seccomp.h, kernel ≥ 6.6);
/// `libc` does not define it.
pub const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;

/// Turns a `-1`-style return into `io::Result`.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of an fd the kernel just returned to us.
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = check(ret)? as RawFd;
    // SAFETY: `fd` is a fresh descriptor returned by the kernel to this
    // process and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues one seccomp listener ioctl whose argument is `arg`; callers pair
/// each request with the struct type its number encodes.
fn notif_ioctl<T>(listener: BorrowedFd<'_>, request: libc::Ioctl, arg: &mut T) -> io::Result<i64> {
    // SAFETY: `arg` is a live, initialised, exclusively borrowed value of the
    // type (and so the size) that `request` encodes.
    let ret = unsafe { libc::ioctl(listener.as_raw_fd(), request, arg as *mut T) };
    check(ret as libc::c_long)
}

/// libseccomp answers the notification calls only once it has probed the
/// kernel's seccomp API (`seccomp_api_get`), once per process.
fn notify_api() {
    static PROBED: std::sync::Once = std::sync::Once::new();
    PROBED.call_once(|| {
        // SAFETY: no arguments; libseccomp probes the kernel and caches it.
        let _level = unsafe { libseccomp_sys::seccomp_api_get() };
    });
}

/// A libseccomp notification call's result: it returns `-ECANCELED` when
/// the ioctl failed, leaving the ioctl's `errno`, and `-errno` otherwise.
fn seccomp_rc(ret: libc::c_int) -> io::Result<()> {
    match ret {
        0.. => Ok(()),
        r if r == -libc::ECANCELED => Err(io::Error::last_os_error()),
        r => Err(io::Error::from_raw_os_error(-r)),
    }
}

/// Receives a notification (`seccomp_notify_receive`,
/// `SECCOMP_IOCTL_NOTIF_RECV`). The buffer is zeroed first: the kernel
/// answers `EINVAL` otherwise.
pub fn notif_recv(listener: BorrowedFd<'_>) -> io::Result<libc::seccomp_notif> {
    notify_api();
    // SAFETY: `seccomp_notif` is plain integers, for which all-zero is valid.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: libc's and libseccomp's `seccomp_notif` both mirror the
    // kernel's struct field for field (`#[repr(C)]`), and the kernel writes
    // exactly that struct; `notif` is live and exclusively borrowed.
    seccomp_rc(unsafe {
        libseccomp_sys::seccomp_notify_receive(
            listener.as_raw_fd(),
            std::ptr::from_mut(&mut notif).cast(),
        )
    })?;
    Ok(notif)
}

/// Answers a notification (`seccomp_notify_respond`,
/// `SECCOMP_IOCTL_NOTIF_SEND`).
pub fn notif_send(listener: BorrowedFd<'_>, resp: libc::seccomp_notif_resp) -> io::Result<()> {
    notify_api();
    let mut resp = libseccomp_sys::seccomp_notif_resp {
        id: resp.id,
        val: resp.val,
        error: resp.error,
        flags: resp.flags,
    };
    // SAFETY: `resp` is a live, initialised response the kernel only reads.
    seccomp_rc(unsafe { libseccomp_sys::seccomp_notify_respond(listener.as_raw_fd(), &mut resp) })
}

/// Whether a notification still waits for its answer
/// (`seccomp_notify_id_valid`, `SECCOMP_IOCTL_NOTIF_ID_VALID`).
pub fn notif_id_valid(listener: BorrowedFd<'_>, id: u64) -> io::Result<()> {
    notify_api();
    // SAFETY: integer arguments only.
    seccomp_rc(unsafe { libseccomp_sys::seccomp_notify_id_valid(listener.as_raw_fd(), id) })
}

/// `SECCOMP_IOCTL_NOTIF_ADDFD`; returns the fd number in the target.
pub fn notif_addfd(
    listener: BorrowedFd<'_>,
    mut addfd: libc::seccomp_notif_addfd,
) -> io::Result<i32> {
    notif_ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ADDFD, &mut addfd).map(|fd| fd as i32)
}

/// `SECCOMP_IOCTL_NOTIF_SET_FLAGS` (the only flag is `SYNC_WAKE_UP`).
/// Unlike the other listener ioctls the kernel takes the flags *by value*,
/// although the ioctl number encodes a pointer to a u64.
pub fn notif_set_flags(listener: BorrowedFd<'_>, flags: u64) -> io::Result<()> {
    // SAFETY: integer argument only; the kernel reads no memory.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
            flags as libc::c_ulong,
        )
    };
    check(ret as libc::c_long).map(drop)
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate of the target's `fd`.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: a NULL siginfo is documented to mean "as kill(2) would".
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    check(ret).map(drop)
}

/// `waitid(P_PIDFD, pidfd, WEXITED | flags)`: `None` if `WNOHANG` was given
/// and the process has not exited, else `(si_code, si_status)`.
pub fn waitid_pidfd(pidfd: BorrowedFd<'_>, flags: i32) -> io::Result<Option<(i32, i32)>> {
    loop {
        // SAFETY: `siginfo_t` is plain data; all-zero is valid and is what
        // `WNOHANG` leaves when no child changed state.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable siginfo_t.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            )
        };
        match check(ret as libc::c_long) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            // SAFETY: the kernel filled `info` for a child event; si_pid is
            // zero when WNOHANG found nothing.
            Ok(_) if unsafe { info.si_pid() } == 0 => return Ok(None),
            // SAFETY: as above, `info` describes an exited child.
            Ok(_) => return Ok(Some((info.si_code, unsafe { info.si_status() }))),
        }
    }
}

/// `waitid(P_ALL, 0, WEXITED | __WALL)`: reaps one exited child of this
/// process (any thread's), blocking until one exits. `None` when the process
/// has no child left (`ECHILD`), else `(pid, si_code, si_status)`.
pub fn wait_any() -> io::Result<Option<(libc::pid_t, i32, i32)>> {
    loop {
        // SAFETY: `siginfo_t` is plain data; all-zero is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable siginfo_t.
        let ret = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::__WALL) };
        match check(ret as libc::c_long) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(None),
            Err(e) => return Err(e),
            // SAFETY: without WNOHANG the kernel filled `info` for an exited
            // child.
            Ok(_) => {
                return Ok(Some(unsafe {
                    (info.si_pid(), info.si_code, info.si_status())
                }))
            }
        }
    }
}

/// `prctl(PR_SET_CHILD_SUBREAPER, 1)`: orphaned descendants of this process
/// are reparented to it rather than to init.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    check(ret as libc::c_long).map(drop)
}

/// Receives one fd sent with `SCM_RIGHTS` over `sock`; `None` on EOF.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    loop {
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => other?,
        };
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: SCM_RIGHTS installed these fds in this process just
                // now; nobody else owns them.
                let mut owned: Vec<OwnedFd> = fds
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                    .collect();
                return Ok(owned.pop());
            }
        }
        return Ok(None);
    }
}

/// Everything the child needs between `fork` and `exec`, built in the parent
/// so that the child never allocates.
pub struct ChildPlan {
    /// The BPF program to load with `SECCOMP_FILTER_FLAG_NEW_LISTENER`.
    pub filter: Vec<libc::sock_filter>,
    /// Paths to try with `execve`, in order (the parent resolved `PATH`).
    pub candidates: Vec<CString>,
    /// NULL-terminated `argv`, pointing into `argv_owned`.
    argv: Vec<*const c_char>,
    /// NULL-terminated `envp`, pointing into `envp_owned`.
    envp: Vec<*const c_char>,
    _argv_owned: Vec<CString>,
    _envp_owned: Vec<CString>,
}

impl ChildPlan {
    /// Builds the pointer arrays for `execve`.
    pub fn new(
        filter: Vec<libc::sock_filter>,
        candidates: Vec<CString>,
        argv: Vec<CString>,
        envp: Vec<CString>,
    ) -> Self {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        ChildPlan {
            filter,
            candidates,
            argv: ptrs(&argv),
            envp: ptrs(&envp),
            _argv_owned: argv,
            _envp_owned: envp,
        }
    }
}

/// Forks a child that asks for `SIGKILL` when its parent dies, loads
/// `plan.filter` with a new listener, sends the listener over `sock` and
/// execs; on any failure it writes `[stage: u32, errno: u32]` to `err_pipe`
/// and exits with 127. Returns the child's pid in the parent.
///
/// The kernel sends the parent-death signal when the *thread* that forked
/// exits (prctl(2)), so the calling thread must live as long as the child is
/// meant to.
pub fn fork_filtered(
    plan: &ChildPlan,
    sock: BorrowedFd<'_>,
    err_pipe: BorrowedFd<'_>,
) -> io::Result<libc::pid_t> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork in a possibly multi-threaded process: the child only runs
    // `child_after_fork`, which makes raw async-signal-safe syscalls on data
    // prepared before the fork and never returns.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => child_after_fork(plan, parent, sock.as_raw_fd(), err_pipe.as_raw_fd()),
        pid => Ok(pid),
    }
}

fn child_after_fork(plan: &ChildPlan, parent: libc::pid_t, sock: RawFd, err_pipe: RawFd) -> ! {
    let fail = |stage: ChildStage| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0) as u32;
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
        msg[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is live.
        unsafe {
            libc::write(err_pipe, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: raw async-signal-safe syscalls on stack data and on `plan`,
    // which the parent built before forking and does not touch meanwhile.
    unsafe {
        // The target starts like any exec'd program: empty signal mask and a
        // default SIGPIPE (the Rust runtime ignores SIGPIPE).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        // The program dies with the supervisor's process. A parent that
        // died before the prctl took effect is seen in getppid (we were
        // reparented): give up then, nobody is left to serve us.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            fail(ChildStage::DeathSignal);
        }
        if libc::getppid() != parent {
            libc::_exit(127);
        }

        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(ChildStage::NoNewPrivs);
        }
        let prog = libc::sock_fprog {
            len: plan.filter.len() as u16,
            filter: plan.filter.as_ptr().cast_mut(),
        };
        // SPEC_ALLOW: the filter intercepts, it does not confine, so it
        // must not switch on the Speculative Store Bypass mitigation that
        // kernels booted with `spec_store_bypass_disable=seccomp` force
        // on every filtered task (a program would then run slower under
        // saps-run than directly for a reason that has nothing to do
        // with SAPS).
        let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW;
        // WAIT_KILLABLE_RECV (Linux 5.19): once the supervisor has taken a
        // call, only a fatal signal interrupts it, as natively for calls
        // that never sleep (bind, listen …); the supervisor answers a call
        // that sleeps natively (a blocking accept) with ERESTARTSYS when a
        // signal is pending (`SupervisorState::interrupted`,
        // supervisor/call.rs). Older kernels: without.
        let mut listener = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
            &prog as *const libc::sock_fprog,
        );
        if listener < 0 && *libc::__errno_location() == libc::EINVAL {
            listener = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            );
        }
        if listener < 0 {
            fail(ChildStage::Seccomp);
        }
        if send_fd_raw(sock, listener as RawFd) < 0 {
            fail(ChildStage::SendListener);
        }
        libc::close(listener as RawFd);

        let mut errno = libc::ENOENT;
        for path in &plan.candidates {
            libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            let e = *libc::__errno_location();
            // execvp(3)'s rules: remember EACCES, skip path entries that do
            // not hold the program, stop at any other error.
            match e {
                libc::EACCES => errno = e,
                libc::ENOENT
                | libc::ENOTDIR
                | libc::ESTALE
                | libc::ELOOP
                | libc::ENODEV
                | libc::ETIMEDOUT => {}
                _ => {
                    errno = e;
                    break;
                }
            }
        }
        *libc::__errno_location() = errno;
        fail(ChildStage::Exec)
    }
}

/// `sendmsg` of one fd with `SCM_RIGHTS`, without allocating.
///
/// # Safety
/// Only raw syscalls on stack buffers; callable between fork and exec.
unsafe fn send_fd_raw(sock: RawFd, fd: RawFd) -> isize {
    // Aligned room for one cmsghdr carrying one int.
    let mut cbuf = [0u64; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
    let cmsg = libc::CMSG_FIRSTHDR(&msg);
    (*cmsg).cmsg_level = libc::SOL_SOCKET;
    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
}

/// `setsockopt(2)` with a raw option value, for replaying the options a
/// program set on a virtual socket onto a real one.
/// `socket(domain, ty, protocol)` with a protocol number `nix` may not
/// name (`IPPROTO_MPTCP`).
pub fn socket_raw(domain: i32, ty: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes integers only; a non-negative result is a
    // new fd that nothing else owns.
    let fd = unsafe { libc::socket(domain, ty, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `getsockopt(fd, level, name)` into a buffer of `len` octets; the value
/// the kernel wrote.
pub fn getsockopt_raw(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    len: usize,
) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut n = len as libc::socklen_t;
    // SAFETY: `buf` is a live buffer of `n` octets and `n` a live length.
    let ret =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut n) };
    check(ret as libc::c_long)?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn setsockopt_raw(fd: BorrowedFd<'_>, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is a live buffer of exactly the length passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    check(ret as libc::c_long).map(drop)
}

/// `ioctl(SIOCOUTQ)` of a stream socket of ours: octets it sent that its
/// peer has not read yet (for AF_UNIX, what they occupy in memory, which
/// is 0 exactly when none wait).
pub fn unread_by_peer(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    check(ret as libc::c_long).map(|_| n)
}

/// Registers an fd of ours with the tokio reactor for readability.
pub fn async_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, so it stays open and
    // refers to the same file description for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// [`async_readable`] for writability.
pub fn async_writable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: as in `async_readable`.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE) }
        .map_err(|e| e.into_parts().1)
}

/// The signal that interrupts the supervisor thread's blocking
/// `SECCOMP_IOCTL_NOTIF_RECV` when it must stop.
pub fn wakeup_signal() -> i32 {
    libc::SIGRTMIN() + 3
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs a no-op handler for [`wakeup_signal`] without `SA_RESTART`,
/// so the signal makes a blocked ioctl return `EINTR`.
pub fn install_wakeup_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler function and an empty
    // mask is a valid argument; the handler does nothing, so it is
    // async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        check(libc::sigaction(wakeup_signal(), &sa, std::ptr::null_mut()) as libc::c_long).map(drop)
    }
}

/// The calling thread, for [`wake_thread`].
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Interrupts a blocking call of `thread` with [`wakeup_signal`].
pub fn wake_thread(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live thread of this process: the caller keeps
    // signalling only until that thread acknowledged it is leaving.
    unsafe {
        libc::pthread_kill(thread, wakeup_signal());
    }
}

/// A request to the socket maker: `[domain, protocol, count]`, native-endian
/// `i32`s; its answer carries up to `count` sockets and one `i32`, the errno
/// of the `socket` call that stopped it short (0 when none did), and is
/// followed by a one-octet message once the maker has closed its copies.
pub const MAKER_MAX: usize = 32;

/// Starts the socket maker (`crate::maker`): a process that is not a child
/// of this one (a child would keep [`wait_any`] from ever seeing the
/// program's tree gone), in a network namespace of its own with no
/// interface up, that answers requests on `sock` (its end of a
/// `SOCK_SEQPACKET` pair) until the other end closes. Its first message is
/// the errno of its `unshare` (0: isolated). Returns once the intermediate
/// child is reaped.
pub fn fork_socket_maker(sock: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fork in a possibly multi-threaded process: both children only
    // make raw async-signal-safe syscalls on stack data, and never return.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: as above; the intermediate child forks once more and
            // exits, so that the maker is reparented away from us.
            unsafe {
                match libc::fork() {
                    0 => socket_maker_main(sock.as_raw_fd()),
                    -1 => libc::_exit(1),
                    _ => libc::_exit(0),
                }
            }
        }
        pid => {
            let mut status = 0;
            loop {
                // SAFETY: `status` lives across the call.
                let r = unsafe { libc::waitpid(pid, &mut status, 0) };
                if r == pid {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else {
                Err(io::Error::other("the socket maker could not be forked"))
            }
        }
    }
}

fn socket_maker_main(sock: RawFd) -> ! {
    // SAFETY: raw async-signal-safe syscalls on stack data only.
    unsafe {
        // No signal of saps-run's process group or handler of its runtime:
        // the maker ends when its socket's other end closes.
        libc::setsid();
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        // Nothing of saps-run's but the socket: a pipe or a socket held
        // here would never see its end of file.
        let last = libc::c_uint::MAX;
        if sock > 0 {
            libc::syscall(
                libc::SYS_close_range,
                0 as libc::c_uint,
                (sock - 1) as libc::c_uint,
                0,
            );
        }
        libc::syscall(libc::SYS_close_range, (sock + 1) as libc::c_uint, last, 0);
        let mut errno: i32 = 0;
        if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0
            && libc::unshare(libc::CLONE_NEWNET) != 0
        {
            errno = *libc::__errno_location();
        }
        let first = errno.to_ne_bytes();
        libc::send(sock, first.as_ptr().cast(), first.len(), libc::MSG_NOSIGNAL);
        if errno != 0 {
            libc::_exit(1);
        }
        loop {
            let mut req = [0u8; 12];
            let n = libc::recv(sock, req.as_mut_ptr().cast(), req.len(), 0);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n != req.len() as isize {
                libc::_exit(0);
            }
            let word = |i: usize| i32::from_ne_bytes([req[i], req[i + 1], req[i + 2], req[i + 3]]);
            let (domain, protocol) = (word(0), word(4));
            let count = (word(8).max(0) as usize).min(MAKER_MAX);
            let mut fds = [-1 as RawFd; MAKER_MAX];
            let mut made = 0;
            let mut failed: i32 = 0;
            while made < count {
                let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, protocol);
                if fd < 0 {
                    failed = *libc::__errno_location();
                    break;
                }
                fds[made] = fd;
                made += 1;
            }
            let body = failed.to_ne_bytes();
            let mut iov = libc::iovec {
                iov_base: body.as_ptr() as *mut libc::c_void,
                iov_len: body.len(),
            };
            // Room for MAKER_MAX descriptors, aligned for cmsghdr.
            let mut control = [0u64; (MAKER_MAX * 4 + 32) / 8];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if made > 0 {
                let payload = (made * std::mem::size_of::<RawFd>()) as u32;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(payload) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    made,
                );
            }
            let sent = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
            for &fd in &fds[..made] {
                libc::close(fd);
            }
            // Then a second message: the maker's copies are closed, so a
            // socket the supervisor closes is closed everywhere.
            let closed = [0u8; 1];
            if sent < 0 || libc::send(sock, closed.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) < 0 {
                libc::_exit(0);
            }
        }
    }
}

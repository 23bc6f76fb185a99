//! The allow-lists, by what needs each call (docs/io-server.md, "The
//! sandbox", says why each group is there).

use libc::*;

/// What a tokio daemon of this project makes once it is running: memory,
/// threads and their synchronisation, signals, time, the event loop,
/// sockets and pipes (the relays splice), and files it already opened.
pub const RUNTIME: &[i64] = &[
    // Memory.
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_brk,
    // Threads: tokio's workers and blocking pool, their exit.
    SYS_clone,
    SYS_clone3,
    SYS_futex,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_membarrier,
    SYS_exit,
    SYS_exit_group,
    SYS_gettid,
    SYS_getpid,
    SYS_getppid,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_prlimit64,
    SYS_uname,
    SYS_getrandom,
    SYS_prctl,
    // Signals: tokio's signal handling, and shutdown.
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_kill,
    SYS_tgkill,
    SYS_tkill,
    SYS_restart_syscall,
    // Time.
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettimeofday,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    // The event loop.
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_ppoll,
    SYS_eventfd2,
    // Descriptors already open: data, relays, the control socket.
    SYS_read,
    SYS_readv,
    SYS_pread64,
    SYS_write,
    SYS_writev,
    SYS_pwrite64,
    SYS_close,
    SYS_fcntl,
    SYS_ioctl,
    SYS_dup,
    SYS_dup3,
    SYS_lseek,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_pipe2,
    SYS_splice,
    SYS_tee,
    // Sockets: clients, the fabric, hand-off, control and metrics.
    SYS_socket,
    SYS_socketpair,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_connect,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendmmsg,
    SYS_recvmmsg,
    SYS_accept,
    #[cfg(target_arch = "x86_64")]
    SYS_epoll_wait,
    #[cfg(target_arch = "x86_64")]
    SYS_poll,
];

/// The io-server beyond [`RUNTIME`]: it removes and sets the mode of the
/// unix sockets it binds (fabric, control, hand-off), and opens nothing
/// else by path once serving but `/proc/self` for its own figures.
pub const IO_SERVER: &[i64] = &[
    SYS_openat,
    SYS_unlinkat,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_umask,
    #[cfg(target_arch = "x86_64")]
    SYS_open,
    #[cfg(target_arch = "x86_64")]
    SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    SYS_chmod,
];

/// saps-run's node beyond [`RUNTIME`]: reading the target's memory and
/// taking its descriptors (seccomp notifications), following its process
/// tree (pidfds, `waitid`), `/proc/PID` of its threads, the token file at
/// each rejoin, and the embedded io-server's sockets.
pub const NODE: &[i64] = &[
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_pidfd_open,
    SYS_pidfd_getfd,
    SYS_pidfd_send_signal,
    SYS_waitid,
    SYS_wait4,
    SYS_openat,
    SYS_getdents64,
    SYS_readlinkat,
    SYS_unlinkat,
    SYS_fchmod,
    SYS_fchmodat,
    #[cfg(target_arch = "x86_64")]
    SYS_open,
    #[cfg(target_arch = "x86_64")]
    SYS_readlink,
    #[cfg(target_arch = "x86_64")]
    SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    SYS_chmod,
];

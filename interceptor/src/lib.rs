//! `saps-interceptor`: the node side of SAPS below the supervisor — it runs
//! an unmodified program under a seccomp filter whose socket-family syscalls
//! trap to user space (`SECCOMP_RET_USER_NOTIF`), and gives the supervisor
//! typed access to the trapped syscalls, the target's memory and its fds
//! (DESIGN.md "Virtual TCP sockets"; paper §2: virtual sockets).
//!
//! * [`filter`] — the BPF program (what traps, what is refused).
//! * [`launch`] — fork/exec of the target under the filter.
//! * [`notify`] — the listener: receive, answer, `ADDFD`.
//! * [`memory`] — `process_vm_readv/writev` with faults as values.
//! * [`fds`] — socket inodes, fd flags, `pidfd_getfd`.
//! * [`diag`] — whether a socket object still exists (`sock_diag`).
//! * [`sockaddr`], [`sockopt`] — argument formats and names.
//! * [`vsock`] — the virtual-socket table, keyed by inode.
//! * [`supervisor`] — Figure 3: servicing the trapped calls against the io-server.
//! * `sys` — the only `unsafe` code: raw syscalls and ioctls.

pub mod diag;
pub mod error;
pub mod fds;
pub mod filter;
pub mod launch;
pub mod memory;
pub mod node;
pub mod notify;
pub mod sockaddr;
pub mod sockopt;
pub mod supervisor;
mod sys;
pub mod vsock;

pub use error::{ChildStage, Error, Result};
pub use filter::{Filter, FilterOptions};
pub use launch::{ExitStatus, Target};
pub use memory::{Fault, TargetMemory};
pub use notify::{AddFd, Delivery, Notification, Notifier, Reply};

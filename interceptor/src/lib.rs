//! `saps-interceptor`: the application node (paper §2) as a library — it
//! joins the io-server, runs an unmodified program under a seccomp filter
//! whose socket-family syscalls trap to user space
//! (`SECCOMP_RET_USER_NOTIF`), and services them against the io-server
//! with typed access to the trapped syscalls, the target's memory and its
//! fds (DESIGN.md "Virtual TCP sockets"; paper §2: virtual sockets).
//! `saps-run` is a thin command line over it.
//!
//! * [`node`] — [`node::ApplicationNode`]: join, hand-off claim, rejoin,
//!   the program's life.
//! * [`filter`] — the BPF program (what traps, what is refused), built with
//!   libseccomp.
//! * [`launch`] — fork/exec of the target under the filter.
//! * [`notify`] — the listener: receive, answer, `ADDFD`.
//! * [`memory`] — `process_vm_readv/writev` with faults as values.
//! * [`fds`] — socket inodes, fd flags, `pidfd_getfd`.
//! * [`maker`] — TCP placeholders made in a network namespace of their own.
//! * [`sockaddr`], [`sockopt`] — argument formats and names.
//! * [`vsock`] — the virtual-socket table, keyed by inode.
//! * [`supervisor`] — Figure 3: servicing the trapped calls against the io-server.
//! * `sys` — the only `unsafe` code: raw syscalls, libseccomp's
//!   notification calls and the ioctls it lacks.

pub mod error;
pub mod fds;
pub mod filter;
pub mod launch;
pub mod maker;
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

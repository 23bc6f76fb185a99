//! The crate's error type (STYLE.md: one `thiserror` enum per library crate).

use std::io;

/// What can go wrong while launching or supervising a target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be executed. Displays like a shell would
    /// (`PROGRAM: No such file or directory`); the binary prefixes its name.
    #[error("{program}: {}", errno.desc())]
    Exec {
        program: String,
        errno: nix::errno::Errno,
    },
    /// The child failed before `exec` while installing the filter.
    #[error("cannot confine the target ({stage:?}): {}", errno.desc())]
    ChildSetup {
        stage: ChildStage,
        errno: nix::errno::Errno,
    },
    /// An argument or the program name holds a NUL byte.
    #[error("argument contains a NUL byte: {0:?}")]
    NulByte(String),
    /// The child died before it could report anything.
    #[error("the target exited before sending its seccomp listener")]
    NoListener,
    /// libseccomp could not build the target's filter.
    #[error("cannot build the seccomp filter: {0}")]
    Filter(#[from] libseccomp::error::SeccompError),
    /// A syscall in the supervisor failed.
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Wraps an `io::Error` with what was being done.
    pub fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the child failed; sent to the parent over the error pipe together
/// with `errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ChildStage {
    /// `prctl(PR_SET_NO_NEW_PRIVS)`.
    NoNewPrivs = 1,
    /// `seccomp(SECCOMP_SET_MODE_FILTER)`.
    Seccomp = 2,
    /// Passing the listener fd to the supervisor.
    SendListener = 3,
    /// `execve`.
    Exec = 4,
    /// `prctl(PR_SET_PDEATHSIG)`.
    DeathSignal = 5,
}

impl ChildStage {
    /// Decodes the stage number the child wrote.
    pub fn from_u32(v: u32) -> Option<Self> {
        [
            Self::NoNewPrivs,
            Self::Seccomp,
            Self::SendListener,
            Self::Exec,
            Self::DeathSignal,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

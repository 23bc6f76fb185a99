//! What can go wrong in an application node's life: joining the io-server
//! (the token, the fabric, the handshake) and running the program.

use saps_fabric::ChannelError;
use std::path::PathBuf;
use std::time::Duration;

/// Errors of [`super::ApplicationNode`].
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("reading the token file {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the token file {} is open to other users (mode {mode:04o}); make it private: chmod o-rwx {}",
        path.display(),
        path.display()
    )]
    TokenNotPrivate { path: PathBuf, mode: u32 },
    #[error("the token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("connecting to the io-server at {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the io-server refused this node: {0}")]
    Refused(ChannelError),
    #[error("the io-server closed the fabric connection")]
    ClosedBeforeWelcome,
    #[error("the io-server did not answer within {0:?}")]
    NoWelcome(Duration),
    #[error("becoming the program's subreaper")]
    Subreaper(#[source] crate::Error),
    /// The program cannot be run (a shell's 127): its own message,
    /// `PROGRAM: No such file or directory`.
    #[error(transparent)]
    Exec(crate::Error),
    #[error("starting the program")]
    Start(#[source] crate::Error),
    #[error("watching the program")]
    Watch(#[source] crate::Error),
    /// The program would get `ENOSYS` from every trapped call; it is
    /// killed.
    #[error("the supervisor stopped serving the program; killing it")]
    SupervisorStopped,
    #[error("waiting for the program")]
    Wait(#[source] crate::Error),
}

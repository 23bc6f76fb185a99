//! What an application node is told before it joins: who it is (name,
//! weight), how loopback is treated, and which io-server it joins — a
//! remote one by fabric URL and token file, or one embedded in this
//! process over an in-memory transport. Deciding the hand-off socket of a
//! same-host io-server happens here, without a socket.

use crate::supervisor::Loopback;
use saps_fabric::handoff::{side, HandoffReceiver};
use saps_fabric::token::{read_token_file, TokenFileError};
use saps_fabric::transport::{FabricUrl, StreamReader, StreamWriter, UrlError};
use std::path::{Path, PathBuf};

use super::error::NodeError;

/// The configuration of an [`super::ApplicationNode`].
pub struct NodeConfig {
    /// This node's name on the io-server.
    pub name: String,
    /// Its scheduling weight (0 drains: no new connections).
    pub weight: u32,
    /// Whether loopback binds and connects stay on this node.
    pub loopback: Loopback,
    /// The io-server to join.
    pub io_server: IoServerLink,
}

/// Which io-server a node joins.
pub enum IoServerLink {
    /// One in another process (or on another host), joined again with
    /// backoff whenever the channel to it is lost.
    Remote(RemoteIoServer),
    /// One in this process, lives and dies with it: never joined again.
    Embedded(EmbeddedIoServer),
}

/// A remote io-server: where it is and how to prove the shared token.
#[derive(Debug, Clone)]
pub struct RemoteIoServer {
    /// The URL as the user wrote it (for logs and trace annotations).
    pub url_text: String,
    pub url: FabricUrl,
    /// Read again at every (re)join, so a rotated token is picked up.
    pub token_file: PathBuf,
    /// The io-server's hand-off socket, when zero-relay applies (a
    /// same-host io-server over `unix:`): accepted clients come as sockets.
    pub handoff_side: Option<PathBuf>,
    /// How long a request (bind, listen, connect, options) waits for the
    /// io-server's answer before the program's call fails with ETIMEDOUT
    /// (`None`: for ever); [`DEFAULT_REQUEST_TIMEOUT`] unless changed.
    pub request_timeout: Option<std::time::Duration>,
}

/// Default of [`RemoteIoServer::request_timeout`] (saps-run
/// `--node-request-timeout`): above the kernel's own give-up of a connect
/// (about 127 s), so that the io-server's answer to a connect comes first
/// whatever its `--connect-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(150);

impl RemoteIoServer {
    /// The io-server at `url`, with the token in `token_file`. With
    /// `zero_relay`, a `unix:PATH` fabric comes with the hand-off socket
    /// `PATH.handoff`; a `tcp://` or `rdma://` one (another host) relays.
    pub fn new(url: &str, token_file: &Path, zero_relay: bool) -> Result<Self, UrlError> {
        let parsed: FabricUrl = url.parse()?;
        let handoff_side = match (&parsed, zero_relay) {
            (FabricUrl::Unix(path), true) => Some(side::path_for(path)),
            _ => None,
        };
        Ok(RemoteIoServer {
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            url_text: url.to_owned(),
            url: parsed,
            token_file: token_file.to_owned(),
            handoff_side,
        })
    }

    /// The token, read now from [`RemoteIoServer::token_file`] without its
    /// surrounding white space.
    pub fn read_token(&self) -> Result<Vec<u8>, NodeError> {
        let path = &self.token_file;
        let t = read_token_file(path).map_err(|e| match e {
            TokenFileError::Read(source) => NodeError::Token {
                path: path.clone(),
                source,
            },
            TokenFileError::NotPrivate { mode } => NodeError::TokenNotPrivate {
                path: path.clone(),
                mode,
            },
        })?;
        if t.is_empty() {
            return Err(NodeError::EmptyToken { path: path.clone() });
        }
        Ok(t)
    }
}

/// An io-server started in this process: the node's end of the in-memory
/// transport it serves, the token only the two of them know and, with
/// zero-relay, where it hands accepted sockets.
pub struct EmbeddedIoServer {
    pub transport: (StreamReader, StreamWriter),
    pub token: Vec<u8>,
    pub handoffs: Option<HandoffReceiver>,
    /// The program's sockets are the host kernel's own, with no socket call
    /// trapped (`listen` alone for `--trace`; docs/interceptor.md, "Native
    /// sockets"): right when this
    /// io-server would answer every call as the host's kernel does (it
    /// hands every client over, serves the wildcard address with no port
    /// policy, and loopback stays local).
    pub native_sockets: bool,
}

impl IoServerLink {
    /// What the trace annotations call the io-server: its URL, or
    /// `embedded`.
    pub fn label(&self) -> &str {
        match self {
            IoServerLink::Remote(r) => &r.url_text,
            IoServerLink::Embedded(_) => "embedded",
        }
    }
}

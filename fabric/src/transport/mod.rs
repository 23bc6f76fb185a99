//! Byte transports under a channel: `unix:`, `tcp://`, in-memory, and
//! `rdma://` (cargo feature `rdma`).
//!
//! A transport carries the channel's bytes in order and reliably; it knows
//! nothing of frames or connections. The shape is two halves, a
//! [`TransportRead`] that fills a buffer and a [`TransportWrite`] that takes
//! whole chunks of frames, so that a message-oriented transport (RDMA with
//! registered buffers, where a send completion frees a buffer) fits as well as
//! a byte stream: its `write` waits for a free registered buffer, which is the
//! transport-level `buffer_available`.
//!
//! [`connect_stream`] and [`StreamListener`] open any [`FabricUrl`]; their
//! [`StreamReader`]/[`StreamWriter`] carry either a byte stream or, in a
//! build with the `rdma` feature, an RDMA channel, so the node and the
//! io-server run one driver type whatever the URL says.

use bytes::{BufMut, Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

#[cfg(feature = "rdma")]
pub mod rdma;

/// The receiving half of a transport.
pub trait TransportRead: Send + 'static {
    /// Appends received bytes to `buf`. `Ok(0)` means the peer closed.
    fn read(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;
    /// [`TransportRead::read`] of at most about `max` octets, where the
    /// transport can bound a read (after a splice: the next frame's
    /// header, without much of its payload).
    fn read_at_most(
        &mut self,
        buf: &mut BytesMut,
        _max: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        self.read(buf)
    }
    /// Whether [`TransportRead::splice_into`] works (a socket transport).
    fn can_splice(&self) -> bool {
        false
    }
    /// Moves up to `len` octets of the stream into `pipe`, once there are
    /// some: `Some(n)` (0 at the end of the stream), or `None` when they
    /// cannot go there now (the pipe is full, or the transport cannot
    /// splice) and should be read instead.
    fn splice_into(
        &mut self,
        _pipe: &crate::splice::Pipe,
        _len: usize,
    ) -> impl Future<Output = io::Result<Option<usize>>> + Send {
        async { Ok(None) }
    }
}

/// The sending half of a transport.
pub trait TransportWrite: Send + 'static {
    /// Sends `bytes` (one or more whole frames), in order after earlier writes.
    fn write(&mut self, bytes: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the sending direction.
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether `write` hands each chunk on as it is (to a reader in the
    /// same process), so the chunk should own its buffer (see
    /// `Channel::hand_off_buffers`, which the driver sets from this).
    fn hands_chunks_on(&self) -> bool {
        false
    }
    /// Whether [`TransportWrite::splice_some`] works (a socket transport).
    fn can_splice(&self) -> bool {
        false
    }
    /// Writes a first part of `bytes` (some of it, unless it is empty) and
    /// steps `bytes` past it: the write of a writer that can stop between
    /// two steps ([`TransportWrite::stops_anywhere`]). The default writes
    /// all of it ([`TransportWrite::write`]).
    fn write_some(&mut self, bytes: &mut Bytes) -> impl Future<Output = io::Result<()>> + Send {
        async move { self.write(std::mem::take(bytes)).await }
    }
    /// Sends a first part (some, unless it is 0) of the next `left` octets
    /// of `pipe`, in order after earlier writes (see [`crate::splice`]),
    /// and counts `left` down by it. Only where
    /// [`TransportWrite::can_splice`]; the default cannot.
    fn splice_some(
        &mut self,
        _pipe: &crate::splice::Pipe,
        _left: &mut usize,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async { Err(io::ErrorKind::Unsupported.into()) }
    }
    /// Whether [`TransportWrite::write_some`] and
    /// [`TransportWrite::splice_some`] lose nothing when dropped before
    /// they finish (they wrote nothing, and `bytes` and `left` say so):
    /// the driver's writer then stops in the middle of a piece of output
    /// when its tasks are paused, and gives the rest back to the channel.
    fn stops_anywhere(&self) -> bool {
        false
    }
    /// The socket under the transport (a `unix:` or `tcp://` one), which
    /// an upgrade in place moves to another endpoint
    /// ([`crate::endpoint::Capture`]); `None`: nothing that can move.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Any tokio byte stream (unix socket, TCP socket, in-memory duplex).
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncStream for T {}

/// Reads of a stream transport ask for at least this much room.
const READ_CHUNK: usize = 256 * 1024;

/// The reading half of a fabric connection (a byte stream, or RDMA).
pub struct StreamReader(Reader);
/// The writing half of a fabric connection (a byte stream, or RDMA).
pub struct StreamWriter(Writer);

enum Reader {
    /// A byte stream's read half (`tokio::io::split`'s).
    Stream(Box<dyn AsyncRead + Unpin + Send>),
    Unix(tokio::net::unix::OwnedReadHalf),
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Memory(MemoryReader),
    #[cfg(feature = "rdma")]
    Rdma(rdma::RdmaReader<rdma::hw::IbVerbs>),
}

enum Writer {
    Stream(WriteHalf<Box<dyn AsyncStream>>),
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    /// `None` once shut down.
    Memory(Option<tokio::sync::mpsc::Sender<Bytes>>),
    #[cfg(feature = "rdma")]
    Rdma(rdma::RdmaWriter<rdma::hw::IbVerbs>),
}

/// Splits a byte stream into transport halves.
pub fn stream<S: AsyncStream>(s: S) -> (StreamReader, StreamWriter) {
    let (r, w) = tokio::io::split(Box::new(s) as Box<dyn AsyncStream>);
    (
        StreamReader(Reader::Stream(Box::new(r))),
        StreamWriter(Writer::Stream(w)),
    )
}

/// A unix socket's transport halves; both splice.
pub fn unix_socket(s: tokio::net::UnixStream) -> (StreamReader, StreamWriter) {
    let (r, w) = s.into_split();
    (StreamReader(Reader::Unix(r)), StreamWriter(Writer::Unix(w)))
}

/// A TCP socket's transport halves; both splice.
pub fn tcp_socket(s: tokio::net::TcpStream) -> (StreamReader, StreamWriter) {
    let (r, w) = s.into_split();
    (StreamReader(Reader::Tcp(r)), StreamWriter(Writer::Tcp(w)))
}

/// One read of at most `max` octets from a byte stream into `buf`.
async fn read_stream(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<usize> {
    buf.reserve(max);
    r.read_buf(&mut (&mut *buf).limit(max)).await
}

impl TransportRead for StreamReader {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        self.read_at_most(buf, READ_CHUNK).await
    }
    async fn read_at_most(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        match &mut self.0 {
            Reader::Stream(r) => read_stream(r, buf, max).await,
            Reader::Unix(r) => read_stream(r, buf, max).await,
            Reader::Tcp(r) => read_stream(r, buf, max).await,
            Reader::Memory(m) => {
                let first = match m.held.take() {
                    Some(b) => b,
                    None => match m.rx.recv().await {
                        Some(b) => b,
                        None => return Ok(0),
                    },
                };
                let mut n = first.len();
                if buf.is_empty() {
                    // The writer's buffer itself when it is the only view
                    // of it; a copy otherwise.
                    *buf = first
                        .try_into_mut()
                        .unwrap_or_else(|b| BytesMut::from(&b[..]));
                } else {
                    buf.extend_from_slice(&first);
                }
                // Small chunks already waiting join this read (one pass of
                // the reader for many small writes, as a pipe gives); a
                // large one waits for the next read rather than be copied.
                while buf.len() < READ_CHUNK {
                    match m.rx.try_recv() {
                        Ok(b) if b.len() <= MEMORY_JOIN => {
                            n += b.len();
                            buf.extend_from_slice(&b);
                        }
                        Ok(b) => {
                            m.held = Some(b);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                Ok(n)
            }
            #[cfg(feature = "rdma")]
            Reader::Rdma(r) => r.read(buf).await,
        }
    }
    fn can_splice(&self) -> bool {
        matches!(self.0, Reader::Unix(_) | Reader::Tcp(_))
    }
    async fn splice_into(
        &mut self,
        pipe: &crate::splice::Pipe,
        len: usize,
    ) -> io::Result<Option<usize>> {
        match &self.0 {
            Reader::Unix(r) => pipe.fill_from(AsRef::<UnixStream>::as_ref(r), len).await,
            Reader::Tcp(r) => pipe.fill_from(AsRef::<TcpStream>::as_ref(r), len).await,
            _ => Ok(None),
        }
    }
}

impl TransportWrite for StreamWriter {
    async fn write(&mut self, bytes: Bytes) -> io::Result<()> {
        match &mut self.0 {
            Writer::Stream(w) => w.write_all(&bytes).await,
            Writer::Unix(w) => w.write_all(&bytes).await,
            Writer::Tcp(w) => w.write_all(&bytes).await,
            // An empty chunk would read as the end.
            Writer::Memory(_) if bytes.is_empty() => Ok(()),
            Writer::Memory(tx) => match tx {
                Some(tx) => tx.send(bytes).await.map_err(|_| closed()),
                None => Err(closed()),
            },
            #[cfg(feature = "rdma")]
            Writer::Rdma(w) => w.write(bytes).await,
        }
    }
    async fn write_some(&mut self, bytes: &mut Bytes) -> io::Result<()> {
        use bytes::Buf;
        // One write each (cancel-safe: dropped while pending, it wrote
        // nothing), stepped past in the poll that wrote it.
        let n = match &mut self.0 {
            Writer::Stream(w) => w.write(bytes).await?,
            Writer::Unix(w) => w.write(bytes).await?,
            Writer::Tcp(w) => w.write(bytes).await?,
            Writer::Memory(_) if bytes.is_empty() => return Ok(()),
            Writer::Memory(tx) => {
                let tx = tx.as_ref().ok_or_else(closed)?;
                // The chunk is taken only once there is room for it.
                let permit = tx.reserve().await.map_err(|_| closed())?;
                permit.send(std::mem::take(bytes));
                return Ok(());
            }
            #[cfg(feature = "rdma")]
            Writer::Rdma(w) => return w.write(std::mem::take(bytes)).await,
        };
        if n == 0 && !bytes.is_empty() {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes.advance(n);
        Ok(())
    }
    async fn splice_some(
        &mut self,
        pipe: &crate::splice::Pipe,
        left: &mut usize,
    ) -> io::Result<()> {
        let n = match &self.0 {
            Writer::Unix(w) => {
                pipe.drain_some(AsRef::<UnixStream>::as_ref(w), *left)
                    .await?
            }
            Writer::Tcp(w) => {
                pipe.drain_some(AsRef::<TcpStream>::as_ref(w), *left)
                    .await?
            }
            _ => return Err(io::ErrorKind::Unsupported.into()),
        };
        *left -= n;
        Ok(())
    }
    fn stops_anywhere(&self) -> bool {
        match self.0 {
            Writer::Stream(_) | Writer::Unix(_) | Writer::Tcp(_) | Writer::Memory(_) => true,
            #[cfg(feature = "rdma")]
            Writer::Rdma(_) => false,
        }
    }
    fn hands_chunks_on(&self) -> bool {
        matches!(self.0, Writer::Memory(_))
    }
    fn can_splice(&self) -> bool {
        matches!(self.0, Writer::Unix(_) | Writer::Tcp(_))
    }
    fn raw_fd(&self) -> Option<RawFd> {
        match &self.0 {
            Writer::Unix(w) => Some(AsRef::<UnixStream>::as_ref(w).as_raw_fd()),
            Writer::Tcp(w) => Some(AsRef::<TcpStream>::as_ref(w).as_raw_fd()),
            _ => None,
        }
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Writer::Stream(w) => w.shutdown().await,
            Writer::Unix(w) => w.shutdown().await,
            Writer::Tcp(w) => w.shutdown().await,
            Writer::Memory(tx) => {
                *tx = None;
                Ok(())
            }
            #[cfg(feature = "rdma")]
            Writer::Rdma(w) => w.shutdown().await,
        }
    }
}

/// Chunks an in-memory transport holds before its writer waits.
const MEMORY_CHUNKS: usize = 16;

/// Chunks up to this size are joined into the read before them.
const MEMORY_JOIN: usize = 4096;

/// The reading half of an in-memory transport.
struct MemoryReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    /// A chunk taken while joining small ones, for the next read.
    held: Option<Bytes>,
}

/// An in-memory transport pair (embedded mode and tests). Each write's
/// chunk is handed to the reader as it is, not copied through a pipe.
pub fn memory_pair() -> ((StreamReader, StreamWriter), (StreamReader, StreamWriter)) {
    let half = || {
        let (tx, rx) = tokio::sync::mpsc::channel(MEMORY_CHUNKS);
        (
            StreamReader(Reader::Memory(MemoryReader { rx, held: None })),
            StreamWriter(Writer::Memory(Some(tx))),
        )
    };
    let ((ar, aw), (br, bw)) = (half(), half());
    ((ar, bw), (br, aw))
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "in-memory transport closed")
}

/// A fabric address: `unix:/path`, `tcp://host:port` or `rdma://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FabricUrl {
    Unix(PathBuf),
    Tcp(String),
    Rdma(String),
}

/// A fabric URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("fabric URL `{0}` must start with unix:, tcp:// or rdma://")]
    Scheme(String),
    #[error("fabric URL `{0}` needs host:port")]
    HostPort(String),
    #[error("fabric URL `{0}` needs a path after unix:")]
    Path(String),
}

impl std::str::FromStr for FabricUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, UrlError> {
        let host_port = |rest: &str| {
            if rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                Ok(rest.to_string())
            } else {
                Err(UrlError::HostPort(s.to_string()))
            }
        };
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(UrlError::Path(s.to_string()));
            }
            Ok(FabricUrl::Unix(path.into()))
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            host_port(rest).map(FabricUrl::Tcp)
        } else if let Some(rest) = s.strip_prefix("rdma://") {
            host_port(rest).map(FabricUrl::Rdma)
        } else {
            Err(UrlError::Scheme(s.to_string()))
        }
    }
}

impl std::fmt::Display for FabricUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FabricUrl::Unix(p) => write!(f, "unix:{}", p.display()),
            FabricUrl::Tcp(a) => write!(f, "tcp://{a}"),
            FabricUrl::Rdma(a) => write!(f, "rdma://{a}"),
        }
    }
}

/// The error for `rdma://` in a build without the `rdma` feature.
pub fn rdma_unavailable() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "rdma:// needs a build with --features rdma (this binary was built without it)",
    )
}

/// How soon the kernel gives up a `tcp://` fabric connection whose peer
/// is gone (host down, link cut): keepalive probes after `interval` of
/// silence, and `TCP_USER_TIMEOUT` of `timeout` for unacknowledged data
/// and for the probes. The channel's own Ping (`ChannelConfig::liveness`)
/// catches what these do not: a peer whose kernel still answers.
#[derive(Debug, Clone, Copy)]
pub struct TcpLiveness {
    pub interval: Duration,
    pub timeout: Duration,
}

impl TcpLiveness {
    /// Sets the options on a connected socket.
    pub fn apply(&self, s: &impl std::os::fd::AsRawFd) -> io::Result<()> {
        let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
        let idle = secs(self.interval);
        let count = (secs(self.timeout) / idle).max(1);
        let ms = self.timeout.as_millis().clamp(1, libc::c_int::MAX as u128) as libc::c_int;
        let fd = s.as_raw_fd();
        for (level, name, value) in [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, idle),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count),
            (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms),
        ] {
            // SAFETY: `fd` is a live socket for the duration of the call
            // and the value is a c_int of the size given.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Connects a node to an io-server over any fabric URL.
pub async fn connect_stream(url: &FabricUrl) -> io::Result<(StreamReader, StreamWriter)> {
    connect_stream_with(url, None).await
}

/// [`connect_stream`], with `liveness` set on a `tcp://` connection.
pub async fn connect_stream_with(
    url: &FabricUrl,
    liveness: Option<TcpLiveness>,
) -> io::Result<(StreamReader, StreamWriter)> {
    match url {
        FabricUrl::Unix(path) => Ok(unix_socket(tokio::net::UnixStream::connect(path).await?)),
        FabricUrl::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
            s.set_nodelay(true)?;
            if let Some(Err(e)) = liveness.map(|l| l.apply(&s)) {
                tracing::warn!(%addr, error = %e, "fabric keepalive not set");
            }
            Ok(tcp_socket(s))
        }
        FabricUrl::Rdma(_) => rdma_url::connect(url).await,
    }
}

/// `rdma://` under [`connect_stream`] and [`StreamListener::bind`]: the
/// RDMA transport on the first device ("no RDMA device found (…)" without
/// one), or [`rdma_unavailable`] in a build without the `rdma` feature.
#[cfg(feature = "rdma")]
mod rdma_url {
    use super::{rdma, FabricUrl, Reader, StreamListener, StreamReader, StreamWriter, Writer};
    use std::io;

    type Halves = (
        rdma::RdmaReader<rdma::hw::IbVerbs>,
        rdma::RdmaWriter<rdma::hw::IbVerbs>,
    );

    fn fabric_halves((r, w): Halves) -> (StreamReader, StreamWriter) {
        (StreamReader(Reader::Rdma(r)), StreamWriter(Writer::Rdma(w)))
    }

    pub async fn connect(url: &FabricUrl) -> io::Result<(StreamReader, StreamWriter)> {
        Ok(fabric_halves(rdma::rdma_connect(url).await?))
    }

    pub async fn bind(url: &FabricUrl) -> io::Result<StreamListener> {
        Ok(StreamListener::Rdma(rdma::RdmaListener::bind(url).await?))
    }

    pub async fn accept(
        l: &rdma::RdmaListener<rdma::IbDevice>,
    ) -> io::Result<((StreamReader, StreamWriter), String)> {
        let (halves, peer) = l.accept().await?;
        Ok((fabric_halves(halves), peer))
    }
}

#[cfg(not(feature = "rdma"))]
mod rdma_url {
    use super::{rdma_unavailable, FabricUrl, StreamListener, StreamReader, StreamWriter};
    use std::io;

    pub async fn connect(_: &FabricUrl) -> io::Result<(StreamReader, StreamWriter)> {
        Err(rdma_unavailable())
    }

    pub async fn bind(_: &FabricUrl) -> io::Result<StreamListener> {
        Err(rdma_unavailable())
    }
}

/// A listening stream fabric on the io-server.
pub enum StreamListener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
    #[cfg(feature = "rdma")]
    Rdma(rdma::RdmaListener<rdma::IbDevice>),
}

impl StreamListener {
    /// Binds `url`. A unix socket is created mode 0600 (only its owner may
    /// connect), under a private umask ([`crate::private`]); a stale socket file left by a dead io-server is replaced.
    pub async fn bind(url: &FabricUrl) -> io::Result<Self> {
        match url {
            FabricUrl::Unix(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by a running io-server", path.display()),
                    ));
                }
                let _ = std::fs::remove_file(path);
                let l = crate::private::bind_private(|| tokio::net::UnixListener::bind(path))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(StreamListener::Unix(l, path.clone()))
            }
            FabricUrl::Tcp(addr) => Ok(StreamListener::Tcp(
                tokio::net::TcpListener::bind(addr.as_str()).await?,
            )),
            FabricUrl::Rdma(_) => rdma_url::bind(url).await,
        }
    }

    /// Accepts one node; returns its transport halves and a printable peer.
    pub async fn accept(&self) -> io::Result<((StreamReader, StreamWriter), String)> {
        self.accept_node(None)
            .await
            .map(|(halves, peer, _)| (halves, peer))
    }

    /// [`StreamListener::accept`], plus the pid of the node's process when
    /// the fabric is a unix socket (same host: `SO_PEERCRED`); `liveness`
    /// is set on a `tcp://` connection.
    pub async fn accept_node(
        &self,
        liveness: Option<TcpLiveness>,
    ) -> io::Result<((StreamReader, StreamWriter), String, Option<i32>)> {
        match self {
            StreamListener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                let pid = s.peer_cred().ok().and_then(|c| c.pid());
                Ok((unix_socket(s), format!("unix:{}", path.display()), pid))
            }
            StreamListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                if let Some(Err(e)) = liveness.map(|l| l.apply(&s)) {
                    tracing::warn!(%peer, error = %e, "fabric keepalive not set");
                }
                Ok((tcp_socket(s), peer.to_string(), None))
            }
            #[cfg(feature = "rdma")]
            StreamListener::Rdma(l) => rdma_url::accept(l)
                .await
                .map(|(halves, peer)| (halves, peer, None)),
        }
    }

    /// The bound address, as a URL.
    pub fn local_url(&self) -> io::Result<FabricUrl> {
        match self {
            StreamListener::Unix(_, p) => Ok(FabricUrl::Unix(p.clone())),
            StreamListener::Tcp(l) => Ok(FabricUrl::Tcp(l.local_addr()?.to_string())),
            #[cfg(feature = "rdma")]
            StreamListener::Rdma(l) => Ok(l.local_url()?),
        }
    }
}

impl Drop for StreamListener {
    fn drop(&mut self) {
        if let StreamListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print() {
        for s in [
            "unix:/run/saps.sock",
            "tcp://0.0.0.0:7700",
            "rdma://10.0.0.1:7701",
            "tcp://[::1]:7700",
        ] {
            assert_eq!(s.parse::<FabricUrl>().unwrap().to_string(), s);
        }
        for bad in [
            "http://x:1",
            "tcp://nohost",
            "tcp://:80",
            "unix:",
            "rdma://h:99999",
        ] {
            assert!(bad.parse::<FabricUrl>().is_err(), "{bad}");
        }
    }

    /// `rdma://` reaches the RDMA transport in a build with the feature
    /// (which finds no device on a host without RDMA) and names the build
    /// that is needed without it; never "not a stream fabric".
    #[tokio::test]
    async fn rdma_urls_fail_with_the_reason_of_this_build() {
        if cfg!(feature = "rdma")
            && std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
        {
            return;
        }
        let url: FabricUrl = "rdma://127.0.0.1:1".parse().unwrap();
        let connect = connect_stream(&url).await.err().expect("no RDMA here");
        let bind = StreamListener::bind(&url)
            .await
            .err()
            .expect("no RDMA here");
        for err in [connect, bind] {
            if cfg!(feature = "rdma") {
                assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
                assert!(
                    err.to_string().starts_with("no RDMA device found ("),
                    "{err}"
                );
            } else {
                assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
                assert_eq!(err.to_string(), rdma_unavailable().to_string());
            }
        }
    }

    /// The in-memory transport hands a chunk to its reader as it is (the
    /// same buffer, when the reader's is empty), joins small chunks already
    /// waiting to it but keeps a large one for the next read, reads its
    /// writer's shutdown as the end, and refuses a write once the reader
    /// is gone.
    #[tokio::test]
    async fn memory_chunks_reach_the_reader_uncopied_and_in_order() {
        let ((mut ar, mut aw), (mut br, bw)) = memory_pair();
        assert!(aw.hands_chunks_on());
        let first = Bytes::from(b"first frame".to_vec());
        let at = first.as_ptr();
        aw.write(first).await.unwrap();
        aw.write(Bytes::new()).await.unwrap();
        aw.write(Bytes::from_static(b", second")).await.unwrap();
        let large = Bytes::from(vec![b'x'; MEMORY_JOIN + 1]);
        aw.write(large.clone()).await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(br.read(&mut buf).await.unwrap(), 19);
        assert_eq!(buf.as_ptr(), at, "the writer's buffer itself");
        assert_eq!(&buf[..], b"first frame, second");
        assert_eq!(br.read(&mut buf).await.unwrap(), large.len());
        assert_eq!(&buf[19..], &large[..]);
        aw.shutdown().await.unwrap();
        assert_eq!(br.read(&mut buf).await.unwrap(), 0);
        assert_eq!(
            aw.write(Bytes::from_static(b"late"))
                .await
                .unwrap_err()
                .kind(),
            io::ErrorKind::BrokenPipe
        );
        // The other direction is its own.
        drop(bw);
        assert_eq!(ar.read(&mut BytesMut::new()).await.unwrap(), 0);
    }

    #[test]
    fn tcp_liveness_sets_keepalive_and_the_user_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let liveness = TcpLiveness {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(6),
        };
        liveness.apply(&s).unwrap();
        let get = |level, name| {
            let mut v: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            use std::os::fd::AsRawFd;
            // SAFETY: a live socket and a c_int-sized out value.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 2);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 2);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 6000);
    }
}

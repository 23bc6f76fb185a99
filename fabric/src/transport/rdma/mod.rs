//! `rdma://host:port`: the fabric over RDMA RC queue pairs (cargo feature
//! `rdma`; DESIGN.md "fabric", issue 8).
//!
//! * [`verbs`] — the narrow [`Verbs`] trait the transport is written against.
//! * [`hw`] — its implementation over libibverbs, for real devices.
//! * [`emu`] — an in-process emulation with the same ordering and completion
//!   semantics (RNR, full send queue), so the transport is tested here.
//! * [`conn`] — the transport itself: [`RdmaReader`]/[`RdmaWriter`], the
//!   [`TransportRead`](super::TransportRead)/[`TransportWrite`](super::TransportWrite)
//!   halves the channel driver runs on, like the stream transports'.
//!
//! Connection setup runs over a TCP side channel on the URL's host:port: each
//! side sends its [`VerbsEndpoint`] (QPN, LID, GID, PSN), its receive ring
//! ([`RemoteBuf`]: address, rkey, length) and its receive depth, moves its
//! queue pair to ready-to-send, and then both confirm with one byte so that
//! neither sends before the other is ready to receive. See `docs/rdma.md`.

pub mod conn;
pub mod emu;
pub mod hw;
pub mod verbs;

pub use conn::{RdmaReader, RdmaWriter};
pub use emu::EmuFabric;
pub use hw::IbDevice;
pub use verbs::{
    Completion, QpConfig, RemoteBuf, SendOp, SendWr, Verbs, VerbsEndpoint, VerbsProvider, WcOpcode,
    WcStatus,
};

use super::FabricUrl;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Errors of the RDMA transport and its verbs.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("no RDMA device found ({0})")]
    NoDevice(String),
    #[error("{verb} failed: {source}")]
    Verb {
        verb: &'static str,
        source: io::Error,
    },
    #[error("send queue full: max_send_wr requests are outstanding")]
    SendQueueFull,
    #[error("receive queue full")]
    RecvQueueFull,
    #[error("queue pair is not connected")]
    NotConnected,
    #[error("queue pair or memory region is gone")]
    Closed,
    #[error("range {offset}+{len} outside a {size}-byte memory region")]
    Bounds {
        offset: usize,
        len: usize,
        size: usize,
    },
    #[error("work request failed: {0:?}")]
    Completion(WcStatus),
    #[error("RDMA setup: {0}")]
    Setup(String),
    #[error("{0} is not an rdma:// URL")]
    NotRdma(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<RdmaError> for io::Error {
    fn from(e: RdmaError) -> io::Error {
        match e {
            RdmaError::Io(e) => e,
            RdmaError::NoDevice(_) => io::Error::new(io::ErrorKind::NotFound, e),
            other => io::Error::other(other),
        }
    }
}

/// Sizes of one RDMA channel end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Pre-registered send buffers (= send queue depth).
    pub send_buffers: u32,
    /// Size of each send buffer: the largest message.
    pub send_buffer_size: u32,
    /// Posted receives (= receive queue depth); each holds one small message.
    pub recv_buffers: u32,
    /// Size of each receive buffer: messages up to this go by SEND.
    pub small: u32,
    /// The receive ring the peer RDMA-WRITEs bulk messages into.
    pub ring_size: u32,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            send_buffers: 32,
            send_buffer_size: 64 * 1024,
            recv_buffers: 64,
            small: 4096,
            ring_size: 1 << 20,
        }
    }
}

/// The setup message each side sends over the TCP side channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    endpoint: VerbsEndpoint,
    ring: RemoteBuf,
    recv_buffers: u32,
    small: u32,
}

const MAGIC: &[u8; 8] = b"SAPSRDM1";
const HELLO_LEN: usize = 8 + 4 + 2 + 16 + 4 + 8 + 4 + 4 + 4 + 4;

impl Hello {
    fn emit(&self) -> [u8; HELLO_LEN] {
        let mut b = Vec::with_capacity(HELLO_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.endpoint.qpn.to_be_bytes());
        b.extend_from_slice(&self.endpoint.lid.to_be_bytes());
        b.extend_from_slice(&self.endpoint.gid);
        b.extend_from_slice(&self.endpoint.psn.to_be_bytes());
        b.extend_from_slice(&self.ring.addr.to_be_bytes());
        b.extend_from_slice(&self.ring.rkey.to_be_bytes());
        b.extend_from_slice(&self.ring.len.to_be_bytes());
        b.extend_from_slice(&self.recv_buffers.to_be_bytes());
        b.extend_from_slice(&self.small.to_be_bytes());
        let mut out = [0; HELLO_LEN];
        out.copy_from_slice(&b);
        out
    }

    fn parse(b: &[u8; HELLO_LEN]) -> Result<Self, RdmaError> {
        if &b[..8] != MAGIC {
            return Err(RdmaError::Setup(
                "the peer is not a SAPS rdma:// endpoint".into(),
            ));
        }
        let mut at = 8;
        let mut take = |n: usize| {
            at += n;
            &b[at - n..at]
        };
        let u32_ = |s: &[u8]| u32::from_be_bytes(s.try_into().unwrap_or_default());
        let qpn = u32_(take(4));
        let lid = u16::from_be_bytes(take(2).try_into().unwrap_or_default());
        let gid = take(16).try_into().unwrap_or_default();
        let psn = u32_(take(4));
        let addr = u64::from_be_bytes(take(8).try_into().unwrap_or_default());
        let ring = RemoteBuf {
            addr,
            rkey: u32_(take(4)),
            len: u32_(take(4)),
        };
        let recv_buffers = u32_(take(4));
        let small = u32_(take(4));
        if recv_buffers < 2 || ring.len == 0 || small < conn::HEADER as u32 {
            return Err(RdmaError::Setup(
                "the peer advertised unusable buffer sizes".into(),
            ));
        }
        Ok(Hello {
            endpoint: VerbsEndpoint { qpn, lid, gid, psn },
            ring,
            recv_buffers,
            small,
        })
    }
}

/// Runs the side-channel exchange on `tcp` and returns the connected halves.
async fn establish<P: VerbsProvider>(
    mut tcp: TcpStream,
    provider: &P,
    config: RdmaConfig,
) -> Result<(RdmaReader<P::Verbs>, RdmaWriter<P::Verbs>), RdmaError> {
    let local = conn::Local::new(provider, config)?;
    let hello = Hello {
        endpoint: local.verbs().endpoint(),
        ring: local.ring(),
        recv_buffers: config.recv_buffers,
        small: config.small,
    };
    tcp.write_all(&hello.emit()).await?;
    let mut b = [0; HELLO_LEN];
    tcp.read_exact(&mut b).await?;
    let peer = Hello::parse(&b)?;
    local.verbs().connect(&peer.endpoint)?;
    // Both queue pairs are ready to receive before either sends.
    tcp.write_all(&[1]).await?;
    tcp.read_exact(&mut [0]).await?;
    Ok(local.start(peer.ring, peer.recv_buffers, peer.small))
}

fn rdma_addr(url: &FabricUrl) -> Result<&str, RdmaError> {
    match url {
        FabricUrl::Rdma(addr) => Ok(addr),
        other => Err(RdmaError::NotRdma(other.to_string())),
    }
}

/// Connects a node to an io-server at `rdma://host:port` on the first RDMA
/// device. Without one: [`RdmaError::NoDevice`] ("no RDMA device found").
pub async fn rdma_connect(
    url: &FabricUrl,
) -> Result<(RdmaReader<hw::IbVerbs>, RdmaWriter<hw::IbVerbs>), RdmaError> {
    rdma_connect_with(url, &IbDevice::first()?, RdmaConfig::default()).await
}

/// [`rdma_connect`] over any verbs provider (the emulation in tests).
pub async fn rdma_connect_with<P: VerbsProvider>(
    url: &FabricUrl,
    provider: &P,
    config: RdmaConfig,
) -> Result<(RdmaReader<P::Verbs>, RdmaWriter<P::Verbs>), RdmaError> {
    let tcp = TcpStream::connect(rdma_addr(url)?).await?;
    tcp.set_nodelay(true)?;
    establish(tcp, provider, config).await
}

/// A listening `rdma://` fabric on the io-server.
pub struct RdmaListener<P: VerbsProvider> {
    tcp: TcpListener,
    provider: P,
    config: RdmaConfig,
}

impl RdmaListener<IbDevice> {
    /// Binds `url` on the first RDMA device; fails at once with
    /// [`RdmaError::NoDevice`] when there is none.
    pub async fn bind(url: &FabricUrl) -> Result<Self, RdmaError> {
        Self::bind_with(url, IbDevice::first()?, RdmaConfig::default()).await
    }
}

impl<P: VerbsProvider> RdmaListener<P> {
    /// Binds `url` over any verbs provider.
    pub async fn bind_with(
        url: &FabricUrl,
        provider: P,
        config: RdmaConfig,
    ) -> Result<Self, RdmaError> {
        let tcp = TcpListener::bind(rdma_addr(url)?).await?;
        Ok(Self {
            tcp,
            provider,
            config,
        })
    }

    /// Accepts one node; returns its transport halves and a printable peer.
    pub async fn accept(
        &self,
    ) -> Result<((RdmaReader<P::Verbs>, RdmaWriter<P::Verbs>), String), RdmaError> {
        let (tcp, peer) = self.tcp.accept().await?;
        tcp.set_nodelay(true)?;
        Ok((
            establish(tcp, &self.provider, self.config).await?,
            format!("rdma://{peer}"),
        ))
    }

    /// The bound address, as a URL.
    pub fn local_url(&self) -> Result<FabricUrl, RdmaError> {
        Ok(FabricUrl::Rdma(self.tcp.local_addr()?.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_message_round_trips_and_rejects_strangers() {
        let h = Hello {
            endpoint: VerbsEndpoint {
                qpn: 0x11,
                lid: 3,
                gid: [7; 16],
                psn: 0x42,
            },
            ring: RemoteBuf {
                addr: 0xdead_beef,
                rkey: 9,
                len: 1 << 20,
            },
            recv_buffers: 64,
            small: 4096,
        };
        assert_eq!(Hello::parse(&h.emit()).unwrap(), h);
        let mut bad = h.emit();
        bad[0] = b'X';
        assert!(matches!(Hello::parse(&bad), Err(RdmaError::Setup(_))));
        let tiny = Hello {
            recv_buffers: 1,
            ..h
        };
        assert!(matches!(
            Hello::parse(&tiny.emit()),
            Err(RdmaError::Setup(_))
        ));
    }
}

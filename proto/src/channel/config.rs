//! The settings of one channel end, and the protocol constants they start
//! from: the versions this build speaks, the default `B_r`, the largest
//! Data payload, the handshake's deadline.

use crate::codec::DEFAULT_MAX_FRAME;
use std::time::Duration;

/// Protocol versions this build speaks. Version 2 adds the node's
/// `Accepted` notification (the io-server re-dispatches a node's
/// connections its program had not accepted when its channel ends) and
/// the tracked hand-off header (`saps_fabric::handoff::side`); a version 1
/// peer gets neither, and its connections are reset with it as before.
/// Version 3 adds the node's [`crate::Frame::Reset`] (a connection the
/// program's socket ended with a reset, which the io-server passes on as
/// an RST); to an older io-server such a close is a plain `Close`.
/// Version 4 adds the io-server's [`crate::Frame::Connecting`] (the local
/// address of an outbound connect still in flight); an older node is not
/// sent it, and answers `getsockname` of such a socket as before.
pub const MIN_VERSION: u8 = 1;
pub const MAX_VERSION: u8 = 4;
/// The first protocol version with [`crate::Frame::Accepted`].
pub const ACCEPTED_VERSION: u8 = 2;
/// The first protocol version with [`crate::Frame::Reset`].
pub const RESET_VERSION: u8 = 3;
/// The first protocol version with [`crate::Frame::Connecting`].
pub const CONNECTING_VERSION: u8 = 4;
/// Default per-connection receive buffer `B_r`. A relayed stream moves at
/// most `B_r` per credit round trip (two relays and the fabric on the way
/// back); one iperf3 stream through a node moved faster with each doubling
/// up to 1 MiB (bench/notes/2026-12-01-sessions-5-to-8.md, "`B_r` 1 MiB
/// instead of 256 KiB"). It is also what a stalled reader may hold in user
/// space per direction; an idle connection holds none of it.
pub const DEFAULT_WINDOW: u32 = 1024 * 1024;
/// Largest payload of one `Data` frame (the decoder's default frame limit,
/// 256 KiB + 64, holds it). A relay reads at most this much per call: a
/// larger read costs the io-server less CPU per GiB
/// (bench/notes/2026-12-01-sessions-5-to-8.md).
pub const MAX_DATA: usize = 256 * 1024;
/// A channel not open this long after it started is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame accepted before the channel is open. The handshake's
/// frames are small (a `Hello` carries at most a node name of
/// [`crate::codec::MAX_STRING`]); an unauthenticated peer may not make the
/// decoder wait for, and buffer, a Data-sized frame.
pub const HANDSHAKE_MAX_FRAME: usize = 4096;
/// Default of [`ChannelConfig::ping_interval`] where liveness is on: an
/// idle channel costs a `Ping` and a `Pong` this often.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(2);
/// Default of [`ChannelConfig::peer_timeout`] where liveness is on: three
/// ping intervals, so one lost or late `Pong` is not fatal, and a peer gone
/// silent is given up within a few seconds more than this.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(6);

/// Which end of the channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An application node (saps-run's supervisor).
    Node,
    /// The io-server.
    IoServer,
}

/// Settings of one channel end.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The shared secret both ends prove.
    pub token: Vec<u8>,
    /// `B_r` this end grants every connection.
    pub window: u32,
    /// Largest frame accepted from the peer.
    pub max_frame: usize,
    pub min_version: u8,
    pub max_version: u8,
    /// Node only: the name and weight it announces.
    pub node_name: String,
    pub weight: u32,
    /// How long the handshake may take ([`HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// Liveness of the open channel (`channel/liveness.rs`): send a `Ping`
    /// when the peer has sent nothing for this long (`None`: never).
    pub ping_interval: Option<Duration>,
    /// ... and close the channel when the peer has sent nothing, `Pong`
    /// included, for this long (`None`: never).
    pub peer_timeout: Option<Duration>,
    /// io-server only: the largest `B_r` a node may announce in its
    /// Hello; a larger one is refused with a `GoAway` saying so (the
    /// io-server may hold that much per connection on the node's behalf).
    pub max_peer_window: u32,
    /// io-server only: the largest weight a node may announce (Hello or
    /// Weight); a larger one is refused with a `GoAway` saying so.
    pub max_weight: u32,
    /// io-server only: while more than this many octets wait to go to the
    /// peer, the driver stops reading the channel (frames that take no
    /// credit, Ping or a request, each queue an answer; a peer that does
    /// not read its answers is not read either).
    pub output_limit: usize,
    /// io-server only: while more than this many of the peer's requests
    /// wait for their answer, the driver stops reading the channel.
    pub max_unanswered: usize,
    /// Both ends are this build in one process (saps-run's embedded
    /// io-server): frames that need no state of a later version
    /// ([`crate::Frame::Reset`], [`crate::Frame::Connecting`]) are spoken whatever version was agreed
    /// (the in-process channel keeps version 1, which has nothing to
    /// re-dispatch). Set on both ends or neither.
    pub in_process: bool,
}

impl ChannelConfig {
    pub fn new(token: impl Into<Vec<u8>>) -> Self {
        Self {
            token: token.into(),
            window: DEFAULT_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            in_process: false,
            node_name: String::new(),
            weight: 1,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            ping_interval: None,
            peer_timeout: None,
            max_peer_window: u32::MAX,
            max_weight: u32::MAX,
            output_limit: usize::MAX,
            max_unanswered: usize::MAX,
        }
    }

    pub fn node(mut self, name: impl Into<String>, weight: u32) -> Self {
        self.node_name = name.into();
        self.weight = weight;
        self
    }

    pub fn window(mut self, window: u32) -> Self {
        self.window = window;
        self
    }

    /// Pings the peer after `interval` of silence and closes the channel
    /// after `timeout` of it.
    pub fn liveness(mut self, interval: Duration, timeout: Duration) -> Self {
        self.ping_interval = Some(interval);
        self.peer_timeout = Some(timeout);
        self
    }
}

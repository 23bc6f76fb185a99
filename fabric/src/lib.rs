//! `saps-fabric`: the async shell of the Forwarding Protocol of SAPS (paper
//! §2.1.1) between the io-server and its application nodes. The protocol
//! itself — frames, codec, Appendix A credits, authentication, the channel
//! state machine — is the sans-IO crate `saps-proto`, re-exported here
//! under the same paths ([`frame`], [`codec`], [`credit`], [`auth`],
//! [`channel`]).
//!
//! * [`transport`] — the byte transports under a channel (unix, tcp,
//!   in-memory, rdma behind the `rdma` feature).
//! * [`driver`] — a channel's reader, writer and timer tasks.
//! * [`endpoint`] — per-connection routing and stream relays over the driver.
//! * [`splice`] — bulk reads relayed kernel to kernel, with no copy.
//! * [`handoff`] — same-host zero-relay hand-off of a client's socket.
//! * [`fdpass`] — many descriptors in batches, for an upgrade in place.

pub use saps_proto::{auth, channel, codec, credit, frame, golden};

pub mod driver;
pub mod endpoint;
pub mod fdpass;
pub mod handoff;
pub mod private;
pub mod splice;
pub mod token;
pub mod transport;

/// How long a listening port outlives the program's last listener on it,
/// on both ends of the fabric: the io-server keeps the port open and its
/// clients queued, and a node keeps the clients it was sent for the closed
/// listener, so a program that closes its listener and makes a new one on
/// the same address (iperf3 does after every test) loses none of them.
pub const RELISTEN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

pub use channel::{CallError, Channel, ChannelConfig, ChannelError, ChannelStats, Event, Role};
pub use endpoint::{ClientRelayEnd, Endpoint, EndpointEvent, RelayOutcome, Replay, PRE_ACCEPT_MAX};
pub use frame::{ConnId, Frame, ReqId, Request, Response, ShutdownHow};

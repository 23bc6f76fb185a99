//! `saps-fabric`: the Forwarding Protocol of SAPS (paper §2.1.1) between the
//! io-server and its application nodes.
//!
//! * [`frame`] — one type per row of Figure 3, plus channel frames.
//! * [`codec`] — the length-prefixed, versioned binary encoding.
//! * [`credit`] — Appendix A flow control, per connection and direction.
//! * [`auth`] — token challenge-response.
//! * [`channel`] — the sans-IO state machine of one node channel.
//! * [`transport`] — the byte transports under it (unix, tcp, in-memory,
//!   rdma behind the `rdma` feature) and the async [`driver`].
//! * [`endpoint`] — per-connection routing and stream relays over the driver.
//! * [`splice`] — bulk reads relayed kernel to kernel, with no copy.

// Unit tests share helpers written against the public API (`saps_fabric::…`).
#[cfg(test)]
extern crate self as saps_fabric;

pub mod auth;
pub mod channel;
pub mod codec;
pub mod credit;
pub mod driver;
pub mod endpoint;
pub mod frame;
pub mod handoff;
pub mod splice;
pub mod transport;

/// How long a listening port outlives the program's last listener on it,
/// on both ends of the fabric: the io-server keeps the port open and its
/// clients queued, and a node keeps the clients it was sent for the closed
/// listener, so a program that closes its listener and makes a new one on
/// the same address (iperf3 does after every test) loses none of them.
pub const RELISTEN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

pub use channel::{CallError, Channel, ChannelConfig, ChannelError, ChannelStats, Event, Role};
pub use endpoint::{
    ClientRelayEnd, Endpoint, EndpointError, EndpointEvent, RelayOutcome, Replay, PRE_ACCEPT_MAX,
};
pub use frame::{ConnId, Frame, ReqId, Request, Response, ShutdownHow};

//! `saps-proto`: the Forwarding Protocol of SAPS (paper §2.1.1) between the
//! io-server and its application nodes, as a core that does no I/O
//! (quinn-proto's rule): it takes bytes and time, returns bytes and
//! deadlines, and never sees a socket. The async shell (transports, the
//! driver, the relays) is `saps-fabric`.
//!
//! * [`frame`] — one type per row of Figure 3, plus channel frames.
//! * [`codec`] — the length-prefixed, versioned binary encoding.
//! * [`credit`] — Appendix A flow control, per connection and direction.
//! * [`cursor`] — the plain encoding of snapshots, and its checked reader.
//! * [`auth`] — token challenge-response.
//! * [`channel`] — the state machine of one node channel.

#![forbid(unsafe_code)]

// Unit tests share helpers written against the public API (`saps_proto::…`).
#[cfg(test)]
extern crate self as saps_proto;

pub mod auth;
pub mod channel;
pub mod codec;
pub mod credit;
pub mod cursor;
pub mod frame;
#[doc(hidden)]
pub mod golden;

pub use channel::{
    CallError, Channel, ChannelConfig, ChannelError, ChannelSnap, ChannelStats, Event, Role,
    SnapError,
};
pub use frame::{ConnId, Frame, ReqId, Request, Response, ShutdownHow};

//! Liveness of an open channel: a peer that has sent nothing for
//! [`ChannelConfig::ping_interval`] is sent a `Ping`, and one that has
//! sent nothing, its `Pong` included, for [`ChannelConfig::peer_timeout`]
//! is given up. Hearing is counted in octets of input, so the channel
//! needs no clock on its input path: each [`Liveness::on_timeout`] sees
//! whether the count moved since the last one.

use super::config::ChannelConfig;
use super::snapshot::{age, at};
use std::time::{Duration, Instant};

/// How the reason of a channel closed for its peer's silence begins
/// (the timeout follows), for a caller that counts such closes.
pub const SILENT_PEER: &str = "the peer sent nothing within";

/// What the clock asks of the channel.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    Nothing,
    Ping,
    /// The peer is silent past the timeout.
    Dead,
}

/// A [`Liveness`] as plain data: its instant as an age (nanoseconds
/// before the snapshot's `now`), so that it is made again on another
/// clock, or after a pause, as that long before the restore's `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LivenessSnap {
    pub(super) interval: Duration,
    pub(super) timeout: Duration,
    pub(super) heard_age: Option<i64>,
    pub(super) heard: u64,
    pub(super) pinged: bool,
}

#[derive(Debug)]
pub(super) struct Liveness {
    interval: Duration,
    timeout: Duration,
    /// When the input count was last seen to move (`None` until the
    /// channel's clock starts).
    heard_at: Option<Instant>,
    /// The input count then.
    heard: u64,
    /// A `Ping` went out since `heard_at`.
    pinged: bool,
}

impl Liveness {
    /// The liveness `config` asks for, if any. An interval not shorter
    /// than the timeout is halved down to half of it, so a ping always
    /// has time to be answered.
    pub(super) fn new(config: &ChannelConfig) -> Option<Self> {
        let timeout = config.peer_timeout?;
        let interval = config.ping_interval.unwrap_or(timeout).min(timeout / 2);
        Some(Self {
            interval,
            timeout,
            heard_at: None,
            heard: 0,
            pinged: false,
        })
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The channel's clock starts at `now`.
    pub(super) fn start(&mut self, now: Instant) {
        self.heard_at = Some(now);
    }

    /// When [`Liveness::on_timeout`] is next due.
    pub(super) fn due(&self) -> Option<Instant> {
        let at = self.heard_at?;
        Some(
            at + if self.pinged {
                self.timeout
            } else {
                self.interval
            },
        )
    }

    /// The time is `now` and `input` octets have come in so far.
    pub(super) fn on_timeout(&mut self, now: Instant, input: u64) -> Due {
        let Some(at) = self.heard_at else {
            return Due::Nothing;
        };
        if input != self.heard {
            self.heard = input;
            self.heard_at = Some(now);
            self.pinged = false;
            return Due::Nothing;
        }
        if now >= at + self.timeout {
            Due::Dead
        } else if !self.pinged && now >= at + self.interval {
            self.pinged = true;
            Due::Ping
        } else {
            Due::Nothing
        }
    }

    pub(super) fn snapshot(&self, now: Instant) -> LivenessSnap {
        LivenessSnap {
            interval: self.interval,
            timeout: self.timeout,
            heard_age: self.heard_at.map(|then| age(now, then)),
            heard: self.heard,
            pinged: self.pinged,
        }
    }

    /// The liveness [`Liveness::snapshot`] gave, its instant made again
    /// from `now`; `None` when that is out of the clock's range.
    pub(super) fn restore(snap: &LivenessSnap, now: Instant) -> Option<Self> {
        let heard_at = match snap.heard_age {
            Some(a) => Some(at(now, a)?),
            None => None,
        };
        Some(Self {
            interval: snap.interval,
            timeout: snap.timeout,
            heard_at,
            heard: snap.heard,
            pinged: snap.pinged,
        })
    }
}

#[cfg(test)]
mod tests;

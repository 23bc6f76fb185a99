//! Idle and half-closed timeouts of the io-server's relayed client
//! connections (haproxy's `timeout client` and `timeout client-fin`),
//! sans-IO: a [`Quiet`] per connection remembers how many octets it had
//! moved at the last sweep and since when that number has not changed.
//! Nothing is stamped per read or write: the relay's byte counters,
//! which it keeps anyway, are compared once per sweep (as the kernel's
//! keepalive timer looks at a socket once per interval), so a timeout
//! fires between its limit and its limit plus one sweep interval after
//! the last octet.

use super::router::Route;
use super::{errno, Endpoint};
use crate::frame::ConnId;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a relayed client connection may move no octet; `None`: for
/// ever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuietLimits {
    /// Neither direction moved an octet for this long: closed.
    pub idle: Option<Duration>,
    /// After the node's Fin (the io-server shut the client's write side),
    /// the client neither sent an octet nor closed for this long: closed.
    /// A FIN_WAIT2-like bound.
    pub half_closed: Option<Duration>,
}

impl QuietLimits {
    /// Whether any limit is set (else there is nothing to sweep).
    pub fn any(&self) -> bool {
        self.idle.is_some() || self.half_closed.is_some()
    }
}

/// Why a connection was closed for its silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// `--client-idle-timeout`.
    Idle,
    /// `--half-closed-timeout`.
    HalfClosed,
}

/// What the sweeps know of one connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Quiet {
    /// Octets moved (both directions) at the last sweep that saw a change.
    moved: u64,
    /// Whether it was half-closed then.
    half_closed: bool,
    /// When that sweep ran (or the relay began).
    since: Instant,
}

/// A relay's [`Quiet`] as plain data, its instant as an age
/// ([`crate::endpoint::RelaySnap::quiet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietSnap {
    /// Octets moved (both directions) at the last sweep that saw a change.
    pub moved: u64,
    /// Whether it was half-closed then.
    pub half_closed: bool,
    /// How long before the capture that sweep ran (or the relay began).
    pub age: Duration,
}

impl QuietSnap {
    /// The [`Quiet`] it was taken of, its age counted back from `now`.
    pub(super) fn restore(&self, now: Instant) -> Quiet {
        Quiet {
            moved: self.moved,
            half_closed: self.half_closed,
            since: now.checked_sub(self.age).unwrap_or(now),
        }
    }
}

impl Quiet {
    pub(super) fn snapshot(&self, now: Instant) -> QuietSnap {
        QuietSnap {
            moved: self.moved,
            half_closed: self.half_closed,
            age: now.saturating_duration_since(self.since),
        }
    }

    pub(super) fn new(now: Instant) -> Quiet {
        Quiet {
            moved: 0,
            half_closed: false,
            since: now,
        }
    }

    /// A sweep at `now` sees `moved` octets moved so far and whether the
    /// node's Fin went to the client: the limit the connection is past,
    /// if any. Becoming half-closed counts as activity (the Fin moved).
    pub(super) fn sweep(
        &mut self,
        now: Instant,
        moved: u64,
        half_closed: bool,
        limits: &QuietLimits,
    ) -> Option<Expiry> {
        if moved != self.moved || half_closed != self.half_closed {
            *self = Quiet {
                moved,
                half_closed,
                since: now,
            };
            return None;
        }
        let (limit, why) = match half_closed {
            true => (limits.half_closed.or(limits.idle), Expiry::HalfClosed),
            false => (limits.idle, Expiry::Idle),
        };
        let limit = limit?;
        (now.saturating_duration_since(self.since) >= limit).then_some(why)
    }
}

impl Endpoint {
    /// io-server: one sweep of the client connections relayed here
    /// ([`Endpoint::relay_client`]) at `now`: each that moved no octet
    /// for longer than `limits` allow is aborted with `ETIMEDOUT` (its
    /// client gets a reset, the node a close with that errno) and
    /// returned with why. One pass over the route table under its lock;
    /// the relays themselves stamp nothing (`quiet.rs`).
    ///
    /// Nothing while the endpoint is frozen ([`Endpoint::freeze`]): its
    /// relays are not to end then (an abortive end sets `SO_LINGER` on a
    /// socket that may be moving to another endpoint).
    pub fn sweep_quiet(&self, now: Instant, limits: &QuietLimits) -> Vec<(ConnId, Expiry)> {
        let mut expired = Vec::new();
        if self.handle().phase() != crate::driver::Phase::Running {
            return expired;
        }
        let mut router = self.router();
        for (&conn, route) in router.conns.iter_mut() {
            let Route::Relayed(attached, counters) = route else {
                continue;
            };
            let Some(quiet) = attached.quiet.as_mut() else {
                continue;
            };
            let moved = counters.bytes_in.load(Ordering::Relaxed)
                + counters.bytes_out.load(Ordering::Relaxed);
            let half = counters.fin_written.load(Ordering::Relaxed);
            if let Some(why) = quiet.sweep(now, moved, half, limits) {
                if let Some(abort) = attached.abort.take() {
                    let _ = abort.send(errno::ETIMEDOUT);
                    expired.push((conn, why));
                }
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests;

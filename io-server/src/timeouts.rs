//! The io-server's timeouts on relayed client connections (haproxy's
//! `timeout client` and `timeout client-fin`: `--client-idle-timeout`,
//! `--half-closed-timeout`) and on its outbound connects (`timeout
//! connect`: `--connect-timeout`), what they closed, and the
//! housekeeping tick that drives them with the other coarse timers: one
//! task, waking at most once a second, sweeps each node's relayed
//! clients for silence (`Endpoint::sweep_quiet`; no timer per
//! connection, nothing stamped per byte), ramps the weights of nodes in
//! their slow start (`slowstart.rs`) and sums up the log lines the rate
//! limiter held back (`ratelimit.rs`).

use crate::config::Config;
use crate::dispatch;
use crate::state::ServerState;
use saps_fabric::endpoint::{Expiry, QuietLimits};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections closed by each timeout, for `io-server status`.
#[derive(Debug, Default)]
pub(crate) struct TimedOut {
    pub idle: AtomicU64,
    pub half_closed: AtomicU64,
    pub connect: AtomicU64,
}

/// The limits of `--client-idle-timeout` and `--half-closed-timeout`
/// (0: none).
pub(crate) fn quiet_limits(c: &Config) -> QuietLimits {
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    QuietLimits {
        idle: secs(c.client_idle_timeout),
        half_closed: secs(c.half_closed_timeout),
    }
}

/// How often the housekeeping tick runs: a quarter of the shortest
/// timeout, so one fires at most a quarter late, between 100 ms and 1 s.
pub(crate) fn tick_interval(limits: &QuietLimits) -> Duration {
    let shortest = [limits.idle, limits.half_closed]
        .into_iter()
        .flatten()
        .min();
    shortest.map_or(Duration::from_secs(1), |d| {
        (d / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    })
}

/// `--connect-timeout` (`None`: the kernel's own, about two minutes).
pub(crate) fn connect_timeout(c: &Config) -> Option<Duration> {
    (c.connect_timeout > 0).then(|| Duration::from_secs(c.connect_timeout))
}

/// The housekeeping tick, for the io-server's life.
pub(crate) async fn housekeeping(server: Arc<ServerState>) {
    let limits = quiet_limits(&server.config);
    let mut tick = tokio::time::interval(tick_interval(&limits));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let (nodes, raised) = {
            let mut st = server.lock();
            let raised = st.groups.ramp(now).then(|| st.groups.keys());
            let nodes: Vec<_> = match limits.any() {
                true => st.nodes.iter().map(|(&id, n)| (id, n.ep.clone())).collect(),
                false => Vec::new(),
            };
            (nodes, raised)
        };
        // A node's share went up: clients waiting for an eligible member
        // may go.
        for key in raised.into_iter().flatten() {
            dispatch::drain_queue(&server, key);
        }
        for (node, ep) in nodes {
            for (conn, why) in ep.sweep_quiet(now, &limits) {
                record(&server, node, conn, why);
            }
        }
        server.logs.flush();
    }
}

/// Counts and logs (rate-limited) one connection closed for its silence.
fn record(server: &ServerState, node: u32, conn: u64, why: Expiry) {
    let t = &server.timed_out;
    let (counter, reason, secs) = match why {
        Expiry::Idle => (
            &t.idle,
            "client connection closed: idle timeout",
            server.config.client_idle_timeout,
        ),
        Expiry::HalfClosed => (
            &t.half_closed,
            "client connection closed: half-closed timeout",
            server.config.half_closed_timeout,
        ),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Some(more) = server.logs.allow(reason) {
        tracing::info!(node, conn, secs, "{reason}{more}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_a_quarter_of_the_shortest_timeout_within_bounds() {
        let ms = Duration::from_millis;
        let l = |idle: u64, half: u64| QuietLimits {
            idle: (idle > 0).then(|| ms(idle)),
            half_closed: (half > 0).then(|| ms(half)),
        };
        assert_eq!(tick_interval(&l(0, 0)), ms(1000));
        assert_eq!(tick_interval(&l(900_000, 60_000)), ms(1000));
        assert_eq!(tick_interval(&l(900_000, 2000)), ms(500));
        assert_eq!(tick_interval(&l(200, 0)), ms(100));
    }
}

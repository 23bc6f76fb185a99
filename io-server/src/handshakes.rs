//! Bounds before authentication (issue 24): how many fabric connections
//! may be in their handshake at once, overall and per source (a TCP
//! peer's address; a unix peer's process), and the counters of what was
//! refused, given up or dropped. A connection beyond a bound is closed at
//! once, its reason logged; one admitted holds a [`Permit`] until its
//! handshake ends, however it ends (the channel's own deadline,
//! `--handshake-timeout`, closes it otherwise).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Handshakes in flight and what was refused or dropped.
pub(crate) struct Handshakes {
    max: usize,
    per_source: usize,
    in_flight: Mutex<InFlight>,
    /// Connections closed at once, beyond a bound.
    pub refused: AtomicU64,
    /// Handshakes that failed: timed out, wrong token, garbage.
    pub failed: AtomicU64,
    /// Open node channels closed because the node went silent.
    pub silent_nodes: AtomicU64,
}

#[derive(Default)]
struct InFlight {
    total: usize,
    by_source: HashMap<String, usize>,
}

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Overall(usize),
    PerSource(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Overall(n) => write!(f, "{n} handshakes in flight (--max-handshakes)"),
            Refusal::PerSource(n) => write!(
                f,
                "{n} handshakes in flight from this source (--max-handshakes-per-source)"
            ),
        }
    }
}

/// One handshake's place; given back when dropped.
pub(crate) struct Permit {
    owner: Arc<Handshakes>,
    source: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut f = self.owner.lock();
        f.total -= 1;
        if let Some(n) = f.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                f.by_source.remove(&self.source);
            }
        }
    }
}

impl Handshakes {
    pub fn new(max: usize, per_source: usize) -> Handshakes {
        Handshakes {
            max,
            per_source,
            in_flight: Mutex::default(),
            refused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            silent_nodes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a handshake from `source`, or why there is none (the
    /// refusal is counted).
    pub fn admit(self: &Arc<Self>, source: &str) -> Result<Permit, Refusal> {
        let mut f = self.lock();
        let from_source = f.by_source.get(source).copied().unwrap_or(0);
        let refusal = if f.total >= self.max {
            Some(Refusal::Overall(f.total))
        } else if from_source >= self.per_source {
            Some(Refusal::PerSource(from_source))
        } else {
            None
        };
        if let Some(r) = refusal {
            drop(f);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(r);
        }
        f.total += 1;
        *f.by_source.entry(source.to_string()).or_default() += 1;
        drop(f);
        Ok(Permit {
            owner: self.clone(),
            source: source.to_string(),
        })
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().total
    }
}

/// The source a fabric peer's handshakes are counted under: a TCP peer's
/// address without its port, a unix peer's process (or the socket when
/// its process is unknown).
pub(crate) fn source(peer: &str, pid: Option<i32>) -> String {
    if let Some(pid) = pid {
        return format!("pid {pid}");
    }
    match peer.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_overall_and_per_source_and_given_back() {
        let h = Arc::new(Handshakes::new(3, 2));
        let a1 = h.admit("10.0.0.1").unwrap();
        let _a2 = h.admit("10.0.0.1").unwrap();
        assert_eq!(h.admit("10.0.0.1").err(), Some(Refusal::PerSource(2)));
        let _b1 = h.admit("10.0.0.2").unwrap();
        assert_eq!(h.admit("10.0.0.3").err(), Some(Refusal::Overall(3)));
        assert_eq!(h.refused.load(Ordering::Relaxed), 2);
        drop(a1);
        assert_eq!(h.in_flight(), 2);
        assert!(h.admit("10.0.0.1").is_ok());
        assert_eq!(
            Refusal::PerSource(8).to_string(),
            "8 handshakes in flight from this source (--max-handshakes-per-source)"
        );
    }

    #[test]
    fn a_tcp_source_is_its_address_without_the_port() {
        assert_eq!(source("192.0.2.1:4000", None), "192.0.2.1");
        assert_eq!(source("[::1]:4000", None), "::1");
        assert_eq!(source("unix:/run/saps.sock", Some(7)), "pid 7");
        assert_eq!(source("unix:/run/saps.sock", None), "unix:/run/saps.sock");
    }
}

//! Schedulers of a listener group: which member gets the next accepted
//! client connection (DESIGN.md "Schedulers").
//!
//! Pure code, no sockets: a scheduler sees one [`Candidate`] per member and
//! the client's address, and answers an index. Weight 0 means draining: a
//! member with weight 0 is never picked, its open connections just finish.
//!
//! * [`rr`] — round robin (the SAPS paper);
//! * [`wrr`] — weighted round robin (LVS);
//! * [`lc`], [`wlc`] — (weighted) least connections (LVS);
//! * [`mwlc`] — least bytes still to deliver per weight (CSSNS paper, eq. 2);
//! * [`sh`] — source-address hashing, for persistence.

pub mod lc;
pub mod mwlc;
pub mod rr;
pub mod sh;
pub mod wlc;
pub mod wrr;

use crate::config::SchedulerKind;
use std::net::IpAddr;

/// What a scheduler knows about one group member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Stable identity of the member (node and listener), for sticky schedulers.
    pub key: u64,
    pub weight: u32,
    /// Live connections.
    pub active: u64,
    /// `C_i`: bytes still to deliver on its live connections.
    pub pending: u64,
}

/// Picks a member for each new connection.
pub trait Scheduler: Send {
    /// Index into `members` of the chosen one; `None` when every member
    /// has weight 0 (or there are none).
    fn pick(&mut self, members: &[Candidate], client: IpAddr) -> Option<usize>;

    /// Whether it looks at [`Candidate::pending`]; computing it walks each
    /// member's live connections, so only a scheduler that uses it pays
    /// for it (the others see 0).
    fn needs_pending(&self) -> bool {
        false
    }

    /// What it remembers between picks, for an upgrade to carry over
    /// (`upgrade/state.rs`): a restored scheduler picks as this one would.
    fn state(&self) -> SchedState;

    /// Takes up `state` as its own; a state of another kind of scheduler
    /// is refused (given back) and nothing changes.
    fn restore(&mut self, state: SchedState) -> Result<(), SchedState>;
}

/// A scheduler's memory between picks ([`Scheduler::state`]), as the
/// upgrade's state carries it. Part of the state format: a change here
/// bumps `upgrade::state::STATE_VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub enum SchedState {
    /// Keeps nothing: `lc`, `wlc`, `mwlc`, `sh` decide from the candidates
    /// alone.
    None,
    /// `rr`: the index the next turn starts from.
    Rr { next: u64 },
    /// `wrr`: each member's credit, by [`Candidate::key`], in key order.
    Wrr { credit: Vec<(u64, i64)> },
}

/// [`Scheduler::restore`] of a scheduler that keeps nothing.
pub(crate) fn restore_none(state: SchedState) -> Result<(), SchedState> {
    match state {
        SchedState::None => Ok(()),
        other => Err(other),
    }
}

/// The scheduler named by `kind`.
pub fn new(kind: SchedulerKind) -> Box<dyn Scheduler> {
    match kind {
        SchedulerKind::Rr => Box::<rr::RoundRobin>::default(),
        SchedulerKind::Wrr => Box::<wrr::WeightedRoundRobin>::default(),
        SchedulerKind::Lc => Box::new(lc::LeastConnection),
        SchedulerKind::Wlc => Box::new(wlc::WeightedLeastConnection),
        SchedulerKind::Mwlc => Box::new(mwlc::ModifiedWeightedLeastConnection),
        SchedulerKind::Sh => Box::new(sh::SourceHash),
    }
}

/// The eligible member minimising `cost(a) / a.weight`, compared exactly by
/// cross-multiplication; the first such member wins ties. Shared by the
/// least-connection family.
pub(crate) fn least_per_weight(
    members: &[Candidate],
    cost: impl Fn(&Candidate) -> u64,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, m) in members.iter().enumerate().filter(|(_, m)| m.weight > 0) {
        best = match best {
            Some(b) => {
                let o = &members[b];
                // cost(m)/w(m) < cost(o)/w(o)
                let lhs = u128::from(cost(m)) * u128::from(o.weight);
                let rhs = u128::from(cost(o)) * u128::from(m.weight);
                Some(if lhs < rhs { i } else { b })
            }
            None => Some(i),
        };
    }
    best
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn member(key: u64, weight: u32, active: u64, pending: u64) -> Candidate {
        Candidate {
            key,
            weight,
            active,
            pending,
        }
    }

    pub const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    /// Picks `n` times with fixed loads; counts per member.
    pub fn tally(s: &mut dyn Scheduler, members: &[Candidate], n: usize) -> Vec<usize> {
        let mut counts = vec![0; members.len()];
        for _ in 0..n {
            counts[s.pick(members, CLIENT).expect("a member")] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn only_mwlc_needs_bytes_in_flight() {
        for kind in SchedulerKind::value_variants() {
            let needs = new(*kind).needs_pending();
            assert_eq!(needs, *kind == SchedulerKind::Mwlc, "{kind:?}");
        }
    }

    #[test]
    fn only_rr_and_wrr_keep_state_and_each_refuses_another_kinds() {
        for kind in SchedulerKind::value_variants() {
            let state = new(*kind).state();
            let keeps = state != SchedState::None;
            let stateful = matches!(kind, SchedulerKind::Rr | SchedulerKind::Wrr);
            assert_eq!(keeps, stateful, "{kind:?}");
            let mut fresh = new(*kind);
            assert_eq!(fresh.restore(state), Ok(()), "{kind:?}");
            let other = match kind {
                SchedulerKind::Rr => SchedState::Wrr { credit: Vec::new() },
                _ if keeps => SchedState::None,
                _ => SchedState::Rr { next: 0 },
            };
            assert_eq!(fresh.restore(other.clone()), Err(other), "{kind:?}");
        }
    }
}

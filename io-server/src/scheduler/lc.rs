//! Least connection (LVS `lc`): the member with the fewest live
//! connections; weights only matter as 0 (draining).

use super::{least_per_weight, restore_none, Candidate, SchedState, Scheduler};
use std::net::IpAddr;

#[derive(Debug, Default)]
pub struct LeastConnection;

impl Scheduler for LeastConnection {
    fn pick(&mut self, members: &[Candidate], _client: IpAddr) -> Option<usize> {
        // Equal weights make `least_per_weight` a plain minimum.
        let unweighted: Vec<Candidate> = members
            .iter()
            .map(|m| Candidate {
                weight: m.weight.min(1),
                ..*m
            })
            .collect();
        least_per_weight(&unweighted, |m| m.active)
    }

    fn state(&self) -> SchedState {
        SchedState::None
    }

    fn restore(&mut self, state: SchedState) -> Result<(), SchedState> {
        restore_none(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::testing::*;

    #[test]
    fn lc_picks_the_fewest_live_connections_ignoring_weight() {
        let mut s = LeastConnection;
        let members = [member(1, 9, 5, 0), member(2, 1, 2, 0), member(3, 1, 3, 0)];
        assert_eq!(s.pick(&members, CLIENT), Some(1));
        let drained = [member(1, 1, 5, 0), member(2, 0, 0, 0)];
        assert_eq!(s.pick(&drained, CLIENT), Some(0));
    }
}

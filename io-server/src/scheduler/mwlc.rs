//! Modified weighted least connection (CSSNS paper §3.2, Fig. 2, eq. 2):
//! pick node `j` with minimal `C_j / W_j`, where `C_i` is the bytes still
//! to deliver on member `i`'s live connections (client data not yet
//! consumed by the node plus node data not yet written to the client).
//! Ties (e.g. every `C_i` = 0 on an idle cluster) fall back to `wlc`.

use super::{least_per_weight, restore_none, Candidate, SchedState, Scheduler};
use std::net::IpAddr;

#[derive(Debug, Default)]
pub struct ModifiedWeightedLeastConnection;

impl Scheduler for ModifiedWeightedLeastConnection {
    fn pick(&mut self, members: &[Candidate], _client: IpAddr) -> Option<usize> {
        let best = least_per_weight(members, |m| m.pending)?;
        let b = &members[best];
        // Members tied with the best on C/W compete on active/W.
        let tied: Vec<Candidate> = members
            .iter()
            .map(|m| {
                let tie = u128::from(m.pending) * u128::from(b.weight)
                    == u128::from(b.pending) * u128::from(m.weight);
                Candidate {
                    weight: if tie { m.weight } else { 0 },
                    ..*m
                }
            })
            .collect();
        least_per_weight(&tied, |m| m.active)
    }

    fn needs_pending(&self) -> bool {
        true
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
    fn mwlc_minimises_bytes_to_deliver_per_weight() {
        let mut s = ModifiedWeightedLeastConnection;
        // 1000/1 > 2000/3: the heavier-weighted node takes it despite more bytes.
        let members = [member(1, 1, 1, 1000), member(2, 3, 9, 2000)];
        assert_eq!(s.pick(&members, CLIENT), Some(1));
        // Equal bytes: fewer connections per weight wins.
        let members = [member(1, 1, 4, 0), member(2, 1, 1, 0)];
        assert_eq!(s.pick(&members, CLIENT), Some(1));
        let drained = [member(1, 0, 0, 0), member(2, 1, 9, 1 << 30)];
        assert_eq!(s.pick(&drained, CLIENT), Some(1));
    }
}

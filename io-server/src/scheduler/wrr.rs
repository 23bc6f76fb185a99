//! Weighted round robin (LVS `wrr`), in the smooth form: each pick adds
//! every member's weight to its credit, takes the member with the most
//! credit and charges it the total weight. Over any `sum(W)` picks member
//! `i` gets exactly `W_i` of them, interleaved rather than in bursts.

use super::{Candidate, SchedState, Scheduler};
use std::collections::HashMap;
use std::net::IpAddr;

/// The largest credit [`Scheduler::restore`] takes: far beyond the sum of
/// the weights of any group, far below where `pick` would overflow.
const MAX_CREDIT: u64 = 1 << 61;

#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    /// Current credit per member key.
    credit: HashMap<u64, i64>,
}

impl Scheduler for WeightedRoundRobin {
    fn pick(&mut self, members: &[Candidate], _client: IpAddr) -> Option<usize> {
        // Forget members that left the group.
        self.credit
            .retain(|k, _| members.iter().any(|m| m.key == *k));
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, m) in members.iter().enumerate().filter(|(_, m)| m.weight > 0) {
            let w = i64::from(m.weight);
            total += w;
            let c = self.credit.entry(m.key).or_insert(0);
            *c += w;
            if best.is_none_or(|(_, b)| *c > b) {
                best = Some((i, *c));
            }
        }
        let (i, _) = best?;
        *self.credit.get_mut(&members[i].key)? -= total;
        Some(i)
    }

    fn state(&self) -> SchedState {
        let mut credit: Vec<(u64, i64)> = self.credit.iter().map(|(&k, &c)| (k, c)).collect();
        credit.sort_unstable();
        SchedState::Wrr { credit }
    }

    /// Refused: a key twice, or a credit no run of picks reaches (each
    /// stays within the sum of the weights, and `pick` adds to it).
    fn restore(&mut self, state: SchedState) -> Result<(), SchedState> {
        let SchedState::Wrr { credit } = &state else {
            return Err(state);
        };
        let map: HashMap<u64, i64> = credit.iter().copied().collect();
        if map.len() != credit.len() || credit.iter().any(|(_, c)| c.unsigned_abs() > MAX_CREDIT) {
            return Err(state);
        }
        self.credit = map;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::testing::*;

    #[test]
    fn wrr_three_to_one_gives_750_of_1000() {
        let mut s = WeightedRoundRobin::default();
        let members = [member(1, 3, 0, 0), member(2, 1, 0, 0)];
        assert_eq!(tally(&mut s, &members, 1000), [750, 250]);
    }

    #[test]
    fn wrr_interleaves_and_follows_weight_changes() {
        let mut s = WeightedRoundRobin::default();
        let members = [member(1, 2, 0, 0), member(2, 1, 0, 0)];
        let picks: Vec<_> = (0..6).map(|_| s.pick(&members, CLIENT).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 0, 1, 0]);
        let drained = [member(1, 0, 0, 0), member(2, 1, 0, 0)];
        assert_eq!(tally(&mut s, &drained, 5), [0, 5]);
    }

    #[test]
    fn wrr_restored_from_its_state_picks_the_same_sequence() {
        let members = [member(1, 5, 0, 0), member(2, 2, 0, 0), member(3, 1, 0, 0)];
        let mut s = WeightedRoundRobin::default();
        tally(&mut s, &members, 3);
        let mut copy = WeightedRoundRobin::default();
        copy.restore(s.state()).unwrap();
        let picks = |s: &mut WeightedRoundRobin| -> Vec<_> {
            (0..16).map(|_| s.pick(&members, CLIENT)).collect()
        };
        assert_eq!(picks(&mut s), picks(&mut copy));
        let twice = SchedState::Wrr {
            credit: vec![(1, 0), (1, 1)],
        };
        assert_eq!(copy.restore(twice.clone()), Err(twice));
        let huge = SchedState::Wrr {
            credit: vec![(1, i64::MIN)],
        };
        assert_eq!(copy.restore(huge.clone()), Err(huge));
        assert_eq!(copy.restore(SchedState::None), Err(SchedState::None));
        assert_eq!(copy.state(), s.state(), "a refused state changes nothing");
    }
}

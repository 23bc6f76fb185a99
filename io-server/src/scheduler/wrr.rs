//! Weighted round robin (LVS `wrr`), in the smooth form: each pick adds
//! every member's weight to its credit, takes the member with the most
//! credit and charges it the total weight. Over any `sum(W)` picks member
//! `i` gets exactly `W_i` of them, interleaved rather than in bursts.

use super::{Candidate, Scheduler};
use std::collections::HashMap;
use std::net::IpAddr;

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
}

//! Round robin (SAPS paper): members in turn, skipping weight 0.

use super::{Candidate, Scheduler};
use std::net::IpAddr;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Scheduler for RoundRobin {
    fn pick(&mut self, members: &[Candidate], _client: IpAddr) -> Option<usize> {
        let n = members.len();
        let i = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| members[i].weight > 0)?;
        self.next = i + 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::testing::*;

    #[test]
    fn rr_alternates_exactly_and_skips_weight_zero() {
        let mut s = RoundRobin::default();
        let two = [member(1, 1, 0, 0), member(2, 5, 0, 0)];
        let picks: Vec<_> = (0..6).map(|_| s.pick(&two, CLIENT).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
        let drained = [member(1, 0, 0, 0), member(2, 1, 0, 0)];
        assert_eq!(tally(&mut s, &drained, 10), [0, 10]);
        assert_eq!(s.pick(&[member(1, 0, 0, 0)], CLIENT), None);
        assert_eq!(s.pick(&[], CLIENT), None);
    }
}

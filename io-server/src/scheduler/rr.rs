//! Round robin (SAPS paper): members in turn, skipping weight 0.

use super::{Candidate, SchedState, Scheduler};
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

    fn state(&self) -> SchedState {
        SchedState::Rr {
            next: self.next as u64,
        }
    }

    /// A `next` past any member count a group reaches is refused: `pick`
    /// adds to it.
    fn restore(&mut self, state: SchedState) -> Result<(), SchedState> {
        match state {
            SchedState::Rr { next } if next <= u64::from(u32::MAX) => {
                self.next = next as usize;
                Ok(())
            }
            other => Err(other),
        }
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

    #[test]
    fn rr_restored_from_its_state_takes_the_same_turns() {
        let three = [member(1, 1, 0, 0), member(2, 1, 0, 0), member(3, 1, 0, 0)];
        let mut s = RoundRobin::default();
        s.pick(&three, CLIENT);
        let mut copy = RoundRobin::default();
        copy.restore(s.state()).unwrap();
        let turns =
            |s: &mut RoundRobin| -> Vec<_> { (0..7).map(|_| s.pick(&three, CLIENT)).collect() };
        assert_eq!(turns(&mut copy), turns(&mut s));
        let wrong = SchedState::Wrr { credit: Vec::new() };
        assert_eq!(copy.restore(wrong.clone()), Err(wrong));
        let huge = SchedState::Rr { next: u64::MAX };
        assert_eq!(copy.restore(huge.clone()), Err(huge));
        assert_eq!(copy.state(), s.state(), "a refused state changes nothing");
    }
}

//! Weighted least connection (LVS `wlc`): minimal `active_i / W_i`.

use super::{least_per_weight, restore_none, Candidate, SchedState, Scheduler};
use std::net::IpAddr;

#[derive(Debug, Default)]
pub struct WeightedLeastConnection;

impl Scheduler for WeightedLeastConnection {
    fn pick(&mut self, members: &[Candidate], _client: IpAddr) -> Option<usize> {
        least_per_weight(members, |m| m.active)
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
    fn wlc_divides_live_connections_by_weight() {
        let mut s = WeightedLeastConnection;
        // 5/3 < 2/1
        let members = [member(1, 3, 5, 0), member(2, 1, 2, 0)];
        assert_eq!(s.pick(&members, CLIENT), Some(0));
        // 7/3 > 2/1
        let members = [member(1, 3, 7, 0), member(2, 1, 2, 0)];
        assert_eq!(s.pick(&members, CLIENT), Some(1));
        assert_eq!(s.pick(&[member(1, 0, 0, 0)], CLIENT), None);
    }
}

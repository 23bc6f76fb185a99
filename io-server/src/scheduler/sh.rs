//! Source hashing (LVS `sh`), for persistence: the client's IP address
//! decides the member. Rendezvous hashing (highest `hash(ip, member)`)
//! keeps every client on its member while membership is unchanged and moves
//! only the clients of a member that leaves or drains. Weights other than 0
//! do not bias it.

use super::{restore_none, Candidate, SchedState, Scheduler};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;

#[derive(Debug, Default)]
pub struct SourceHash;

fn score(client: IpAddr, key: u64) -> u64 {
    // `DefaultHasher::new()` has fixed keys: stable across io-server restarts
    // of the same build.
    let mut h = DefaultHasher::new();
    (client, key).hash(&mut h);
    h.finish()
}

impl Scheduler for SourceHash {
    fn pick(&mut self, members: &[Candidate], client: IpAddr) -> Option<usize> {
        members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.weight > 0)
            .max_by_key(|(_, m)| score(client, m.key))
            .map(|(i, _)| i)
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
    use std::net::Ipv4Addr;

    #[test]
    fn sh_keeps_each_client_on_one_member_and_spreads_clients() {
        let mut s = SourceHash;
        let members = [member(1, 1, 0, 0), member(2, 1, 0, 0)];
        let mut per_member = [0; 2];
        for c in 0..200u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, c));
            let first = s.pick(&members, ip).unwrap();
            let busy = [member(1, 1, 50, 9), member(2, 1, 0, 0)];
            for _ in 0..5 {
                assert_eq!(
                    s.pick(&busy, ip),
                    Some(first),
                    "load does not move a client"
                );
            }
            per_member[first] += 1;
        }
        assert!(per_member.iter().all(|&n| n > 50), "{per_member:?}");
        let drained = [member(1, 0, 0, 0), member(2, 1, 0, 0)];
        assert_eq!(s.pick(&drained, CLIENT), Some(1));
    }
}

//! [`Groups`] as an upgrade carries it (`upgrade/state.rs`): every field
//! of the groups, their schedulers, queues, ramps and ledger, with
//! instants as ages and queued clients' sockets as descriptor indices.

use super::{Bound, Group, Groups, Left, Limits};
use crate::config::SchedulerKind;
use crate::scheduler;
use crate::slowstart::Ramp;
use crate::traffic::{Ledger, MemberId};
use crate::upgrade::state::{
    age, since, BindSnap, Capture, GroupSnap, GroupsSnap, LeftSnap, LimitsSnap, QueuedClient,
    QueuedSnap, RampSnap, Source, StateError,
};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn invalid(what: String) -> StateError {
    StateError::Invalid(format!("listener groups: {what}"))
}

/// `pairs` as a map; a key twice is refused.
fn unique<K: Ord + std::fmt::Debug, V>(
    what: &str,
    pairs: impl IntoIterator<Item = (K, V)>,
) -> Result<BTreeMap<K, V>, StateError> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if map.contains_key(&k) {
            return Err(invalid(format!("{what} {k:?} twice")));
        }
        map.insert(k, v);
    }
    Ok(map)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl<C: QueuedClient> Groups<C> {
    /// Everything, as at `now`; the queued clients' sockets and replays go
    /// into `into`.
    pub fn snapshot<'a>(&'a self, now: Instant, into: &mut Capture<'a>) -> GroupsSnap {
        let limits = self.limits;
        GroupsSnap {
            scheduler: self.kind,
            limits: LimitsSnap {
                per_node: limits.per_node as u64,
                per_group: limits.per_group as u64,
                max_queue: limits.max_queue as u64,
                queue_timeout_ns: nanos(limits.queue_timeout),
            },
            slow_start_ns: nanos(self.slow_start),
            weights: self.weights.iter().map(|(&n, &w)| (n, w)).collect(),
            ramps: (self.ramps.iter())
                .map(|(&node, &(ramp, weight))| RampSnap {
                    node,
                    age_ns: age(now, ramp.since()),
                    weight,
                })
                .collect(),
            groups: (self.map.iter())
                .map(|(&key, g)| g.snapshot(key, now, into))
                .collect(),
            ledger: self.ledger.snapshot(),
            orphanings: self.orphanings,
            left: (self.left.iter())
                .map(|l| LeftSnap {
                    key: l.key,
                    node: l.node,
                    flags: l.flags,
                    age_ns: age(now, l.at),
                })
                .collect(),
        }
    }

    /// The groups `snap` was taken of, at `now`: each scheduler takes up
    /// its state, each queued client its socket from `from`. A state that
    /// does not fit (a scheduler's state of another kind, a key twice, an
    /// age older than the clock) is refused.
    pub fn restore(snap: GroupsSnap, from: &mut Source, now: Instant) -> Result<Self, StateError> {
        let kind = snap.scheduler;
        let limits = Limits {
            per_node: to_usize(snap.limits.per_node),
            per_group: to_usize(snap.limits.per_group),
            max_queue: to_usize(snap.limits.max_queue),
            queue_timeout: Duration::from_nanos(snap.limits.queue_timeout_ns),
        };
        let mut ramps = BTreeMap::new();
        for r in snap.ramps {
            let ramp = (Ramp::new(since(now, r.age_ns)?), r.weight);
            if ramps.insert(r.node, ramp).is_some() {
                return Err(invalid(format!("node {} ramps twice", r.node)));
            }
        }
        let mut map = BTreeMap::new();
        for g in snap.groups {
            let key = g.key;
            if map
                .insert(key, Group::restore(g, kind, from, now)?)
                .is_some()
            {
                return Err(invalid(format!("group {key} twice")));
            }
        }
        let left = snap.left.into_iter().map(|l| {
            Ok(Left {
                key: l.key,
                node: l.node,
                flags: l.flags,
                at: since(now, l.age_ns)?,
            })
        });
        Ok(Groups {
            kind,
            limits,
            map,
            weights: unique("the weight of node", snap.weights)?,
            slow_start: Duration::from_nanos(snap.slow_start_ns),
            ramps,
            ledger: Ledger::restore(snap.ledger)?,
            orphanings: snap.orphanings,
            left: left.collect::<Result<VecDeque<Left>, StateError>>()?,
            hold: false,
        })
    }
}

impl<C: QueuedClient> Group<C> {
    fn snapshot<'a>(&'a self, key: SocketAddr, now: Instant, into: &mut Capture<'a>) -> GroupSnap {
        GroupSnap {
            key,
            binds: (self.binds.iter())
                .map(|b| BindSnap {
                    node: b.node,
                    conn: b.conn,
                    flags: b.flags,
                })
                .collect(),
            members: self.members.iter().map(|&m| m.into()).collect(),
            backlogs: self.backlogs.iter().map(|(&m, &b)| (m.into(), b)).collect(),
            scheduler: self.scheduler.state(),
            queue: (self.queue.iter())
                .map(|(client, at)| QueuedSnap {
                    client: client.capture(into),
                    age_ns: age(now, *at),
                })
                .collect(),
            expiring: self.expiring,
            queued_total: self.queued_total,
            timed_out: self.timed_out,
            paused: self.paused,
            pauses: self.pauses,
            redispatched: self.redispatched,
            listening: self.listening,
            orphaned: self.orphaned,
        }
    }

    fn restore(
        g: GroupSnap,
        kind: SchedulerKind,
        from: &mut Source,
        now: Instant,
    ) -> Result<Group<C>, StateError> {
        let key = g.key;
        let mut sched = scheduler::new(kind);
        if let Err(state) = sched.restore(g.scheduler) {
            let kind = kind.name();
            return Err(invalid(format!(
                "group {key}: {state:?} is no {kind} state"
            )));
        }
        let members: Vec<MemberId> = g.members.iter().map(|&m| m.into()).collect();
        unique(
            &format!("group {key}: member"),
            members.iter().map(|&m| (m, ())),
        )?;
        let backlogs = (g.backlogs.into_iter()).map(|(m, b)| (MemberId::from(m), b));
        let mut queue = VecDeque::with_capacity(g.queue.len());
        for q in &g.queue {
            queue.push_back((C::rebuild(&q.client, from)?, since(now, q.age_ns)?));
        }
        Ok(Group {
            binds: (g.binds.into_iter())
                .map(|b| Bound {
                    node: b.node,
                    conn: b.conn,
                    flags: b.flags,
                })
                .collect(),
            members,
            backlogs: unique(&format!("group {key}: the backlog of"), backlogs)?,
            scheduler: sched,
            queue,
            expiring: g.expiring,
            queued_total: g.queued_total,
            timed_out: g.timed_out,
            paused: g.paused,
            pauses: g.pauses,
            redispatched: g.redispatched,
            listening: g.listening,
            orphaned: g.orphaned,
        })
    }
}

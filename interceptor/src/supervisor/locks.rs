//! The supervisor's locks, and the one order in which they may nest.
//!
//! Every piece of the supervisor's shared state has one owner behind a
//! [`Ranked`] mutex with a [`Rank`]; the owners' methods release their lock
//! before calling anything that may take another, so in practice locks do
//! not nest, and the order below is the guard against a change that would. A thread may take a lock while holding others
//! only if its rank is higher than every rank it holds: the order of the
//! enum below. Two threads can then never wait on each other, whatever the
//! handlers do. In debug builds (every test) each thread keeps the ranks it
//! holds and taking a lock out of order panics at once, naming both locks,
//! so a new nesting that could deadlock fails the first test that runs it
//! instead of hanging in production. Release builds check nothing.
//!
//! Guards are never held across an `.await` (clippy's `await_holding_lock`
//! is denied for the workspace), so a thread's ranks are the task's.

use std::sync::{Mutex, MutexGuard};

/// The supervisor's locks, in the order they may be taken while another
/// is held: a lock may only be taken under locks listed before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rank {
    /// The listener table (`listeners.rs`): every listener, its ready
    /// queue and the connections waiting for an accept or a listener.
    /// Its methods take no other lock.
    Listeners,
    /// The virtual-socket table.
    Table,
    /// Connects in flight.
    Connecting,
    /// `bind`/`listen` calls in flight (restarted calls).
    Ops,
    /// The placeholders' source and watch (`placeholders.rs`).
    Placeholders,
    /// Cached pidfds.
    Pidfds,
    /// The channel to the io-server (cloned out, never held long).
    Endpoint,
    /// The descriptors held back for the supervisor's own calls.
    Reserve,
    /// The node's own loopback sockets (`loopback.rs`).
    Loopback,
}

/// A mutex that may only be taken in [`Rank`] order.
#[derive(Debug)]
pub(crate) struct Ranked<T> {
    rank: Rank,
    inner: Mutex<T>,
}

impl<T> Ranked<T> {
    pub(crate) fn new(rank: Rank, value: T) -> Self {
        Ranked {
            rank,
            inner: Mutex::new(value),
        }
    }

    /// Takes the lock (a poisoned one is taken anyway: the state is kept
    /// consistent by each method, not by unwinding).
    pub(crate) fn lock(&self) -> Guard<'_, T> {
        let held = order::enter(self.rank);
        Guard {
            guard: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            _held: held,
        }
    }
}

impl<T: Default> Ranked<T> {
    pub(crate) fn default_with(rank: Rank) -> Self {
        Ranked::new(rank, T::default())
    }
}

/// A held [`Ranked`] lock.
pub(crate) struct Guard<'a, T> {
    guard: MutexGuard<'a, T>,
    _held: order::Held,
}

impl<T> std::ops::Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(debug_assertions)]
mod order {
    use super::Rank;
    use std::cell::RefCell;

    thread_local! {
        static HELD: RefCell<Vec<Rank>> = const { RefCell::new(Vec::new()) };
    }

    /// Checks that `rank` may be taken now and records it until the
    /// returned [`Held`] goes.
    pub(super) fn enter(rank: Rank) -> Held {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(&top) = h.iter().max() {
                assert!(
                    top < rank,
                    "supervisor lock order broken: {rank:?} taken while holding {top:?} \
                     (see interceptor/src/supervisor/locks.rs)"
                );
            }
            h.push(rank);
        });
        Held(rank)
    }

    /// Forgets the rank when the guard goes.
    pub(super) struct Held(Rank);

    impl Drop for Held {
        fn drop(&mut self) {
            HELD.with(|h| {
                let mut h = h.borrow_mut();
                if let Some(i) = h.iter().rposition(|&r| r == self.0) {
                    h.remove(i);
                }
            });
        }
    }
}

#[cfg(not(debug_assertions))]
mod order {
    use super::Rank;

    pub(super) fn enter(_: Rank) -> Held {
        Held
    }

    pub(super) struct Held;
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn locks_nest_in_rank_order() {
        let a = Ranked::new(Rank::Listeners, 1);
        let b = Ranked::new(Rank::Table, 2);
        let ga = a.lock();
        let gb = b.lock();
        assert_eq!(*ga + *gb, 3);
        drop(gb);
        drop(ga);
        // Released: the same lock is free to take again, in any order.
        let gb = b.lock();
        drop(gb);
        let ga = a.lock();
        drop(ga);
    }

    #[test]
    fn every_lock_may_be_taken_under_all_those_before_it() {
        use Rank::*;
        let order = [
            Listeners,
            Table,
            Connecting,
            Ops,
            Placeholders,
            Pidfds,
            Endpoint,
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]));
        let locks: Vec<Ranked<()>> = order.iter().map(|&r| Ranked::new(r, ())).collect();
        let guards: Vec<Guard<'_, ()>> = locks.iter().map(Ranked::lock).collect();
        assert_eq!(guards.len(), order.len());
    }

    #[test]
    #[should_panic(expected = "lock order broken: Listeners taken while holding Table")]
    fn a_lock_taken_out_of_order_panics() {
        let a = Ranked::new(Rank::Listeners, ());
        let b = Ranked::new(Rank::Table, ());
        let _gb = b.lock();
        let _ga = a.lock();
    }

    #[test]
    #[should_panic(expected = "Table taken while holding Table")]
    fn a_lock_taken_twice_panics_instead_of_deadlocking() {
        let b = Ranked::new(Rank::Table, ());
        let _g1 = b.lock();
        let _g2 = b.lock();
    }
}

//! `io-server upgrade` (issue 19): the old process freezes, hands its
//! descriptors and its state to a new one, which resumes where it stopped
//! (design note `bench/notes/2026-12-03-upgrade-design.md`).
//!
//! Built so far: [`state`], the state's format and its capture and
//! rebuild for what lives in memory without a task (the listener groups,
//! their schedulers, queues, ramps and ledger; the server's counters; the
//! listening sockets), and [`handover`], the transfer between the two
//! processes over the control socket. Nodes' channels and relays do not
//! move yet: an upgrade with a node joined is refused.

pub mod handover;
pub mod state;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_groups;

//! pidfds of the target's threads, kept for their next calls: taking a
//! duplicate of a call's fd argument (`pidfd_getfd`) needs one, and opening
//! it for every call would cost a syscall each.

use super::locks::{Rank, Ranked};
use crate::fds;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// pidfds kept at most (one per thread of the target seen); beyond, the
/// cache starts again.
const MAX_PIDFDS: usize = 4096;

/// The cache of pidfds, by thread id.
pub(crate) struct PidfdCache {
    by_tid: Ranked<HashMap<u32, Arc<OwnedFd>>>,
}

impl PidfdCache {
    pub(crate) fn new() -> Self {
        PidfdCache {
            by_tid: Ranked::default_with(Rank::Pidfds),
        }
    }

    /// A pidfd of thread `tid`, kept for the next calls of that thread.
    fn get(&self, tid: u32) -> std::io::Result<Arc<OwnedFd>> {
        let cached = self.by_tid.lock().get(&tid).cloned();
        if let Some(p) = cached {
            return Ok(p);
        }
        let p = Arc::new(fds::open_pidfd(tid)?);
        let mut cache = self.by_tid.lock();
        if cache.len() >= MAX_PIDFDS {
            cache.clear();
        }
        cache.insert(tid, p.clone());
        Ok(p)
    }

    /// Runs `f` with a cached pidfd of `tid`; a stale one (the thread died
    /// and its id was reused) is replaced once.
    pub(crate) fn with<T>(
        &self,
        tid: u32,
        f: impl Fn(BorrowedFd<'_>) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        match f(self.get(tid)?.as_fd()) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                self.by_tid.lock().remove(&tid);
                f(self.get(tid)?.as_fd())
            }
            r => r,
        }
    }
}

//! A count of connections not accepted yet (issue 24, admission): the
//! io-server keeps one per listener group member, so that the program's
//! `listen` backlog bounds what a node holds unaccepted, as the kernel's
//! accept queue bounds a listener. A connection takes a place when it is
//! given to the member and gives it back when its program accepts it (or
//! it ends first); giving one back wakes whoever waits for room
//! (`freed`), once, however many come back at the same moment.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// One member's count of connections given and not yet accepted, shared
/// by everything that holds a place in it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Waiting {
    count: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl Waiting {
    /// An empty count; `freed` is notified each time a place is given back.
    pub fn new(freed: Arc<Notify>) -> Waiting {
        Waiting {
            count: Arc::default(),
            freed,
        }
    }

    /// How many places are taken now.
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Takes a place, given back when the [`Place`] is dropped.
    pub fn take(&self) -> Place {
        self.count.fetch_add(1, Ordering::AcqRel);
        Place(self.clone())
    }
}

/// One taken place of a [`Waiting`] count; dropping it gives it back.
#[derive(Debug)]
pub struct Place(Waiting);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_place_is_given_back_once_and_wakes_the_waiter() {
        let freed = Arc::new(Notify::new());
        let w = Waiting::new(freed.clone());
        let a = w.take();
        let b = w.take();
        assert_eq!(w.get(), 2);
        drop(a);
        assert_eq!(w.get(), 1);
        drop(b);
        assert_eq!(w.get(), 0);
        // One permit is stored for a waiter that comes later, not two.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            freed.notified().await;
            let again =
                tokio::time::timeout(std::time::Duration::from_millis(20), freed.notified());
            assert!(again.await.is_err(), "wake-ups coalesce");
        });
    }
}

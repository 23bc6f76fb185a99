//! A few descriptors the supervisor holds back for its own calls
//! (docs/interceptor.md, "Out of descriptors"). Each trapped call on a
//! virtual socket takes a duplicate of the program's descriptor for a
//! moment (`pidfd_getfd`); if the connections waiting for the program had
//! taken every descriptor saps-run may have, that duplicate would fail
//! and the call could not be served. So [`RESERVED`] descriptors are kept
//! open (duplicates of one `/dev/null`), which socket pairs cannot take
//! (they run short first, `arrival.rs`); a call that finds no descriptor
//! gives one back and tries again ([`Reserve::release_one`]), and the
//! reserve is filled again once descriptors free up ([`Reserve::refill`]).

use super::locks::{Rank, Ranked};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptors held back.
pub(crate) const RESERVED: usize = 8;

pub(crate) struct Reserve {
    fds: Ranked<Vec<OwnedFd>>,
    /// How many `fds` holds (read without the lock).
    held: AtomicUsize,
}

impl Reserve {
    /// Opens the reserve; empty if `/dev/null` cannot be opened.
    pub(crate) fn new() -> Reserve {
        let r = Reserve {
            fds: Ranked::new(Rank::Reserve, Vec::new()),
            held: AtomicUsize::new(0),
        };
        if let Ok(f) = std::fs::File::open("/dev/null") {
            let mut fds = r.fds.lock();
            fds.push(OwnedFd::from(f));
            r.held.store(1, Ordering::Release);
            drop(fds);
            r.refill();
        }
        r
    }

    /// Gives one held descriptor back; false when none is left.
    pub(crate) fn release_one(&self) -> bool {
        let mut fds = self.fds.lock();
        // The first is the one the others are duplicates of.
        if fds.len() < 2 {
            return false;
        }
        drop(fds.pop());
        self.held.store(fds.len(), Ordering::Release);
        true
    }

    /// Takes back what was given, as far as descriptors allow; one atomic
    /// load when the reserve is full.
    pub(crate) fn refill(&self) {
        if self.held.load(Ordering::Acquire) >= RESERVED {
            return;
        }
        let mut fds = self.fds.lock();
        while fds.len() < RESERVED {
            match fds.first().map(OwnedFd::try_clone) {
                Some(Ok(fd)) => fds.push(fd),
                _ => break,
            }
        }
        self.held.store(fds.len(), Ordering::Release);
    }

    /// Descriptors held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// Runs `f`, which makes a descriptor; out of descriptors (`EMFILE`,
/// `ENFILE`) it gives one of the reserve back and tries again, at most
/// [`RESERVED`] times.
pub(crate) fn with_room<T>(
    reserve: &Reserve,
    mut f: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    for _ in 0..RESERVED {
        match f() {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                if !reserve.release_one() {
                    return Err(e);
                }
            }
            r => return r,
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_out_of_descriptors_takes_one_of_the_reserve_and_refill_restores_it() {
        let r = Reserve::new();
        assert_eq!(r.held(), RESERVED);
        let mut tries = 0;
        let got = with_room(&r, || {
            tries += 1;
            match tries {
                1 => Err(std::io::Error::from_raw_os_error(libc::EMFILE)),
                _ => Ok(tries),
            }
        });
        assert_eq!(got.unwrap(), 2, "tried again after giving one back");
        assert_eq!(r.held(), RESERVED - 1);
        r.refill();
        assert_eq!(r.held(), RESERVED);
        // Other errors are the call's own.
        let e = with_room(&r, || {
            Err::<(), _>(std::io::Error::from_raw_os_error(libc::EBADF))
        });
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(r.held(), RESERVED);
    }
}

//! A bounded hand-over from the stack's thread to its users: what the
//! thread delivers (an accepted connection, a connect's outcome) waits in
//! a queue of fixed capacity, and an eventfd in semaphore mode counts it,
//! so the user's side has a file descriptor that polls readable exactly
//! while something waits (for an `AsyncFd` in the io-server).

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A bounded queue with a readiness fd; `wake` (the stack's own eventfd)
/// is signalled when a user takes something out, so the thread can refill
/// what the taking freed (a listening socket of the backlog pool).
pub(crate) struct Mailbox<T> {
    queue: Mutex<VecDeque<T>>,
    capacity: AtomicUsize,
    ready: EventFd,
    wake: Arc<Wake>,
    /// The user side is gone ([`Mailbox::close`]).
    closed: AtomicBool,
}

impl<T> Mailbox<T> {
    pub fn new(capacity: usize, wake: Arc<Wake>) -> std::io::Result<Mailbox<T>> {
        let flags = EfdFlags::EFD_SEMAPHORE | EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
        Ok(Mailbox {
            queue: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: AtomicUsize::new(capacity),
            ready: EventFd::from_value_and_flags(0, flags)?,
            wake,
            closed: AtomicBool::new(false),
        })
    }

    /// Lets up to `capacity` wait from now on (it only grows).
    pub fn grow(&self, capacity: usize) {
        self.capacity.fetch_max(capacity, Ordering::AcqRel);
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Delivers `item`, or gives it back when full.
    pub fn push(&self, item: T) -> Result<(), T> {
        {
            let mut q = self.lock();
            if q.len() >= self.capacity.load(Ordering::Acquire) {
                return Err(item);
            }
            q.push_back(item);
        }
        // Counted after it is queued: a reader that sees the count finds it.
        let _ = self.ready.write(1);
        Ok(())
    }

    /// The oldest item, if one waits (without blocking).
    pub fn pop(&self) -> Option<T> {
        // EFD_SEMAPHORE: one read takes one; EAGAIN when none waits.
        self.ready.read().ok()?;
        let item = self.lock().pop_front();
        self.wake.wake();
        item
    }

    /// The user is done with it: the thread is woken to clean up at once
    /// (a port closed is free for the next `listen` at once, as with the
    /// kernel).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Everything still waiting (when the owner goes away).
    pub fn drain(&self) -> Vec<T> {
        let items: Vec<T> = self.lock().drain(..).collect();
        for _ in &items {
            let _ = self.ready.read();
        }
        items
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T> AsFd for Mailbox<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }
}

/// How users wake the stack's thread: an eventfd for its `poll(2)`, and a
/// flag it can test between two frames without a system call, so that
/// whatever a user asked before a frame arrived (an `accept` that frees a
/// place in the backlog, a `listen`) is done before that frame is
/// processed, as in the kernel.
pub(crate) struct Wake {
    fd: EventFd,
    asked: AtomicBool,
}

impl Wake {
    pub fn new() -> std::io::Result<Wake> {
        let flags = EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
        Ok(Wake {
            fd: EventFd::from_value_and_flags(0, flags)?,
            asked: AtomicBool::new(false),
        })
    }

    /// Called by a user after it queued a command or took something out.
    pub fn wake(&self) {
        self.asked.store(true, Ordering::SeqCst);
        let _ = self.fd.write(1);
    }

    /// Whether a user asked something since the last call (the thread's
    /// side).
    pub fn take(&self) -> bool {
        self.asked.swap(false, Ordering::SeqCst)
    }

    /// Resets the eventfd once `poll(2)` found it readable.
    pub fn drain(&self) {
        let _ = self.fd.read();
    }
}

impl AsFd for Wake {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

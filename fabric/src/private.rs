//! Unix sockets that never exist with a wider mode than 0600: they are
//! bound under a umask of [`PRIVATE_UMASK`] ([`bind_private`]), so the
//! kernel creates the socket file with mode 0600 (a `chmod` after the
//! bind would leave a window in which any user may connect).

use std::sync::Mutex;

/// The umask sockets are bound under: rw for the owner only.
pub const PRIVATE_UMASK: u32 = 0o177;

/// The umask is the process's: one change at a time.
static UMASK: Mutex<()> = Mutex::new(());

/// Runs `bind` (which creates a unix socket file) under the umask
/// [`PRIVATE_UMASK`], then restores the process's umask. Another thread
/// creating a file meanwhile gets at most a narrower mode, never a wider.
pub fn bind_private<T>(bind: impl FnOnce() -> T) -> T {
    let _one = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    let old = set_umask(PRIVATE_UMASK);
    let r = bind();
    set_umask(old);
    r
}

/// Sets the process's umask; the old one.
fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask(2) only swaps the process's file creation mask; it
    // cannot fail and touches no memory of ours.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sockets_are_bound_under_a_private_umask_and_the_umask_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let before = set_umask(0);
        let (during, listener) = bind_private(|| {
            let during = set_umask(PRIVATE_UMASK);
            (
                during,
                std::os::unix::net::UnixListener::bind(&path).unwrap(),
            )
        });
        let after = set_umask(before);
        assert_eq!(during, 0o177, "bound under umask 0177");
        assert_eq!(after, 0, "the process's umask is restored");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o600,
            "created 0600 with no chmod, under a umask of 0"
        );
        drop(listener);
    }
}

//! Reading and writing the target's memory with `process_vm_readv/writev`
//! (DESIGN.md "Virtual TCP sockets": syscall arguments such as `sockaddr`s
//! and option values live in the target).
//!
//! A NULL, unmapped or partially mapped range is a [`Fault`], which the
//! supervisor answers with `EFAULT`, never a panic.
//!
//! **TOCTOU**: the pid of a notification may die and be reused while the
//! supervisor reads. After reading, the caller must check
//! `Notifier::id_valid(id)`; only if it still holds do the bytes belong to the
//! process that made the syscall.

use std::io::{IoSlice, IoSliceMut};

use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

/// The most one call transfers; larger ranges are refused as a [`Fault`]
/// rather than allocated (syscall arguments are small).
pub const MAX_TRANSFER: usize = 1 << 20;

/// A range of the target's memory that could not be accessed in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot access {len} bytes at {addr:#x} in the target")]
pub struct Fault {
    pub addr: u64,
    pub len: usize,
}

/// Access to one process's memory.
#[derive(Clone, Copy, Debug)]
pub struct TargetMemory {
    pid: Pid,
}

impl TargetMemory {
    /// For the process (thread) `pid`, e.g. `Notification::pid`.
    pub fn new(pid: u32) -> Self {
        TargetMemory {
            pid: Pid::from_raw(pid as i32),
        }
    }

    /// The remote range, if it is plausible at all.
    fn remote(addr: u64, len: usize) -> Result<RemoteIoVec, Fault> {
        let fault = Fault { addr, len };
        if addr == 0 || len > MAX_TRANSFER || addr.checked_add(len as u64).is_none() {
            return Err(fault);
        }
        Ok(RemoteIoVec {
            base: usize::try_from(addr).map_err(|_| fault)?,
            len,
        })
    }

    /// Reads exactly `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, Fault> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let remote = Self::remote(addr, len)?;
        let mut buf = vec![0u8; len];
        match process_vm_readv(self.pid, &mut [IoSliceMut::new(&mut buf)], &[remote]) {
            Ok(n) if n == len => Ok(buf),
            _ => Err(Fault { addr, len }),
        }
    }

    /// Writes all of `bytes` at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), Fault> {
        if bytes.is_empty() {
            return Ok(());
        }
        let remote = Self::remote(addr, bytes.len())?;
        match process_vm_writev(self.pid, &[IoSlice::new(bytes)], &[remote]) {
            Ok(n) if n == bytes.len() => Ok(()),
            _ => Err(Fault {
                addr,
                len: bytes.len(),
            }),
        }
    }

    /// Writes each `(addr, bytes)` in turn with one system call (an
    /// address and its length, say); a fault in any is a [`Fault`] for
    /// the first part not written in full.
    pub fn write_parts(&self, parts: &[(u64, &[u8])]) -> Result<(), Fault> {
        let parts: Vec<(u64, &[u8])> = parts.iter().copied().filter(|p| !p.1.is_empty()).collect();
        let remote = parts
            .iter()
            .map(|&(addr, b)| Self::remote(addr, b.len()))
            .collect::<Result<Vec<_>, _>>()?;
        let local: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p.1)).collect();
        let total: usize = parts.iter().map(|p| p.1.len()).sum();
        let written = process_vm_writev(self.pid, &local, &remote).unwrap_or_default();
        if written == total {
            return Ok(());
        }
        let mut at = 0;
        for &(addr, b) in &parts {
            if written < at + b.len() {
                return Err(Fault { addr, len: b.len() });
            }
            at += b.len();
        }
        Ok(())
    }

    /// Reads a native-endian `u32` (a `socklen_t`, an `int` option value).
    pub fn read_u32(&self, addr: u64) -> Result<u32, Fault> {
        let bytes = self.read(addr, 4)?;
        Ok(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Writes a native-endian `u32`.
    pub fn write_u32(&self, addr: u64, value: u32) -> Result<(), Fault> {
        self.write(addr, &value.to_ne_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The supervisor may read its own memory: process_vm_* on our own pid.
    fn me() -> TargetMemory {
        TargetMemory::new(std::process::id())
    }

    #[test]
    fn reads_and_writes_own_memory() {
        let mut word = 0x1122_3344u32;
        let addr = &mut word as *mut u32 as u64;
        assert_eq!(me().read_u32(addr), Ok(0x1122_3344));
        me().write_u32(addr, 7).unwrap();
        assert_eq!(std::hint::black_box(&word), &7);
    }

    #[test]
    fn parts_are_written_in_one_call_and_a_bad_one_is_named() {
        let (mut a, mut b) = ([0u8; 4], [0u8; 2]);
        let (pa, pb) = (a.as_mut_ptr() as u64, b.as_mut_ptr() as u64);
        me().write_parts(&[(pa, &[1, 2, 3, 4]), (pb, &[5, 6])])
            .unwrap();
        assert_eq!(std::hint::black_box(&a), &[1, 2, 3, 4]);
        assert_eq!(std::hint::black_box(&b), &[5, 6]);
        let e = me().write_parts(&[(pa, &[9]), (8, &[1, 2])]).unwrap_err();
        assert_eq!(e, Fault { addr: 8, len: 2 });
        assert!(
            me().write_parts(&[(0, &[])]).is_ok(),
            "empty parts are skipped"
        );
    }

    #[test]
    fn null_huge_and_wrapping_ranges_are_faults() {
        assert_eq!(me().read(0, 16), Err(Fault { addr: 0, len: 16 }));
        assert_eq!(me().read(1, 16), Err(Fault { addr: 1, len: 16 }));
        assert!(me().read(0x1000, MAX_TRANSFER + 1).is_err());
        assert!(me().read(u64::MAX - 4, 16).is_err());
        assert!(me().write(8, b"x").is_err());
        assert_eq!(me().read(0, 0), Ok(Vec::new()));
    }
}

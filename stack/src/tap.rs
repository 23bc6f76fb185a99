//! The TAP device as smoltcp's `phy::Device`: Ethernet frames read from
//! and written to the TAP's file descriptor, one reused buffer each way.
//! Unlike smoltcp's own `TunTapInterface` it never panics on an I/O error
//! (a frame that cannot be written is dropped and counted, like a NIC's
//! drop) and it can take a TAP opened elsewhere (`--tap-fd`).

use crate::sys;
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Frames and drops on the TAP, for [`crate::Stats`].
#[derive(Debug, Default, Clone, Copy)]
pub struct TapCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames not written (the TAP's queue full, or its link down).
    pub tx_drops: u64,
    /// A drop was logged; re-armed by the next frame written.
    #[doc(hidden)]
    pub dropping: bool,
}

/// An open TAP device.
pub struct Tap {
    fd: OwnedFd,
    mtu: usize,
    rx: Vec<u8>,
    rx_len: usize,
    /// `rx` holds a frame read by [`Tap::fetch`] and not yet received.
    fetched: bool,
    tx: Vec<u8>,
    pub counters: TapCounters,
}

impl Tap {
    /// Wraps an open TAP (made non-blocking); `mtu`: the IP MTU.
    pub fn new(fd: OwnedFd, mtu: usize) -> Result<Tap, sys::Errno> {
        sys::set_nonblocking(fd.as_fd())?;
        let frame = mtu + 14;
        Ok(Tap {
            fd,
            mtu: frame,
            rx: vec![0; frame],
            rx_len: 0,
            fetched: false,
            tx: vec![0; frame],
            counters: TapCounters::default(),
        })
    }
}

impl Tap {
    /// Reads the next frame ahead, for the next `receive`; false when none
    /// waits.
    pub fn fetch(&mut self) -> bool {
        if !self.fetched {
            let Ok(n) = sys::read(self.fd.as_fd(), &mut self.rx) else {
                return false;
            };
            self.rx_len = n;
            self.fetched = true;
            self.counters.rx_frames += 1;
        }
        true
    }
}

impl Tap {
    /// The frame [`Tap::fetch`] read ahead, if any, before smoltcp takes
    /// it (the engine routes it to a shard by its addresses).
    pub fn peek(&self) -> Option<&[u8]> {
        self.fetched.then(|| &self.rx[..self.rx_len])
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

pub struct RxToken<'a>(&'a [u8]);

pub struct TxToken<'a> {
    fd: BorrowedFd<'a>,
    buf: &'a mut Vec<u8>,
    counters: &'a mut TapCounters,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let r = f(&mut self.buf[..len]);
        match sys::write_frame(self.fd, &self.buf[..len]) {
            Ok(_) => {
                self.counters.tx_frames += 1;
                self.counters.dropping = false;
            }
            Err(e) => {
                self.counters.tx_drops += 1;
                if !self.counters.dropping {
                    self.counters.dropping = true;
                    let error = std::io::Error::from_raw_os_error(e);
                    tracing::warn!(%error, "frames dropped: the TAP's link is down or its queue full");
                }
            }
        }
        r
    }
}

impl Device for Tap {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.max_transmission_unit = self.mtu;
        caps.medium = Medium::Ethernet;
        caps
    }

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if !self.fetch() {
            return None;
        }
        self.fetched = false;
        let tx = TxToken {
            fd: self.fd.as_fd(),
            buf: &mut self.tx,
            counters: &mut self.counters,
        };
        Some((RxToken(&self.rx[..self.rx_len]), tx))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            fd: self.fd.as_fd(),
            buf: &mut self.tx,
            counters: &mut self.counters,
        })
    }
}

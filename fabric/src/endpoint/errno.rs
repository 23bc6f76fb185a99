//! The Linux errno values a relay reports, and the errno of a local I/O
//! error: the fabric carries Linux errnos (Figure 3's `errno` fields).

use std::io;

pub const EIO: i32 = 5;
pub const EPIPE: i32 = 32;
pub const ECONNABORTED: i32 = 103;
pub const ECONNRESET: i32 = 104;
pub const ENOTCONN: i32 = 107;
pub const ETIMEDOUT: i32 = 110;
pub const ECONNREFUSED: i32 = 111;

/// The errno to report for a local I/O error.
pub fn io_errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::BrokenPipe => EPIPE,
        io::ErrorKind::ConnectionReset => ECONNRESET,
        io::ErrorKind::ConnectionAborted => ECONNABORTED,
        io::ErrorKind::NotConnected => ENOTCONN,
        io::ErrorKind::TimedOut => ETIMEDOUT,
        io::ErrorKind::ConnectionRefused => ECONNREFUSED,
        _ => EIO,
    })
}

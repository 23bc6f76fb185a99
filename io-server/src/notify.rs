//! systemd's readiness protocol (`sd_notify(3)`), as `Type=notify` units
//! expect it: one datagram of `KEY=VALUE` lines per state change, sent to
//! the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the
//! abstract namespace). The io-server says `READY=1` once its listeners
//! and control socket are bound, `RELOADING=1` with `MONOTONIC_USEC=`
//! while it reloads, `STOPPING=1` when it shuts down, `STATUS=` lines
//! for `systemctl status`, and `WATCHDOG=1` every half `$WATCHDOG_USEC`.
//! `MAINPID=` is for an upgrade's new process to name itself.
//!
//! The socket is made when the notifier is, before the sandbox confines
//! the io-server; sending is a `sendto` on it, which the allow-list has.
//! It is non-blocking: a full queue on systemd's side loses that message
//! (logged) rather than stalling the io-server.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// One line of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// `READY=1`: startup, or a reload, is complete.
    Ready,
    /// `RELOADING=1` and `MONOTONIC_USEC=` (systemd ≥ 253 requires the
    /// clock with it): a reload has started; `Ready` ends it.
    Reloading,
    /// `STOPPING=1`: shutting down.
    Stopping,
    /// `STATUS=…`: one line for `systemctl status`.
    Status(String),
    /// `MAINPID=…`: this process is now the service's main process.
    MainPid(u32),
    /// `WATCHDOG=1`: alive.
    Watchdog,
}

impl State {
    fn line(&self) -> String {
        match self {
            State::Ready => "READY=1".into(),
            State::Reloading => format!(
                "RELOADING=1\nMONOTONIC_USEC={}",
                crate::sys::monotonic_usec()
            ),
            State::Stopping => "STOPPING=1".into(),
            State::Status(s) => format!("STATUS={}", s.replace('\n', " ")),
            State::MainPid(pid) => format!("MAINPID={pid}"),
            State::Watchdog => "WATCHDOG=1".into(),
        }
    }
}

/// The message that says `states`, one line each.
pub fn message(states: &[State]) -> String {
    let mut m = states
        .iter()
        .map(State::line)
        .collect::<Vec<_>>()
        .join("\n");
    m.push('\n');
    m
}

/// What `$NOTIFY_SOCKET` names.
pub fn address(value: &str) -> io::Result<SocketAddr> {
    if let Some(name) = value.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name.as_bytes());
    }
    if value.starts_with('/') {
        return SocketAddr::from_pathname(value);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("NOTIFY_SOCKET={value} is neither a path nor @abstract (vsock is not supported)"),
    ))
}

/// The service manager's notification socket, when there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for; `None` when it is unset
    /// (not started by systemd, or not `Type=notify`).
    pub fn from_env() -> Option<io::Result<Notifier>> {
        let value = std::env::var("NOTIFY_SOCKET").ok()?;
        Some(Notifier::to(&value))
    }

    /// A notifier sending to the socket `value` names (as in
    /// `$NOTIFY_SOCKET`).
    pub fn to(value: &str) -> io::Result<Notifier> {
        let to = address(value)?;
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier { socket, to })
    }

    /// Sends `states` in one datagram; a failure is logged, not fatal
    /// (the service manager may be gone, or its queue full).
    pub fn notify(&self, states: &[State]) {
        let m = message(states);
        if let Err(e) = self.socket.send_to_addr(m.as_bytes(), &self.to) {
            tracing::warn!(error = %e, message = m.trim_end(), "cannot notify the service manager");
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if it is set
/// for this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim() != std::process::id().to_string() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_has_one_line_per_state_and_reloading_carries_the_clock() {
        let m = message(&[
            State::Ready,
            State::Status("serving\ntwo lines".into()),
            State::MainPid(42),
        ]);
        assert_eq!(m, "READY=1\nSTATUS=serving two lines\nMAINPID=42\n");
        let before = crate::sys::monotonic_usec();
        let m = message(&[State::Reloading]);
        let usec: u64 = m
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|v| v.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("{m:?}"));
        assert!(usec >= before && usec <= crate::sys::monotonic_usec());
    }

    #[test]
    fn notifications_reach_an_abstract_socket_and_a_path() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("saps-notify-test-{}", std::process::id());
        let abstract_addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&abstract_addr).unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .notify(&[State::Stopping]);
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::to(path.to_str().unwrap())
            .unwrap()
            .notify(&[State::Watchdog]);
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
        assert!(Notifier::to("vsock:2:1").is_err());
    }
}

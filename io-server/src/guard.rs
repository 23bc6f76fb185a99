//! What an authenticated node may do to the gateway's sockets (issue 24,
//! "an authenticated but hostile or broken node"): the socket options a
//! TCP server uses, and no outbound connection to the gateway itself.
//!
//! `SetOpt`/`GetOpt` pass an allow-list ([`option`]); anything else (the
//! options that steer routing or bypass the host's limits, such as
//! `SO_MARK`, `SO_BINDTODEVICE`, `SO_RCVBUFFORCE`, `IP_TRANSPARENT`)
//! answers `EPERM`. `Connect` from a node that joined over a fabric
//! ([`connect`]) may not reach the io-server's own TCP endpoints (metrics,
//! `tcp://` fabric listeners: `EACCES`) nor another port of the gateway's
//! own addresses that no listener group serves (`ECONNREFUSED`, what a
//! closed port answers), unless `--allow-connect-local`.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

/// Highest `SO_PRIORITY` a node may set: 7 and above need
/// `CAP_NET_ADMIN` natively (socket(7)).
const MAX_PRIORITY: i32 = 6;

/// Why an option is refused, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not on the allow-list.
    NotAllowed,
    /// On the list, but this value is not (a priority above 6, a
    /// congestion control the kernel does not allow unprivileged users).
    Value,
}

impl Refusal {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "option not on the io-server's allow-list",
            Refusal::Value => "value not allowed for this option",
        }
    }
}

/// Whether a node may set (`set`) or read option `level`/`name` of a
/// gateway socket, with `value` (for a set).
pub(crate) fn option(level: i32, name: i32, set: bool, value: &[u8]) -> Result<(), Refusal> {
    use libc::*;
    let listed = match level {
        SOL_SOCKET => {
            matches!(
                name,
                SO_KEEPALIVE
                    | SO_LINGER
                    | SO_RCVBUF
                    | SO_SNDBUF
                    | SO_REUSEADDR
                    | SO_REUSEPORT
                    | SO_RCVLOWAT
                    | SO_SNDLOWAT
                    | SO_RCVTIMEO
                    | SO_SNDTIMEO
                    | SO_OOBINLINE
                    | SO_PRIORITY
            ) || (!set
                && matches!(
                    name,
                    SO_ERROR | SO_TYPE | SO_DOMAIN | SO_PROTOCOL | SO_ACCEPTCONN
                ))
        }
        IPPROTO_TCP => {
            matches!(
                name,
                TCP_NODELAY
                    | TCP_CORK
                    | TCP_MAXSEG
                    | TCP_KEEPIDLE
                    | TCP_KEEPINTVL
                    | TCP_KEEPCNT
                    | TCP_SYNCNT
                    | TCP_LINGER2
                    | TCP_DEFER_ACCEPT
                    | TCP_WINDOW_CLAMP
                    | TCP_QUICKACK
                    | TCP_CONGESTION
                    | TCP_USER_TIMEOUT
                    | TCP_NOTSENT_LOWAT
                    | TCP_FASTOPEN
                    | TCP_FASTOPEN_CONNECT
                    | TCP_THIN_LINEAR_TIMEOUTS
            ) || (!set && matches!(name, TCP_INFO | TCP_CC_INFO))
        }
        IPPROTO_IP => matches!(name, IP_TOS | IP_TTL),
        IPPROTO_IPV6 => matches!(name, IPV6_V6ONLY | IPV6_TCLASS | IPV6_UNICAST_HOPS),
        _ => false,
    };
    if !listed {
        return Err(Refusal::NotAllowed);
    }
    if !set {
        return Ok(());
    }
    match (level, name) {
        (SOL_SOCKET, SO_PRIORITY) => match int(value) {
            Some(p) if (0..=MAX_PRIORITY).contains(&p) => Ok(()),
            _ => Err(Refusal::Value),
        },
        (IPPROTO_TCP, TCP_CONGESTION) => {
            let name = value.split(|&b| b == 0).next().unwrap_or_default();
            let name = std::str::from_utf8(name).map_err(|_| Refusal::Value)?;
            if allowed_congestion().iter().any(|a| a == name) {
                Ok(())
            } else {
                Err(Refusal::Value)
            }
        }
        _ => Ok(()),
    }
}

fn int(value: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(value.get(..4)?.try_into().ok()?))
}

/// The congestion controls unprivileged programs may choose
/// (`net.ipv4.tcp_allowed_congestion_control`), read once at start-up
/// ([`init`]): as root, the kernel would let a node pick any, and load
/// its module.
fn allowed_congestion() -> &'static [String] {
    static ALLOWED: OnceLock<Vec<String>> = OnceLock::new();
    ALLOWED.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_else(|_| vec!["reno".into(), "cubic".into()])
    })
}

/// Reads what [`option`] needs from the host before the sandbox closes.
pub(crate) fn init() {
    allowed_congestion();
}

/// Why a `Connect` is refused: its errno and the reason logged.
pub(crate) type ConnectRefusal = (i32, &'static str);

/// Whether a node that joined over a fabric may connect to `to`.
/// `own`: the io-server's own TCP endpoints; `served`: whether a listener
/// group serves that port; `address`: the single address.
pub(crate) fn connect(
    to: SocketAddr,
    own: &[SocketAddr],
    address: IpAddr,
    served: impl FnOnce(u16) -> bool,
) -> Result<(), ConnectRefusal> {
    let ip = to.ip();
    let local = ip.is_loopback() || ip.is_unspecified() || ip == address || is_local(ip);
    if !local {
        return Ok(());
    }
    let own_endpoint = own.iter().any(|o| {
        o.port() == to.port() && (o.ip() == ip || o.ip().is_unspecified() || ip.is_unspecified())
    });
    if own_endpoint {
        return Err((
            libc::EACCES,
            "the io-server's own metrics or fabric address",
        ));
    }
    if served(to.port()) {
        return Ok(()); // another node's listener: the cluster's own service
    }
    Err((
        libc::ECONNREFUSED,
        "a port of the gateway itself that no listener group serves",
    ))
}

/// Whether `ip` is an address of this host: a socket may be bound to it.
fn is_local(ip: IpAddr) -> bool {
    crate::sys::bound_socket(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests;

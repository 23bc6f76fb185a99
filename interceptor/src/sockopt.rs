//! Names of socket option levels and options, in the spelling of the C
//! headers and strace (`SOL_SOCKET`, `SO_REUSEADDR`, `IPPROTO_TCP`,
//! `TCP_NODELAY`, …), for the supervisor's logs and the `--trace` output
//! (DESIGN.md "Interfaces": copy strace's notation).

/// `(value, "NAME")` pairs from the `libc` constants of the same name.
macro_rules! names {
    ($($name:ident),* $(,)?) => { &[$((libc::$name, stringify!($name))),*] };
}

const LEVELS: &[(i32, &str)] = names![
    SOL_SOCKET,
    IPPROTO_IP,
    IPPROTO_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP
];

const SOL_SOCKET_OPTIONS: &[(i32, &str)] = names![
    SO_DEBUG,
    SO_REUSEADDR,
    SO_TYPE,
    SO_ERROR,
    SO_DONTROUTE,
    SO_BROADCAST,
    SO_SNDBUF,
    SO_RCVBUF,
    SO_SNDBUFFORCE,
    SO_RCVBUFFORCE,
    SO_KEEPALIVE,
    SO_OOBINLINE,
    SO_NO_CHECK,
    SO_PRIORITY,
    SO_LINGER,
    SO_BSDCOMPAT,
    SO_REUSEPORT,
    SO_PASSCRED,
    SO_PEERCRED,
    SO_RCVLOWAT,
    SO_SNDLOWAT,
    SO_RCVTIMEO,
    SO_SNDTIMEO,
    SO_BINDTODEVICE,
    SO_TIMESTAMP,
    SO_ACCEPTCONN,
    SO_PROTOCOL,
    SO_DOMAIN,
    SO_MARK,
    SO_INCOMING_CPU,
    SO_BUSY_POLL,
    SO_ZEROCOPY,
    SO_PEEK_OFF,
    SO_RXQ_OVFL,
    SO_TIMESTAMPNS,
];

const IPPROTO_TCP_OPTIONS: &[(i32, &str)] = names![
    TCP_NODELAY,
    TCP_MAXSEG,
    TCP_CORK,
    TCP_KEEPIDLE,
    TCP_KEEPINTVL,
    TCP_KEEPCNT,
    TCP_SYNCNT,
    TCP_LINGER2,
    TCP_DEFER_ACCEPT,
    TCP_WINDOW_CLAMP,
    TCP_INFO,
    TCP_QUICKACK,
    TCP_CONGESTION,
    TCP_MD5SIG,
    TCP_THIN_LINEAR_TIMEOUTS,
    TCP_THIN_DUPACK,
    TCP_USER_TIMEOUT,
    TCP_REPAIR,
    TCP_FASTOPEN,
    TCP_NOTSENT_LOWAT,
    TCP_FASTOPEN_CONNECT,
    TCP_ULP,
];

const IPPROTO_IP_OPTIONS: &[(i32, &str)] = names![
    IP_TOS,
    IP_TTL,
    IP_OPTIONS,
    IP_RECVERR,
    IP_MTU_DISCOVER,
    IP_MTU,
    IP_FREEBIND,
    IP_TRANSPARENT,
    IP_BIND_ADDRESS_NO_PORT,
    IP_PKTINFO,
    IP_RECVTOS,
];

const IPPROTO_IPV6_OPTIONS: &[(i32, &str)] = names![
    IPV6_V6ONLY,
    IPV6_UNICAST_HOPS,
    IPV6_TCLASS,
    IPV6_RECVERR,
    IPV6_MTU_DISCOVER,
    IPV6_MTU,
    IPV6_FREEBIND,
    IPV6_TRANSPARENT,
    IPV6_RECVPKTINFO,
];

fn lookup(table: &[(i32, &'static str)], value: i32) -> Option<&'static str> {
    table.iter().find(|(v, _)| *v == value).map(|(_, n)| *n)
}

/// `SOL_SOCKET`, `IPPROTO_TCP`, … for a `level` argument.
pub fn level_name(level: i32) -> Option<&'static str> {
    lookup(LEVELS, level)
}

/// `SO_REUSEADDR`, `TCP_NODELAY`, … for an option at `level`.
pub fn option_name(level: i32, option: i32) -> Option<&'static str> {
    let table = match level {
        libc::SOL_SOCKET => SOL_SOCKET_OPTIONS,
        libc::IPPROTO_TCP => IPPROTO_TCP_OPTIONS,
        libc::IPPROTO_IP => IPPROTO_IP_OPTIONS,
        libc::IPPROTO_IPV6 => IPPROTO_IPV6_OPTIONS,
        _ => return None,
    };
    lookup(table, option)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_headers() {
        assert_eq!(level_name(libc::SOL_SOCKET), Some("SOL_SOCKET"));
        assert_eq!(level_name(libc::IPPROTO_TCP), Some("IPPROTO_TCP"));
        assert_eq!(
            option_name(libc::SOL_SOCKET, libc::SO_REUSEADDR),
            Some("SO_REUSEADDR")
        );
        assert_eq!(
            option_name(libc::IPPROTO_TCP, libc::TCP_NODELAY),
            Some("TCP_NODELAY")
        );
        assert_eq!(
            option_name(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            Some("IPV6_V6ONLY")
        );
        // Same number, different level: TCP_NODELAY == SO_DEBUG == 1.
        assert_eq!(option_name(libc::SOL_SOCKET, 1), Some("SO_DEBUG"));
        assert_eq!(option_name(libc::SOL_SOCKET, 9999), None);
        assert_eq!(level_name(9999), None);
    }
}

//! Decoding one trapped call into strace's notation (issue 6; DESIGN.md
//! "Interfaces": `--trace` copies strace's notation exactly).
//!
//! The argument strings are what `strace -f -e trace=network` (strace 6.1)
//! prints for the x86_64 socket family: `AF_INET`, `SOCK_STREAM|SOCK_CLOEXEC`,
//! `{sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("10.0.0.1")}`,
//! `[128 => 16]`, `SOL_SOCKET, SO_REUSEADDR, [1], 4`. Memory the supervisor
//! did not read (a bad pointer, a call that failed or ran natively) is shown
//! as its address, like strace does for a pointer it cannot follow. Both the
//! text and the JSON formats are built from [`Decoded`].

use saps_interceptor::notify::Reply;
use saps_interceptor::sockopt::option_name;
use saps_interceptor::supervisor::{CallRecord, Detail};
use std::borrow::Cow;
use std::net::SocketAddr;

/// The traced syscalls: x86_64 number and strace's name, in number order.
pub(crate) const SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_accept4, "accept4"),
];

/// strace's name of syscall `nr` (`syscall_0x…` for one outside the table).
pub(crate) fn syscall_name(nr: i64) -> Cow<'static, str> {
    match SYSCALLS.iter().find(|(n, _)| *n == nr) {
        Some((_, name)) => Cow::Borrowed(name),
        None => Cow::Owned(format!("syscall_{nr:#x}")),
    }
}

/// How a call ended, as strace reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Value(i64),
    /// `-1 NAME (message)`.
    Error {
        errno: i32,
        name: String,
        message: String,
    },
    /// The kernel ran it natively: SAPS does not know the result (`= ?`).
    Native,
}

impl Outcome {
    fn of(reply: &Reply) -> Self {
        match *reply {
            Reply::Value(v) => Outcome::Value(v),
            Reply::Errno(errno) => Outcome::Error {
                errno,
                name: errno_name(errno),
                message: errno_message(errno),
            },
            Reply::Continue => Outcome::Native,
        }
    }

    fn succeeded(&self) -> bool {
        matches!(self, Outcome::Value(_))
    }
}

/// One call in strace's terms.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    pub name: Cow<'static, str>,
    pub args: Vec<String>,
    pub outcome: Outcome,
}

/// Decodes `call`'s name, arguments and result.
pub(crate) fn decode(call: &CallRecord) -> Decoded {
    let outcome = Outcome::of(&call.result);
    let args = Args {
        raw: &call.args,
        detail: &call.detail,
        ok: outcome.succeeded(),
    };
    Decoded {
        name: syscall_name(call.nr),
        args: args.decode(call.nr),
        outcome,
    }
}

/// `ECONNREFUSED`, … (`E<number>` for an unknown errno).
pub(crate) fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => format!("E{errno}"),
        e => format!("{e:?}"),
    }
}

/// `Connection refused`, … (the C library's `strerror`, as strace prints it).
pub(crate) fn errno_message(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// The raw arguments of a call with what the supervisor read for it.
struct Args<'a> {
    raw: &'a [u64; 6],
    detail: &'a Detail,
    /// The call succeeded, so its output arguments were written.
    ok: bool,
}

impl Args<'_> {
    fn decode(&self, nr: i64) -> Vec<String> {
        let a = self.raw;
        let fd = || (a[0] as i32).to_string();
        match nr {
            libc::SYS_socket => vec![
                family(a[0] as i32),
                sock_type(a[1] as i32),
                protocol(a[0] as i32, a[2] as i32),
            ],
            libc::SYS_bind | libc::SYS_connect => {
                vec![fd(), self.addr_in(a[1]), (a[2] as u32).to_string()]
            }
            libc::SYS_listen => vec![fd(), (a[1] as i32).to_string()],
            libc::SYS_sendto => vec![
                fd(),
                pointer(a[1]),
                (a[2] as usize).to_string(),
                msg_flags(a[3] as i32),
                self.addr_in(a[4]),
                (a[5] as u32).to_string(),
            ],
            libc::SYS_shutdown => vec![fd(), shutdown_how(a[1] as i32)],
            libc::SYS_accept | libc::SYS_getsockname | libc::SYS_getpeername => {
                vec![fd(), self.addr_out(a[1]), self.len_value_result(a[2])]
            }
            libc::SYS_accept4 => vec![
                fd(),
                self.addr_out(a[1]),
                self.len_value_result(a[2]),
                sock_flags(a[3] as i32).unwrap_or_else(|| "0".into()),
            ],
            libc::SYS_setsockopt => {
                let (level, opt) = (a[1] as i32, a[2] as i32);
                let value = match &self.detail.value {
                    Some(v) => option_value(level, opt, v, a[3]),
                    None => pointer(a[3]),
                };
                vec![
                    fd(),
                    sol_name(level),
                    opt_name(level, opt),
                    value,
                    (a[4] as u32).to_string(),
                ]
            }
            libc::SYS_getsockopt => {
                let (level, opt) = (a[1] as i32, a[2] as i32);
                let value = match &self.detail.value {
                    Some(v) if self.ok => option_value(level, opt, v, a[3]),
                    _ => pointer(a[3]),
                };
                vec![
                    fd(),
                    sol_name(level),
                    opt_name(level, opt),
                    value,
                    self.len_value_result(a[4]),
                ]
            }
            _ => a.iter().map(|&v| pointer(v)).collect(),
        }
    }

    /// An address the program passed in (bind, connect, sendto).
    fn addr_in(&self, ptr: u64) -> String {
        match &self.detail.addr {
            Some(addr) if ptr != 0 => sockaddr(addr),
            _ => pointer(ptr),
        }
    }

    /// An address written back (accept, getsockname): only on success.
    fn addr_out(&self, ptr: u64) -> String {
        match &self.detail.addr {
            Some(addr) if ptr != 0 && self.ok => sockaddr(addr),
            _ => pointer(ptr),
        }
    }

    /// A `socklen_t *` value-result argument: `[in]` or `[in => out]`.
    fn len_value_result(&self, ptr: u64) -> String {
        match (self.detail.len_in, self.detail.len) {
            _ if ptr == 0 => pointer(ptr),
            (Some(i), Some(o)) if self.ok && i != o => format!("[{i} => {o}]"),
            (Some(i), _) => format!("[{i}]"),
            (None, Some(o)) if self.ok => format!("[{o}]"),
            _ => pointer(ptr),
        }
    }
}

/// A pointer strace cannot follow: `NULL` or its address in hex.
fn pointer(p: u64) -> String {
    if p == 0 {
        "NULL".into()
    } else {
        format!("{p:#x}")
    }
}

/// `{sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("10.0.0.1")}`.
pub(crate) fn sockaddr(addr: &SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!(
            "{{sa_family=AF_INET, sin_port=htons({}), sin_addr=inet_addr(\"{}\")}}",
            a.port(),
            a.ip()
        ),
        SocketAddr::V6(a) => format!(
            "{{sa_family=AF_INET6, sin6_port=htons({}), sin6_flowinfo=htonl({}), \
             inet_pton(AF_INET6, \"{}\", &sin6_addr), sin6_scope_id={}}}",
            a.port(),
            a.flowinfo(),
            a.ip(),
            a.scope_id()
        ),
    }
}

/// Looks `value` up in a `(value, "NAME")` table.
fn named(table: &[(i32, &str)], value: i32) -> Option<String> {
    table
        .iter()
        .find(|(v, _)| *v == value)
        .map(|(_, n)| (*n).to_owned())
}

fn family(f: i32) -> String {
    const FAMILIES: &[(i32, &str)] = &[
        (libc::AF_UNSPEC, "AF_UNSPEC"),
        (libc::AF_UNIX, "AF_UNIX"),
        (libc::AF_INET, "AF_INET"),
        (libc::AF_INET6, "AF_INET6"),
        (libc::AF_NETLINK, "AF_NETLINK"),
        (libc::AF_PACKET, "AF_PACKET"),
        (libc::AF_VSOCK, "AF_VSOCK"),
    ];
    named(FAMILIES, f).unwrap_or_else(|| f.to_string())
}

/// `SOCK_CLOEXEC|SOCK_NONBLOCK` and any unknown bits, or `None` for 0.
fn sock_flags(flags: i32) -> Option<String> {
    bit_names(
        &[
            (libc::SOCK_CLOEXEC, "SOCK_CLOEXEC"),
            (libc::SOCK_NONBLOCK, "SOCK_NONBLOCK"),
        ],
        flags,
    )
}

/// `A|B|0x…`: the names of the bits of `flags` in `table`, then what is
/// left in hex; `None` for no bits.
fn bit_names(table: &[(i32, &str)], flags: i32) -> Option<String> {
    let mut parts: Vec<String> = table
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect();
    let rest = table.iter().fold(flags, |r, (bit, _)| r & !bit);
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    (!parts.is_empty()).then(|| parts.join("|"))
}

/// `SOCK_STREAM|SOCK_CLOEXEC`: the type in the low bits, then the flags.
fn sock_type(t: i32) -> String {
    const TYPES: &[(i32, &str)] = &[
        (libc::SOCK_STREAM, "SOCK_STREAM"),
        (libc::SOCK_DGRAM, "SOCK_DGRAM"),
        (libc::SOCK_RAW, "SOCK_RAW"),
        (libc::SOCK_RDM, "SOCK_RDM"),
        (libc::SOCK_SEQPACKET, "SOCK_SEQPACKET"),
    ];
    let base = t & 0xf;
    let base = named(TYPES, base).unwrap_or_else(|| format!("{base:#x}"));
    match sock_flags(t & !0xf) {
        Some(flags) => format!("{base}|{flags}"),
        None => base,
    }
}

fn protocol(family: i32, p: i32) -> String {
    const INET: &[(i32, &str)] = &[
        (libc::IPPROTO_IP, "IPPROTO_IP"),
        (libc::IPPROTO_ICMP, "IPPROTO_ICMP"),
        (libc::IPPROTO_TCP, "IPPROTO_TCP"),
        (libc::IPPROTO_UDP, "IPPROTO_UDP"),
        (libc::IPPROTO_ICMPV6, "IPPROTO_ICMPV6"),
        (libc::IPPROTO_SCTP, "IPPROTO_SCTP"),
        (libc::IPPROTO_MPTCP, "IPPROTO_MPTCP"),
    ];
    let table: &[(i32, &str)] = if matches!(family, libc::AF_INET | libc::AF_INET6) {
        INET
    } else {
        &[]
    };
    named(table, p).unwrap_or_else(|| p.to_string())
}

fn shutdown_how(how: i32) -> String {
    const HOW: &[(i32, &str)] = &[
        (libc::SHUT_RD, "SHUT_RD"),
        (libc::SHUT_WR, "SHUT_WR"),
        (libc::SHUT_RDWR, "SHUT_RDWR"),
    ];
    named(HOW, how).unwrap_or_else(|| how.to_string())
}

/// strace spells option levels `SOL_*` (`SOL_TCP`, not `IPPROTO_TCP`).
fn sol_name(level: i32) -> String {
    const LEVELS: &[(i32, &str)] = &[
        (libc::SOL_SOCKET, "SOL_SOCKET"),
        (libc::SOL_IP, "SOL_IP"),
        (libc::SOL_TCP, "SOL_TCP"),
        (libc::SOL_UDP, "SOL_UDP"),
        (libc::SOL_IPV6, "SOL_IPV6"),
    ];
    named(LEVELS, level).unwrap_or_else(|| level.to_string())
}

fn opt_name(level: i32, opt: i32) -> String {
    option_name(level, opt).map_or_else(|| opt.to_string(), str::to_owned)
}

/// An option value: `[1]` for an int, `{l_onoff=1, l_linger=5}` for
/// `SO_LINGER`, a string for the named ones (`TCP_CONGESTION`), else the
/// pointer (strace prints other structs in detail; SAPS does not).
fn option_value(level: i32, opt: i32, v: &[u8], ptr: u64) -> String {
    let int = |b: &[u8]| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    match (level, opt) {
        (libc::SOL_SOCKET, libc::SO_LINGER) if v.len() >= 8 => {
            format!("{{l_onoff={}, l_linger={}}}", int(&v[..4]), int(&v[4..8]))
        }
        (libc::SOL_SOCKET, libc::SO_BINDTODEVICE)
        | (libc::SOL_TCP, libc::TCP_CONGESTION | libc::TCP_ULP) => quoted(v),
        _ if v.len() == 4 => format!("[{}]", int(v)),
        _ => pointer(ptr),
    }
}

/// A C string as strace quotes it (up to the first NUL).
fn quoted(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    let mut s = String::from("\"");
    for &b in &v[..end] {
        match b {
            b'"' | b'\\' => {
                s.push('\\');
                s.push(b as char);
            }
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s.push('"');
    s
}

/// `send` flags as strace spells them (`MSG_NOSIGNAL|MSG_DONTWAIT`).
fn msg_flags(flags: i32) -> String {
    const NAMES: &[(i32, &str)] = &[
        (libc::MSG_OOB, "MSG_OOB"),
        (libc::MSG_DONTROUTE, "MSG_DONTROUTE"),
        (libc::MSG_DONTWAIT, "MSG_DONTWAIT"),
        (libc::MSG_EOR, "MSG_EOR"),
        (libc::MSG_MORE, "MSG_MORE"),
        (libc::MSG_NOSIGNAL, "MSG_NOSIGNAL"),
    ];
    bit_names(NAMES, flags).unwrap_or_else(|| "0".into())
}

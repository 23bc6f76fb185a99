//! The seccomp BPF program of a SAPS target (DESIGN.md "Virtual TCP
//! sockets"; paper §2: only connection-management syscalls leave the node's
//! kernel, the data path stays native).
//!
//! The program is built with libseccomp (the library runc, crun, podman and
//! systemd use for this), in the parent before `fork`, and exported as
//! classic BPF: the child loads it with a raw `seccomp(2)` between `fork`
//! and `exec`, where only async-signal-safe calls may run, with flags
//! libseccomp does not offer everywhere (`SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`).
//! libseccomp resolves the syscall numbers of each architecture, rewrites the
//! 32-bit x86 rules for the `socketcall` multiplexer and checks the x32 bit:
//!
//! * a syscall from a foreign ABI is refused: x32 (`nr & 0x40000000`) always,
//!   32-bit x86 (`int 0x80`) for the socket calls and `io_uring_setup`, any
//!   other architecture entirely — all with `ENOSYS`;
//! * `io_uring_setup` → `ENOSYS` (io_uring would bypass the filter);
//! * `socket()` → `SECCOMP_RET_USER_NOTIF` only for `AF_INET`/`AF_INET6` with
//!   `(type & 0xf) == SOCK_STREAM`, so AF_UNIX, UDP and netlink never trap;
//! * `sendto()` → `SECCOMP_RET_USER_NOTIF` only with a destination address
//!   (a non-NULL `dest_addr`: TCP ignores it, the AF_UNIX end of a relayed
//!   connection would refuse it); plain sends never trap;
//! * the rest of [`TRAPPED_SYSCALLS`] → `SECCOMP_RET_USER_NOTIF`;
//! * everything else → `SECCOMP_RET_ALLOW`.
//!
//! With [`FilterOptions::native_sockets`] (saps-run's embedded zero-relay
//! mode, where the program's sockets are the host kernel's own) no socket
//! call traps (`listen` alone with [`FilterOptions::trap_listen`], for
//! `--trace`), `io_uring_setup` runs natively too, and the foreign-ABI
//! refusals stay.

use std::io::{Read, Seek};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

use crate::error::{Error, Result};

/// `AUDIT_ARCH_X86_64` (linux/audit.h; `libc` lacks the AUDIT_ARCH values).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `AUDIT_ARCH_I386`: 32-bit syscalls made with `int 0x80` on x86_64.
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `AUDIT_ARCH_AARCH64`.
pub const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;

/// The architecture the filter accepts natively.
#[cfg(target_arch = "x86_64")]
pub const NATIVE_ARCH: u32 = AUDIT_ARCH_X86_64;
#[cfg(target_arch = "aarch64")]
pub const NATIVE_ARCH: u32 = AUDIT_ARCH_AARCH64;

/// `__X32_SYSCALL_BIT`.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The syscalls the supervisor answers (`socket` only for TCP over IPv4/IPv6),
/// with their names for logs and the tracer.
pub const TRAPPED_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_socket, "socket"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_sendto, "sendto"),
];

/// 32-bit x86 syscalls refused with `ENOSYS`: `socketcall` and the direct
/// socket calls SAPS would trap natively, plus `io_uring_setup`, by name
/// (libseccomp resolves them for the i386 ABI).
#[cfg(target_arch = "x86_64")]
const REFUSED_I386_NAMES: &[&str] = &[
    "socketcall",
    "socket",
    "bind",
    "connect",
    "listen",
    "accept4",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    "shutdown",
    "io_uring_setup",
];

/// The same calls' numbers in the i386 table (arch/x86/entry/syscalls/
/// syscall_32.tbl), to check the exported program against.
#[cfg(all(target_arch = "x86_64", test))]
const REFUSED_I386_SYSCALLS: &[u32] = &[
    102, // socketcall
    359, // socket
    361, // bind
    362, // connect
    363, // listen
    364, // accept4
    365, // getsockopt
    366, // setsockopt
    367, // getsockname
    368, // getpeername
    373, // shutdown
    425, // io_uring_setup
];

/// The name of a trapped syscall number, if it is one.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    TRAPPED_SYSCALLS
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| *name)
}

/// Knobs of the program.
#[derive(Clone, Debug, Default)]
pub struct FilterOptions {
    /// Trap `socket()` for every family and type, not only TCP (for tests and
    /// for tracing; the supervisor then continues the others natively).
    pub trap_every_socket: bool,
    /// The program's sockets are the kernel's own (docs/interceptor.md,
    /// "Native sockets"): no socket call traps.
    pub native_sockets: bool,
    /// With `native_sockets`, `listen` still traps, so that `--trace`
    /// shows each listener (and nothing per connection or per request).
    /// Without `--trace` it does not: a trapped call can end with `EINTR`
    /// where the kernel's would not (docs/interceptor.md, "Signals during
    /// a trapped call").
    pub trap_listen: bool,
}

/// Builder of the BPF program.
pub struct Filter;

/// libseccomp's name for the native architecture.
#[cfg(target_arch = "x86_64")]
const SCMP_NATIVE: ScmpArch = ScmpArch::X8664;
#[cfg(target_arch = "aarch64")]
const SCMP_NATIVE: ScmpArch = ScmpArch::Aarch64;

const ENOSYS: ScmpAction = ScmpAction::Errno(libc::ENOSYS);

/// An `int` argument equal to `value`: only its low 32 bits count, as in the
/// kernel (a caller may leave anything in the upper half of the register).
fn int_arg_is(arg: u32, value: i32) -> ScmpArgCompare {
    ScmpArgCompare::new(
        arg,
        ScmpCompareOp::MaskedEqual(0xffff_ffff),
        value as u32 as u64,
    )
}

/// A filter context with the defaults every part shares: allow what no rule
/// names, refuse every architecture not added with `ENOSYS`.
fn context(arch: ScmpArch) -> Result<ScmpFilterContext> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
    ctx.set_act_badarch(ENOSYS)?;
    // The child sets no_new_privs itself before loading the program.
    ctx.set_ctl_nnp(false)?;
    if arch != SCMP_NATIVE {
        ctx.add_arch(arch)?;
        ctx.remove_arch(SCMP_NATIVE)?;
    }
    Ok(ctx)
}

impl Filter {
    /// Builds the program (see the module docs for what it does).
    pub fn build(options: &FilterOptions) -> Result<Vec<libc::sock_filter>> {
        let mut ctx = context(SCMP_NATIVE)?;
        let trapped = if options.native_sockets {
            if options.trap_listen {
                let listen = ScmpSyscall::from(libc::SYS_listen as i32);
                ctx.add_rule(ScmpAction::Notify, listen)?;
            }
            &[][..]
        } else {
            ctx.add_rule(ENOSYS, ScmpSyscall::from_name("io_uring_setup")?)?;
            TRAPPED_SYSCALLS
        };
        for &(nr, _) in trapped {
            let call = ScmpSyscall::from(nr as i32);
            if nr == libc::SYS_socket && !options.trap_every_socket {
                // AF_INET/AF_INET6 streams (TCP and MPTCP) only.
                let stream = ScmpArgCompare::new(
                    1,
                    ScmpCompareOp::MaskedEqual(0xf),
                    libc::SOCK_STREAM as u64,
                );
                for domain in [libc::AF_INET, libc::AF_INET6] {
                    ctx.add_rule_conditional(
                        ScmpAction::Notify,
                        call,
                        &[int_arg_is(0, domain), stream],
                    )?;
                }
            } else if nr == libc::SYS_sendto {
                // sendto(fd, buf, len, flags, dest_addr, addrlen): a NULL
                // dest_addr runs natively.
                let addr = ScmpArgCompare::new(4, ScmpCompareOp::NotEqual, 0);
                ctx.add_rule_conditional(ScmpAction::Notify, call, &[addr])?;
            } else {
                ctx.add_rule(ScmpAction::Notify, call)?;
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            let mut i386 = context(ScmpArch::X86)?;
            for name in REFUSED_I386_NAMES {
                i386.add_rule(ENOSYS, ScmpSyscall::from_name(name)?)?;
            }
            ctx.merge(i386)?;
        }
        export(&ctx)
    }
}

/// The program as classic BPF instructions, through a memory file
/// (libseccomp before 2.6 exports only to a file descriptor).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<libc::sock_filter>> {
    let mut file: std::fs::File = nix::sys::memfd::memfd_create(
        c"saps-filter",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| Error::Io {
        context: "memfd_create for the seccomp filter",
        source: e.into(),
    })?
    .into();
    ctx.export_bpf(&file)?;
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|()| file.read_to_end(&mut bytes))
        .map_err(Error::io("reading the exported seccomp filter"))?;
    let insn = std::mem::size_of::<libc::sock_filter>();
    Ok(bytes
        .chunks_exact(insn)
        .map(|b| libc::sock_filter {
            code: u16::from_ne_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on one `seccomp_data`, the way the kernel would
    /// (classic BPF as seccomp accepts it: loads from the data and scratch
    /// memory, ALU, jumps and returns).
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        args.iter()
            .for_each(|a| data.extend_from_slice(&a.to_ne_bytes()));
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        loop {
            let i = prog[pc];
            let (code, k) = (u32::from(i.code), i.k);
            pc += 1;
            let src = if code & libc::BPF_X != 0 { x } else { k };
            match code & 0x07 {
                libc::BPF_LD => match code & 0xe0 {
                    libc::BPF_ABS => {
                        let k = k as usize;
                        a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                    }
                    libc::BPF_MEM => a = mem[k as usize],
                    libc::BPF_IMM => a = k,
                    m => panic!("unexpected load mode {m:#x}"),
                },
                libc::BPF_LDX => match code & 0xe0 {
                    libc::BPF_MEM => x = mem[k as usize],
                    libc::BPF_IMM => x = k,
                    m => panic!("unexpected ldx mode {m:#x}"),
                },
                libc::BPF_ST => mem[k as usize] = a,
                libc::BPF_STX => mem[k as usize] = x,
                libc::BPF_ALU => match code & 0xf0 {
                    libc::BPF_AND => a &= src,
                    libc::BPF_OR => a |= src,
                    libc::BPF_ADD => a = a.wrapping_add(src),
                    libc::BPF_SUB => a = a.wrapping_sub(src),
                    libc::BPF_RSH => a >>= src,
                    libc::BPF_LSH => a <<= src,
                    op => panic!("unexpected alu op {op:#x}"),
                },
                libc::BPF_JMP => {
                    let taken = match code & 0xf0 {
                        libc::BPF_JA => {
                            pc += k as usize;
                            continue;
                        }
                        libc::BPF_JEQ => a == src,
                        libc::BPF_JGT => a > src,
                        libc::BPF_JGE => a >= src,
                        libc::BPF_JSET => a & src != 0,
                        op => panic!("unexpected jump op {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                libc::BPF_RET => return if code & 0x18 == libc::BPF_A { a } else { k },
                libc::BPF_MISC => {
                    if code & 0xf8 == libc::BPF_TAX {
                        x = a;
                    } else {
                        a = x;
                    }
                }
                c => panic!("unexpected instruction class {c:#x}"),
            }
        }
    }

    fn native(prog: &[libc::sock_filter], nr: i64, a0: u64, a1: u64) -> u32 {
        run(prog, NATIVE_ARCH, nr as u32, [a0, a1, 0, 0, 0, 0])
    }

    const INET: u64 = libc::AF_INET as u64;
    const INET6: u64 = libc::AF_INET6 as u64;
    const STREAM: u64 = libc::SOCK_STREAM as u64;
    const NOTIFY: u32 = libc::SECCOMP_RET_USER_NOTIF;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const RET_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    #[test]
    fn socket_traps_only_for_inet_stream() {
        let p = Filter::build(&FilterOptions::default()).unwrap();
        let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        assert_eq!(native(&p, libc::SYS_socket, INET, STREAM), NOTIFY);
        assert_eq!(native(&p, libc::SYS_socket, INET6, STREAM | flags), NOTIFY);
        assert_eq!(
            native(&p, libc::SYS_socket, INET, libc::SOCK_DGRAM as u64),
            ALLOW
        );
        assert_eq!(
            native(&p, libc::SYS_socket, libc::AF_UNIX as u64, STREAM),
            ALLOW
        );
        assert_eq!(
            native(
                &p,
                libc::SYS_socket,
                libc::AF_NETLINK as u64,
                libc::SOCK_RAW as u64
            ),
            ALLOW
        );
        // Only the int (low 32 bits) counts, as in the kernel.
        assert_eq!(
            native(&p, libc::SYS_socket, (1 << 32) | INET, STREAM),
            NOTIFY
        );
    }

    #[test]
    fn trap_every_socket_traps_unix_sockets_too() {
        let p = Filter::build(&FilterOptions {
            trap_every_socket: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            native(
                &p,
                libc::SYS_socket,
                libc::AF_UNIX as u64,
                libc::SOCK_DGRAM as u64
            ),
            NOTIFY
        );
    }

    #[test]
    fn connection_management_traps_and_data_path_does_not() {
        let p = Filter::build(&FilterOptions::default()).unwrap();
        for &(nr, name) in &TRAPPED_SYSCALLS[1..] {
            if nr != libc::SYS_sendto {
                assert_eq!(native(&p, nr, 3, 0), NOTIFY, "{name}");
            }
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_close,
            libc::SYS_epoll_pwait,
        ] {
            assert_eq!(native(&p, nr, 3, 0), ALLOW, "nr {nr}");
        }
    }

    #[test]
    fn native_sockets_trap_nothing_or_listen_alone() {
        let quiet = Filter::build(&FilterOptions {
            native_sockets: true,
            ..Default::default()
        })
        .unwrap();
        for &(nr, name) in TRAPPED_SYSCALLS {
            assert_eq!(native(&quiet, nr, INET, STREAM), ALLOW, "{name}");
        }
        let p = Filter::build(&FilterOptions {
            native_sockets: true,
            trap_listen: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(native(&p, libc::SYS_listen, 3, 128), NOTIFY);
        for &(nr, name) in TRAPPED_SYSCALLS {
            if nr != libc::SYS_listen {
                assert_eq!(native(&p, nr, INET, STREAM), ALLOW, "{name}");
            }
        }
        let sendto = [3, 0x1000, 5, 0, 0x7ffd_1234, 16];
        assert_eq!(run(&p, NATIVE_ARCH, libc::SYS_sendto as u32, sendto), ALLOW);
        assert_eq!(native(&p, libc::SYS_io_uring_setup, 8, 0), ALLOW);
        // Foreign ABIs are still refused: the supervisor would not see a
        // 32-bit listen.
        #[cfg(target_arch = "x86_64")]
        {
            let i386 = |nr| run(&p, AUDIT_ARCH_I386, nr, [0; 6]);
            assert_eq!(i386(363), RET_ENOSYS, "i386 listen");
            assert_eq!(
                native(&p, libc::SYS_listen | X32_SYSCALL_BIT as i64, 3, 0),
                RET_ENOSYS
            );
        }
    }

    #[test]
    fn sendto_traps_only_with_a_destination_address() {
        let p = Filter::build(&FilterOptions::default()).unwrap();
        let sendto = |addr: u64| {
            run(
                &p,
                NATIVE_ARCH,
                libc::SYS_sendto as u32,
                [3, 0x1000, 5, 0, addr, 16],
            )
        };
        assert_eq!(sendto(0), ALLOW, "send(), sendto(…, NULL, 0)");
        assert_eq!(sendto(0x7ffd_1234), NOTIFY);
        assert_eq!(sendto(0x7ffd_0000_0000), NOTIFY, "only the high half set");
    }

    #[test]
    fn io_uring_x32_and_foreign_arches_are_refused() {
        let p = Filter::build(&FilterOptions::default()).unwrap();
        assert_eq!(native(&p, libc::SYS_io_uring_setup, 8, 0), RET_ENOSYS);
        assert_eq!(
            run(
                &p,
                0x4000_0028, /* EM_ARM */
                libc::SYS_getpid as u32,
                [0; 6]
            ),
            RET_ENOSYS
        );
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(
                native(&p, libc::SYS_socket | X32_SYSCALL_BIT as i64, INET, STREAM),
                RET_ENOSYS
            );
            assert_eq!(
                native(&p, libc::SYS_getpid | X32_SYSCALL_BIT as i64, 0, 0),
                RET_ENOSYS
            );
            let i386 = |nr| run(&p, AUDIT_ARCH_I386, nr, [0; 6]);
            for &nr in REFUSED_I386_SYSCALLS {
                assert_eq!(i386(nr), RET_ENOSYS, "i386 syscall {nr}");
            }
            assert_eq!(i386(20), ALLOW, "getpid stays allowed");
        }
    }

    #[test]
    fn syscall_names_cover_the_trapped_set() {
        assert_eq!(syscall_name(libc::SYS_connect), Some("connect"));
        assert_eq!(syscall_name(libc::SYS_read), None);
    }
}

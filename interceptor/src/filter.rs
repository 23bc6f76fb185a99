//! The seccomp BPF program of a SAPS target (DESIGN.md "Virtual TCP
//! sockets"; paper §2: only connection-management syscalls leave the node's
//! kernel, the data path stays native).
//!
//! The program is hand-written classic BPF (`libc::sock_filter`), built in
//! the parent before `fork`:
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

use std::collections::HashMap;

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

/// 32-bit x86 syscall numbers refused with `ENOSYS` (arch/x86/entry/syscalls/
/// syscall_32.tbl): `socketcall` and the direct socket calls SAPS would trap
/// natively, plus `io_uring_setup`.
#[cfg(target_arch = "x86_64")]
pub const REFUSED_I386_SYSCALLS: &[u32] = &[
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
}

/// Builder of the BPF program.
pub struct Filter;

// Offsets into `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of `args[i]` (the `int` arguments of socket()).
const fn off_arg_low(i: u32) -> u32 {
    let base = 16 + 8 * i;
    if cfg!(target_endian = "little") {
        base
    } else {
        base + 4
    }
}
/// High 32 bits of `args[i]` (the upper half of a pointer).
const fn off_arg_high(i: u32) -> u32 {
    let base = 16 + 8 * i;
    if cfg!(target_endian = "little") {
        base + 4
    } else {
        base
    }
}

const RET_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Label {
    Native,
    SocketDomain,
    SocketType,
    SendtoAddr,
    Notify,
    Allow,
    Enosys,
}

/// One instruction; jumps name a label (`None` = fall through).
enum Insn {
    Stmt(libc::sock_filter),
    Jump {
        code: u32,
        k: u32,
        jt: Option<Label>,
        jf: Option<Label>,
    },
}

/// A tiny forward-only assembler: classic BPF jumps are relative u8 offsets.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    labels: HashMap<Label, usize>,
}

impl Asm {
    fn stmt(&mut self, code: u32, k: u32) {
        self.code.push(Insn::Stmt(libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }));
    }
    fn load(&mut self, offset: u32) {
        self.stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    }
    fn ret(&mut self, action: u32) {
        self.stmt(libc::BPF_RET | libc::BPF_K, action);
    }
    fn jump(&mut self, op: u32, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.code.push(Insn::Jump {
            code: libc::BPF_JMP | op | libc::BPF_K,
            k,
            jt,
            jf,
        });
    }
    fn jeq(&mut self, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.jump(libc::BPF_JEQ, k, jt, jf);
    }
    fn label(&mut self, label: Label) {
        self.labels.insert(label, self.code.len());
    }
    fn finish(self) -> Vec<libc::sock_filter> {
        let offset = |from: usize, to: Option<Label>| -> u8 {
            let target = to.map_or(from + 1, |l| self.labels[&l]);
            // The program is a few dozen instructions, all jumps forward.
            u8::try_from(target - (from + 1)).expect("BPF jump fits in u8")
        };
        self.code
            .iter()
            .enumerate()
            .map(|(i, insn)| match insn {
                Insn::Stmt(s) => *s,
                Insn::Jump { code, k, jt, jf } => libc::sock_filter {
                    code: *code as u16,
                    jt: offset(i, *jt),
                    jf: offset(i, *jf),
                    k: *k,
                },
            })
            .collect()
    }
}

impl Filter {
    /// Builds the program (see the module docs for what it does).
    pub fn build(options: &FilterOptions) -> Vec<libc::sock_filter> {
        use Label::*;
        let mut a = Asm::default();

        a.load(OFF_ARCH);
        a.jeq(NATIVE_ARCH, Some(Native), None);
        #[cfg(target_arch = "x86_64")]
        {
            a.jeq(AUDIT_ARCH_I386, None, Some(Enosys));
            a.load(OFF_NR);
            for &nr in REFUSED_I386_SYSCALLS {
                a.jeq(nr, Some(Enosys), None);
            }
            a.ret(libc::SECCOMP_RET_ALLOW);
        }
        #[cfg(not(target_arch = "x86_64"))]
        a.ret(RET_ENOSYS);

        a.label(Native);
        a.load(OFF_NR);
        #[cfg(target_arch = "x86_64")]
        a.jump(libc::BPF_JSET, X32_SYSCALL_BIT, Some(Enosys), None);
        a.jeq(libc::SYS_io_uring_setup as u32, Some(Enosys), None);
        for &(nr, _) in TRAPPED_SYSCALLS {
            let to = if nr == libc::SYS_socket && !options.trap_every_socket {
                SocketDomain
            } else if nr == libc::SYS_sendto {
                SendtoAddr
            } else {
                Notify
            };
            a.jeq(nr as u32, Some(to), None);
        }
        a.ret(libc::SECCOMP_RET_ALLOW);

        a.label(SocketDomain);
        a.load(off_arg_low(0));
        a.jeq(libc::AF_INET as u32, Some(SocketType), None);
        a.jeq(libc::AF_INET6 as u32, Some(SocketType), Some(Allow));
        a.label(SocketType);
        a.load(off_arg_low(1));
        a.stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0xf);
        a.jeq(libc::SOCK_STREAM as u32, Some(Notify), Some(Allow));

        // sendto(fd, buf, len, flags, dest_addr, addrlen): a NULL
        // dest_addr (both halves zero) runs natively.
        a.label(SendtoAddr);
        a.load(off_arg_low(4));
        a.jeq(0, None, Some(Notify));
        a.load(off_arg_high(4));
        a.jeq(0, Some(Allow), Some(Notify));

        a.label(Notify);
        a.ret(libc::SECCOMP_RET_USER_NOTIF);
        a.label(Allow);
        a.ret(libc::SECCOMP_RET_ALLOW);
        a.label(Enosys);
        a.ret(RET_ENOSYS);
        a.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on one `seccomp_data`, the way the kernel would
    /// (only the instructions `Filter::build` emits).
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        args.iter()
            .for_each(|a| data.extend_from_slice(&a.to_ne_bytes()));
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            let code = u32::from(i.code);
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= i.k,
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c if c & 0x07 == libc::BPF_JMP => {
                    let taken = match c & 0xf0 {
                        op if op == libc::BPF_JEQ => acc == i.k,
                        op if op == libc::BPF_JSET => acc & i.k != 0,
                        op => panic!("unexpected jump op {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c => panic!("unexpected instruction {c:#x}"),
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

    #[test]
    fn socket_traps_only_for_inet_stream() {
        let p = Filter::build(&FilterOptions::default());
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
        });
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
        let p = Filter::build(&FilterOptions::default());
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
    fn sendto_traps_only_with_a_destination_address() {
        let p = Filter::build(&FilterOptions::default());
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
        let p = Filter::build(&FilterOptions::default());
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
            assert_eq!(i386(102), RET_ENOSYS, "socketcall");
            assert_eq!(i386(359), RET_ENOSYS, "socket");
            assert_eq!(i386(425), RET_ENOSYS, "io_uring_setup");
            assert_eq!(i386(20), ALLOW, "getpid stays allowed");
        }
    }

    #[test]
    fn syscall_names_cover_the_trapped_set() {
        assert_eq!(syscall_name(libc::SYS_connect), Some("connect"));
        assert_eq!(syscall_name(libc::SYS_read), None);
    }
}

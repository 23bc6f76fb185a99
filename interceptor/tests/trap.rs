//! Real processes under the filter: which syscalls trap, and what answering
//! them with CONTINUE, a value, an errno or ADDFD does to the program.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use common::run_python;
use saps_interceptor::fds::{fd_cloexec, socket_inode};
use saps_interceptor::sockaddr::{self, Decoded};
use saps_interceptor::{AddFd, Reply, TargetMemory};

/// Notifications of syscall `nr`.
fn of(seen: &[saps_interceptor::Notification], nr: i64) -> Vec<saps_interceptor::Notification> {
    seen.iter()
        .filter(|n| i64::from(n.nr) == nr)
        .copied()
        .collect()
}

fn inode_of(s: &UnixStream) -> u64 {
    s.as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .unwrap()
        .metadata()
        .unwrap()
        .ino()
}

/// Everything the target sent through `s` until EOF, bounded in time.
fn read_all(mut s: UnixStream) -> String {
    s.set_read_timeout(Some(common::LIMIT)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn only_inet_stream_sockets_trap_and_continue_gives_a_working_socket() {
    let seen = run_python(
        r#"
import socket
a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
a.bind(("127.0.0.1", 0)); a.listen()
b = socket.create_connection(a.getsockname())
c, _ = a.accept()
b.sendall(b"x"); assert c.recv(1) == b"x"
socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
"#,
        |_, _| Some(Reply::Continue),
    );
    let sockets = of(&seen, libc::SYS_socket);
    assert_eq!(
        sockets.len(),
        2,
        "only the two TCP sockets trap: {sockets:?}"
    );
    for n in &sockets {
        assert_eq!(n.args[0], libc::AF_INET as u64);
        assert_eq!(n.args[1] & 0xf, libc::SOCK_STREAM as u64);
        assert_eq!(n.arch, saps_interceptor::filter::NATIVE_ARCH);
    }
    for nr in [
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_getsockname,
    ] {
        assert!(!of(&seen, nr).is_empty(), "syscall {nr} trapped");
    }
}

#[test]
fn addfd_send_installs_a_socketpair_end_as_the_result_of_socket() {
    let (tx, rx) = mpsc::channel();
    run_python(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.sendall(str(s.fileno()).encode())
"#,
        move |notifier, n| {
            if i64::from(n.nr) != libc::SYS_socket {
                return Some(Reply::Continue);
            }
            let (ours, theirs) = UnixStream::pair().unwrap();
            let cloexec = n.args[1] & libc::SOCK_CLOEXEC as u64 != 0;
            let fd = notifier
                .add_fd(
                    n.id,
                    theirs.as_fd(),
                    AddFd {
                        target_fd: None,
                        cloexec,
                        send: true,
                    },
                )
                .unwrap();
            assert!(
                fd_cloexec(n.pid, fd).unwrap(),
                "python asks for SOCK_CLOEXEC"
            );
            tx.send((fd, ours)).unwrap();
            None
        },
    );
    let (fd, ours) = rx.recv_timeout(Duration::ZERO).expect("socket() trapped");
    assert_eq!(read_all(ours), fd.to_string());
}

#[test]
fn addfd_setfd_replaces_the_fd_behind_an_existing_number() {
    let (tx, rx) = mpsc::channel();
    run_python(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("192.0.2.1", 9))
s.sendall(b"hi")
"#,
        move |notifier, n| {
            if i64::from(n.nr) != libc::SYS_connect {
                return Some(Reply::Continue);
            }
            let addr = sockaddr::read_from_target(&TargetMemory::new(n.pid), n.args[1], n.args[2]);
            let fd = n.args[0] as i32;
            let before = socket_inode(n.pid, fd).unwrap().expect("a socket");
            let cloexec = fd_cloexec(n.pid, fd).unwrap();
            assert!(notifier.id_valid(n.id));
            let (s, p) = UnixStream::pair().unwrap();
            let installed = notifier
                .add_fd(
                    n.id,
                    s.as_fd(),
                    AddFd {
                        target_fd: Some(fd),
                        cloexec,
                        send: false,
                    },
                )
                .unwrap();
            let after = socket_inode(n.pid, fd).unwrap();
            tx.send((addr, installed == fd, before, after, inode_of(&s), p))
                .unwrap();
            Some(Reply::Value(0))
        },
    );
    let (addr, same_number, before, after, s_inode, p) =
        rx.recv_timeout(Duration::ZERO).expect("connect() trapped");
    assert_eq!(addr, Ok(Decoded::Inet("192.0.2.1:9".parse().unwrap())));
    assert!(same_number);
    assert_eq!(after, Some(s_inode));
    assert_ne!(before, s_inode);
    assert_eq!(read_all(p), "hi");
}

#[test]
fn bad_pointers_fault_and_efault_reaches_the_program_which_goes_on() {
    let (tx, rx) = mpsc::channel();
    run_python(
        r#"
import ctypes, errno, socket
from ctypes import c_int, c_long, c_size_t, c_uint, c_void_p
libc = ctypes.CDLL(None, use_errno=True)
libc.connect.argtypes = [c_int, c_void_p, c_uint]
libc.mmap.restype = c_void_p
libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, c_long]
libc.munmap.argtypes = [c_void_p, c_size_t]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
assert libc.connect(s.fileno(), 1, 16) == -1
assert ctypes.get_errno() == errno.EFAULT, ctypes.get_errno()
p = libc.mmap(None, 8192, 3, 0x22, -1, 0)    # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
assert libc.munmap(p + 4096, 4096) == 0      # second page gone: 6 of 16 bytes mapped
assert libc.connect(s.fileno(), p + 4090, 16) == -1
assert ctypes.get_errno() == errno.EFAULT, ctypes.get_errno()
try:
    s.connect(("127.0.0.1", 9))
    raise SystemExit("connect succeeded")
except ConnectionRefusedError:
    pass
"#,
        move |notifier, n| {
            if i64::from(n.nr) != libc::SYS_connect {
                return Some(Reply::Continue);
            }
            let read = TargetMemory::new(n.pid).read(n.args[1], n.args[2] as usize);
            assert!(notifier.id_valid(n.id));
            let reply = match &read {
                Err(_) => Reply::Errno(libc::EFAULT),
                Ok(bytes) => match sockaddr::decode(bytes) {
                    Ok(Decoded::Inet(_)) => Reply::Errno(libc::ECONNREFUSED),
                    other => panic!("unexpected address {other:?}"),
                },
            };
            tx.send(read.map(|_| ())).unwrap();
            Some(reply)
        },
    );
    let outcomes: Vec<_> = rx.try_iter().collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert!(outcomes[0].is_err() && outcomes[1].is_err());
    assert_eq!(outcomes[2], Ok(()));
}

#[test]
fn io_uring_setup_and_x32_syscalls_return_enosys() {
    let seen = run_python(
        r#"
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
assert libc.syscall(425, 4, params) == -1 and ctypes.get_errno() == errno.ENOSYS, ctypes.get_errno()
assert libc.syscall(0x40000000 | 41, 2, 1, 0) == -1 and ctypes.get_errno() == errno.ENOSYS   # x32 socket()
"#,
        |_, _| Some(Reply::Continue),
    );
    assert!(seen.is_empty(), "nothing traps: {seen:?}");
}

#[test]
fn socket_inode_is_stable_across_dup_and_fork() {
    let (tx, rx) = mpsc::channel();
    run_python(
        r#"
import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setblocking(False)
s.getsockname()
d = s.dup()
d.getsockname()
pid = os.fork()
if pid == 0:
    s.getsockname()
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0
"#,
        move |notifier, n| {
            use saps_interceptor::fds::{fd_flags, get_fd, open_pidfd};
            if i64::from(n.nr) == libc::SYS_getsockname {
                let fd = n.args[0] as i32;
                let inode = socket_inode(n.pid, fd).unwrap();
                let dup = get_fd(open_pidfd(n.pid).unwrap().as_fd(), fd).unwrap();
                let dup_inode = std::fs::File::from(dup).metadata().unwrap().ino();
                let nonblocking = fd_flags(n.pid, fd).unwrap() & libc::O_NONBLOCK != 0;
                assert!(notifier.id_valid(n.id));
                tx.send((n.pid, fd, inode, dup_inode, nonblocking)).unwrap();
            }
            Some(Reply::Continue)
        },
    );
    // Python may call getsockname() more often than the script does; every
    // call must see the same inode.
    let seen: Vec<_> = rx.try_iter().collect();
    let inode = seen
        .first()
        .and_then(|s| s.2)
        .expect("getsockname trapped on a socket");
    assert!(
        seen.iter()
            .all(|s| s.2 == Some(inode) && s.3 == inode && s.4),
        "{seen:?}"
    );
    let pids: BTreeSet<u32> = seen.iter().map(|s| s.0).collect();
    let fds: BTreeSet<i32> = seen.iter().map(|s| s.1).collect();
    assert_eq!(pids.len(), 2, "parent and fork child: {seen:?}");
    assert_eq!(fds.len(), 2, "original and dup: {seen:?}");
}

#[test]
fn supervisor_tolerates_a_target_killed_mid_syscall() {
    let (target, notifier) =
        common::python("import socket; socket.socket().connect(('192.0.2.1', 9))");
    let n = notifier.recv().unwrap();
    let n = if i64::from(n.nr) == libc::SYS_socket {
        notifier.respond(n.id, Reply::Continue).unwrap();
        notifier.recv().unwrap()
    } else {
        n
    };
    assert_eq!(i64::from(n.nr), libc::SYS_connect);
    target.signal(libc::SIGKILL).unwrap();
    assert_eq!(
        common::wait_within_limit(&target).exit_code(),
        128 + libc::SIGKILL
    );
    assert!(!notifier.id_valid(n.id));
    assert_eq!(
        notifier.respond(n.id, Reply::Value(0)).unwrap(),
        saps_interceptor::Delivery::TargetGone
    );
}

#[test]
fn sync_wake_up_can_be_switched_on_and_off() {
    // Kernel ≥ 6.6 (this machine runs 6.18); the flag is passed by value.
    let (target, notifier) = common::python("pass");
    notifier.set_sync_wake_up(false).unwrap();
    notifier.set_sync_wake_up(true).unwrap();
    let server = common::serve(notifier, |_, _| Some(Reply::Continue));
    assert_eq!(
        common::wait_within_limit(&target),
        saps_interceptor::ExitStatus::Code(0)
    );
    let seen = server.join().expect("supervisor thread");
    assert!(seen.is_empty(), "`pass` makes no trapped call: {seen:?}");
}

#[test]
fn try_recv_would_block_when_nothing_is_pending() {
    let (target, notifier) = common::python("import socket; socket.socket().close()");
    let n = loop {
        match notifier.try_recv() {
            Ok(n) if common::is_unix_connect(&n) => {
                notifier.respond(n.id, Reply::Continue).unwrap();
            }
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = common::wait_readable(&notifier, common::LIMIT);
            }
            Err(e) => panic!("try_recv: {e}"),
        }
    };
    assert_eq!(i64::from(n.nr), libc::SYS_socket);
    assert_eq!(
        notifier.respond(n.id, Reply::Continue).unwrap(),
        saps_interceptor::Delivery::Delivered
    );
    // The script makes no other trapped call.
    assert_eq!(
        notifier.try_recv().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    assert_eq!(
        common::wait_within_limit(&target),
        saps_interceptor::ExitStatus::Code(0)
    );
}

/// 32-bit syscalls made with `int 0x80` from a 64-bit process: the socket
/// calls are refused (natively `socketcall(SYS_SOCKET, NULL)` would be
/// EFAULT and `socket` would succeed), other calls still run.
#[cfg(target_arch = "x86_64")]
#[test]
fn i386_socket_calls_are_refused_and_other_32bit_calls_run() {
    let seen = run_python(
        r#"
import ctypes, mmap, os
def int80(nr, ebx=0, ecx=0):
    code = (b"\x53"                                   # push rbx
            + b"\xb8" + nr.to_bytes(4, "little")      # mov eax, nr
            + b"\xbb" + ebx.to_bytes(4, "little")     # mov ebx, arg0
            + b"\xb9" + ecx.to_bytes(4, "little")     # mov ecx, arg1
            + b"\xcd\x80"                             # int 0x80
            + b"\x5b\xc3")                            # pop rbx; ret
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
ENOSYS = 38
assert int80(102, 1, 0) == -ENOSYS      # socketcall(SYS_SOCKET, NULL)
assert int80(359, 2, 1) == -ENOSYS      # socket(AF_INET, SOCK_STREAM)
assert int80(20) == os.getpid()         # getpid
"#,
        |_, _| Some(Reply::Continue),
    );
    assert!(seen.is_empty(), "nothing traps: {seen:?}");
}

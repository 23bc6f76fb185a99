//! Descriptors across a socketpair in batches: order and identity kept,
//! and every way a transfer can break refused.

use super::*;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::fstat;
use std::os::fd::AsFd;

/// Bound on every transfer of these tests.
const T: Duration = Duration::from_secs(10);

/// One batch of `fds` with `header`, as `send_fds` would send it.
fn send(a: &OwnedFd, b: Batch, header: &[u8], fds: &[RawFd]) {
    send_batch(a.as_fd(), b, header, fds, Instant::now() + T).unwrap();
}

fn seqpacket_pair(flags: SockFlag) -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        flags | SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

/// Raises this process's soft descriptor limit to `n` if it is lower
/// (and the hard limit allows).
fn room_for(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid pointer to a local.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// Which open file a descriptor is: device, inode, and the access mode
/// (the two ends of a pipe share an inode).
fn identity(fd: BorrowedFd<'_>) -> (u64, u64, OFlag) {
    let st = fstat(fd.as_raw_fd()).unwrap();
    let fl = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
    (st.st_dev, st.st_ino, fl & OFlag::O_ACCMODE)
}

#[test]
fn a_thousand_pipe_fds_cross_in_order_as_the_same_files() {
    room_for(4096);
    let pipes: Vec<OwnedFd> = (0..500)
        .flat_map(|_| {
            let (r, w) = nix::unistd::pipe().unwrap();
            [r, w]
        })
        .collect();
    let sent: Vec<BorrowedFd<'_>> = pipes.iter().map(|f| f.as_fd()).collect();
    let before: Vec<_> = sent.iter().map(|&f| identity(f)).collect();
    // Non-blocking ends: both calls wait with poll(2) when they must.
    let (a, b) = seqpacket_pair(SockFlag::SOCK_NONBLOCK);
    let (header, got) = std::thread::scope(|s| {
        s.spawn(|| send_fds(a.as_fd(), b"state v1", &sent, T).unwrap());
        recv_fds(b.as_fd(), 64, T).unwrap()
    });
    assert_eq!(header, b"state v1");
    assert_eq!(got.len(), 1000);
    let after: Vec<_> = got.iter().map(|f| identity(f.as_fd())).collect();
    assert!(before == after, "the same files, in the same order");
    // And the same pipes: a byte written into a received write end comes
    // out of the original read end.
    nix::unistd::write(&got[999], b"x").unwrap();
    let mut byte = [0];
    assert_eq!(nix::unistd::read(pipes[998].as_raw_fd(), &mut byte), Ok(1));
    assert_eq!(&byte, b"x");
}

#[test]
fn batches_carry_at_most_253_and_say_where_they_start() {
    let (a, b) = seqpacket_pair(SockFlag::empty());
    let null = std::fs::File::open("/dev/null").unwrap();
    send_fds(a.as_fd(), b"h", &vec![null.as_fd(); 600], T).unwrap();
    let mut buf = [0; PREFIX_LEN + 2];
    for (batch, first, count) in [(0, 0, 253), (1, 253, 253), (2, 506, 94)] {
        let (n, flags, fds) =
            recv_one::<SCM_MAX_FD>(b.as_fd(), &mut buf, Instant::now() + T).unwrap();
        assert_eq!(n, PREFIX_LEN + 1);
        assert!(!flags.intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC));
        let want = Batch {
            batch,
            first,
            count,
            total: 600,
        };
        assert_eq!(Batch::decode(&buf[..PREFIX_LEN]), Some(want));
        assert_eq!(fds.len(), count as usize);
    }
    // None: one message, with nothing attached.
    send_fds(a.as_fd(), b"none", &[], T).unwrap();
    let (header, got) = recv_fds(b.as_fd(), 4, T).unwrap();
    assert_eq!((&header[..], got.len()), (&b"none"[..], 0));
}

/// Descriptors of this process open on `path`.
fn open_on(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

/// A receiver with room for 10 descriptors gets a batch of 30: refused,
/// and the 10 the kernel installed are closed again.
#[test]
fn a_batch_whose_descriptors_did_not_all_arrive_is_refused_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("marker");
    let file = std::fs::File::create(&path).unwrap();
    let (a, b) = seqpacket_pair(SockFlag::empty());
    send_fds(a.as_fd(), b"h", &[file.as_fd(); 30], T).unwrap();
    assert_eq!(open_on(&path), 1);
    let err = recv_with_room::<10>(b.as_fd(), 1, std::time::Instant::now() + T).unwrap_err();
    assert!(matches!(err, FdPassError::Truncated { batch: 0 }), "{err}");
    drop(a);
    assert_eq!(open_on(&path), 1, "none of the installed copies is left");
}

#[test]
fn a_gap_a_false_count_an_early_close_or_a_long_header_is_refused() {
    let null = std::fs::File::open("/dev/null").unwrap();
    let raw = vec![null.as_raw_fd(); SCM_MAX_FD];
    let batch = |batch, first, count, total| Batch {
        batch,
        first,
        count,
        total,
    };

    // Batch 1 never came.
    let (a, b) = seqpacket_pair(SockFlag::empty());
    send(&a, batch(0, 0, 253, 600), b"h", &raw);
    send(&a, batch(2, 506, 94, 600), b"h", &raw[..94]);
    let err = recv_fds(b.as_fd(), 1, T).unwrap_err();
    assert!(
        matches!(
            err,
            FdPassError::Gap {
                batch: 2,
                first: 506,
                due: 1,
                due_first: 253
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "batch 2 from descriptor 506 came where batch 1 from descriptor 253 was due"
    );

    // A batch that says 253 and carries 10.
    let (a, b) = seqpacket_pair(SockFlag::empty());
    send(&a, batch(0, 0, 253, 300), b"h", &raw[..10]);
    let err = recv_fds(b.as_fd(), 1, T).unwrap_err();
    assert!(matches!(err, FdPassError::Malformed(_)), "{err}");

    // The sender closed after its first batch.
    let (a, b) = seqpacket_pair(SockFlag::empty());
    send(&a, batch(0, 0, 253, 300), b"h", &raw);
    drop(a);
    let err = recv_fds(b.as_fd(), 1, T).unwrap_err();
    assert!(
        matches!(
            err,
            FdPassError::Closed {
                received: 253,
                total: 300
            }
        ),
        "{err}"
    );

    // A later batch of another transfer (another header).
    let (a, b) = seqpacket_pair(SockFlag::empty());
    send(&a, batch(0, 0, 253, 300), b"h", &raw);
    send(&a, batch(1, 253, 47, 300), b"x", &raw[..47]);
    let err = recv_fds(b.as_fd(), 1, T).unwrap_err();
    assert!(matches!(err, FdPassError::Malformed(_)), "{err}");

    // A header longer than the receiver allows.
    let (a, b) = seqpacket_pair(SockFlag::empty());
    send_fds(a.as_fd(), b"too long", &[null.as_fd()], T).unwrap();
    let err = recv_fds(b.as_fd(), 4, T).unwrap_err();
    assert!(matches!(err, FdPassError::Malformed(_)), "{err}");
}

#[test]
fn a_peer_that_sends_nothing_costs_the_timeout_and_no_more() {
    let (_a, b) = seqpacket_pair(SockFlag::empty());
    let start = Instant::now();
    let err = recv_fds(b.as_fd(), 4, Duration::from_millis(50)).unwrap_err();
    assert!(
        matches!(&err, FdPassError::Io(e) if e.kind() == io::ErrorKind::TimedOut),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

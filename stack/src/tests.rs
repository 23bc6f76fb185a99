//! The bridge's bookkeeping without root: two smoltcp sockets connected
//! over smoltcp's loopback device, each bridged to a socketpair, driven
//! step by step (no threads, no sleeps).

use crate::bridge::{Bridge, Moved, Step};
use crate::sys;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Loopback, Medium};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};
use std::os::fd::{AsFd, OwnedFd};

/// A connected pair of smoltcp sockets, each bridged; `user_*` are the
/// ends a user of the stack would hold.
struct Rig {
    iface: Interface,
    dev: Loopback,
    sockets: SocketSet<'static>,
    server: (SocketHandle, Option<Bridge>),
    client: (SocketHandle, Option<Bridge>),
    user_server: Option<OwnedFd>,
    user_client: Option<OwnedFd>,
    ends: Vec<Step>,
    moved: Moved,
}

const BUF: usize = 16 * 1024;

fn socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; BUF]),
        tcp::SocketBuffer::new(vec![0; BUF]),
    )
}

impl Rig {
    fn new() -> Rig {
        let mut dev = Loopback::new(Medium::Ethernet);
        let cfg = Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
        let mut iface = Interface::new(cfg, &mut dev, Instant::now());
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap();
        });
        let mut sockets = SocketSet::new(vec![]);
        let s = sockets.add(socket());
        let c = sockets.add(socket());
        sockets.get_mut::<tcp::Socket>(s).listen(80).unwrap();
        let cx = iface.context();
        sockets
            .get_mut::<tcp::Socket>(c)
            .connect(cx, (IpAddress::v4(127, 0, 0, 1), 80), 49152)
            .unwrap();
        let mut rig = Rig {
            iface,
            dev,
            sockets,
            server: (s, None),
            client: (c, None),
            user_server: None,
            user_client: None,
            ends: Vec::new(),
            moved: Moved::default(),
        };
        for _ in 0..100 {
            rig.iface
                .poll(Instant::now(), &mut rig.dev, &mut rig.sockets);
            let up = |h| rig.sockets.get::<tcp::Socket>(h).state() == State::Established;
            if up(s) && up(c) {
                let (a, b) = sys::stream_pair(0).unwrap();
                let (x, y) = sys::stream_pair(0).unwrap();
                rig.server.1 = Some(Bridge::new(a));
                rig.user_server = Some(b);
                rig.client.1 = Some(Bridge::new(x));
                rig.user_client = Some(y);
                return rig;
            }
        }
        panic!("loopback handshake did not complete");
    }

    /// One round: smoltcp's poll, then both bridges pumped (the pairs
    /// treated as readable, as `poll` would report).
    fn step(&mut self) {
        self.iface
            .poll(Instant::now(), &mut self.dev, &mut self.sockets);
        for (h, b) in [&mut self.server, &mut self.client] {
            let Some(bridge) = b else { continue };
            bridge.readable = true;
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            let step = bridge.pump(s, &mut self.moved);
            if step != Step::Open {
                self.ends.push(step);
                *b = None;
            }
        }
    }

    fn steps_until(&mut self, mut done: impl FnMut(&mut Rig) -> bool) {
        for _ in 0..10_000 {
            self.step();
            if done(self) {
                return;
            }
        }
        panic!("condition not reached in 10 000 rounds");
    }
}

fn read_some(fd: &OwnedFd) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0; 64 * 1024];
    sys::read(fd.as_fd(), &mut buf).map(|n| buf[..n].to_vec())
}

#[test]
fn bytes_and_half_closes_cross_the_bridge_both_ways() {
    let mut rig = Rig::new();
    let uc = rig.user_client.take().unwrap();
    let us = rig.user_server.take().unwrap();
    sys::write(uc.as_fd(), b"hello").unwrap();
    sys::shutdown_write(uc.as_fd());
    let mut got = Vec::new();
    let mut eof = false;
    rig.steps_until(|_| {
        match read_some(&us) {
            Ok(b) if b.is_empty() => eof = true,
            Ok(b) => got.extend(b),
            Err(_) => {}
        }
        eof
    });
    assert_eq!(got, b"hello");
    // Half-closed: the server's user still answers.
    sys::write(us.as_fd(), b"bye").unwrap();
    sys::shutdown_write(us.as_fd());
    let (mut got, mut eof) = (Vec::new(), false);
    rig.steps_until(|r| {
        match read_some(&uc) {
            Ok(b) if b.is_empty() => eof = true,
            Ok(b) => got.extend(b),
            Err(_) => {}
        }
        eof && r.ends.len() == 2
    });
    assert_eq!(got, b"bye");
    assert_eq!(rig.ends, vec![Step::Done { reset: false }; 2]);
    assert_eq!(
        rig.moved,
        Moved {
            to_pair: 8,
            to_net: 8
        }
    );
}

#[test]
fn a_user_that_does_not_read_closes_the_window_and_the_writer_blocks() {
    let mut rig = Rig::new();
    let uc = rig.user_client.take().unwrap();
    let _us = rig.user_server.take().unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    // Write until the client's pair refuses and stays refusing while the
    // stack keeps running: nothing buffers without bound.
    let mut blocked_rounds = 0;
    for _ in 0..10_000 {
        match sys::write(uc.as_fd(), &chunk) {
            Ok(n) => {
                written += n;
                blocked_rounds = 0;
            }
            Err(libc::EAGAIN) => blocked_rounds += 1,
            Err(e) => panic!("write failed: {e}"),
        }
        if blocked_rounds > 100 {
            break;
        }
        rig.step();
    }
    assert!(
        blocked_rounds > 100,
        "the writer never blocked ({written} bytes taken)"
    );
    // Two pairs' kernel buffers and two smoltcp buffers, no more.
    assert!(written < 8 * 1024 * 1024, "{written} bytes taken");
    let s = rig.sockets.get::<tcp::Socket>(rig.server.0);
    assert_eq!(s.recv_queue(), BUF, "the receiver's smoltcp buffer is full");
}

#[test]
fn closing_a_pair_with_unread_data_resets_the_connection() {
    let mut rig = Rig::new();
    let uc = rig.user_client.take().unwrap();
    let us = rig.user_server.take().unwrap();
    sys::write(uc.as_fd(), b"unread").unwrap();
    rig.steps_until(|r| r.moved.to_pair == 6);
    drop(us);
    rig.steps_until(|r| r.ends.len() == 2);
    assert_eq!(rig.ends, vec![Step::Done { reset: true }; 2]);
    // The client's user: what it had was delivered, then end of file,
    // then EPIPE on write.
    assert_eq!(read_some(&uc), Ok(Vec::new()));
    assert_eq!(sys::write(uc.as_fd(), b"x"), Err(libc::EPIPE));
}

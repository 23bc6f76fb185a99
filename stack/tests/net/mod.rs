//! The namespaces of saps-stack's tests: `gw` holds the TAP (the test's
//! Stack owns it; the kernel there routes), `client` reaches the single
//! address through a veth. Root and /dev/net/tun are needed: without them
//! a test skips with a reason (and fails under CI=true).

#![allow(dead_code)]

use saps_stack::{Config, Connection, Listener, Stack};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The single address, on the TAP's link (TEST-NET-1).
pub const SINGLE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The kernel's side of the TAP, the stack's gateway.
pub const TAP_GW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The client namespace's address (TEST-NET-2) and its router.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const ROUTER: &str = "198.51.100.1";

/// Two namespaces: `gw` (the TAP, forwarding) and `client`, joined by a
/// veth; removed when dropped. The stack is dropped first (field order).
pub struct Net {
    stack: Option<Stack>,
    pub gw: String,
    pub client: String,
    pub tap: String,
}

pub use saps_tests::sh;

/// Runs `f` in a thread that joined namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

impl Net {
    /// The layout and a stack on its TAP, or `None` (reason printed).
    pub fn new(config: impl FnOnce(&mut Config)) -> Option<Net> {
        if !nix::unistd::Uid::effective().is_root() {
            saps_tests::cannot_run("saps-stack's TAP tests need root");
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            saps_tests::cannot_run("no /dev/net/tun (TUN/TAP driver)");
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let mut net = Net {
            stack: None,
            gw: format!("sstk-g{id}"),
            client: format!("sstk-c{id}"),
            tap: format!("stap{id}"),
        };
        let (g, c) = (net.gw.clone(), net.client.clone());
        let veth = format!("ssv{id}");
        let client = CLIENT.to_string();
        if let Err(e) = saps_tests::client_behind_gateway(&g, &c, &veth, ROUTER, &client) {
            saps_tests::cannot_run(&format!("cannot make the namespaces ({e})"));
            return None;
        }
        let mut cfg = Config::new(SINGLE, 24, Some(TAP_GW));
        config(&mut cfg);
        let tap = net.tap.clone();
        let name = tap.clone();
        // The TAP is made in `gw` by opening it from a thread there.
        let stack = in_ns(&g, move || Stack::open_tap(&name, cfg))
            .join()
            .unwrap();
        net.stack = Some(stack.expect("open the TAP"));
        for s in [
            format!("ip -n {g} addr add {TAP_GW}/24 dev {tap}"),
            format!("ip -n {g} link set {tap} up"),
        ] {
            sh(&s).expect("set the TAP up");
        }
        Some(net)
    }

    pub fn stack(&self) -> &Stack {
        self.stack.as_ref().unwrap()
    }

    /// Runs `f` in the client namespace.
    pub fn client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        in_ns(&self.client, f)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stack.take();
        let _ = sh(&format!("ip netns del {}", self.gw));
        let _ = sh(&format!("ip netns del {}", self.client));
    }
}

/// Waits (poll with a deadline) for `fd` to be readable.
pub fn readable(fd: &impl AsFd, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut p = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
    nix::poll::poll(&mut p, ms).is_ok_and(|n| n > 0)
}

/// The next connection of `l`, within `within`.
pub fn accept(l: &Listener, within: Duration) -> Connection {
    let deadline = Instant::now() + within;
    loop {
        if let Some(c) = l.try_accept() {
            return c;
        }
        assert!(
            readable(l, deadline),
            "no connection accepted in {within:?}"
        );
    }
}

/// A connection's user end as a blocking stream with a timeout.
pub fn stream(c: Connection) -> UnixStream {
    let s = UnixStream::from(c.fd);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

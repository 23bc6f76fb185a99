//! What smoltcp's walk of the whole socket set costs per packet: one bulk
//! transfer between two sockets over a loopback device with the TAP's
//! frame size, with 0, 100, 1 000 and 10 000 idle sockets in the same
//! set (listening on other ports, added before the two, so every
//! incoming segment walks past them); then the same transfer routed as
//! the engine routes frames (each frame parsed into its key and looked up
//! in an index holding every socket, the two sockets in a shard of their
//! own, the idle ones spread over 8-socket shards that nothing polls, as
//! the engine sizes them);
//! then the memory a listening socket of a backlog pool holds with the
//! default buffers. Run in release:
//! `cargo run --release -p saps-stack --example socket_set_cost`.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpCidr, IpProtocol, Ipv4Address,
    Ipv4Packet, TcpPacket,
};
use std::collections::{HashMap, VecDeque};

/// smoltcp's loopback with a 1500-byte IP MTU, counting frames.
struct Wire {
    lo: Loopback,
    frames: u64,
}

impl Device for Wire {
    type RxToken<'a> = <Loopback as Device>::RxToken<'a>;
    type TxToken<'a> = <Loopback as Device>::TxToken<'a>;
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = self.lo.capabilities();
        c.max_transmission_unit = 1514;
        c
    }
    fn receive(&mut self, t: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.lo.receive(t)
    }
    fn transmit(&mut self, t: Instant) -> Option<Self::TxToken<'_>> {
        self.frames += 1;
        self.lo.transmit(t)
    }
}

fn socket(size: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; size]),
        tcp::SocketBuffer::new(vec![0; size]),
    )
}

/// Nanoseconds per frame moving `bytes` with `idle` other sockets.
/// A server listening on port 80 of `addr` and a client connecting to it
/// (the handshake runs in the caller's loop): (server, client).
fn connected(
    sockets: &mut SocketSet<'static>,
    iface: &mut Interface,
    addr: Ipv4Address,
) -> (SocketHandle, SocketHandle) {
    let server = sockets.add(socket(64 * 1024));
    let client = sockets.add(socket(64 * 1024));
    sockets.get_mut::<tcp::Socket>(server).listen(80).unwrap();
    sockets
        .get_mut::<tcp::Socket>(client)
        .connect(iface.context(), (IpAddress::Ipv4(addr), 80), 49152)
        .unwrap();
    (server, client)
}

/// The client sends what its buffer takes (at most `left`) and the server
/// reads what arrived: (sent, read).
fn move_bytes(
    sockets: &mut SocketSet<'_>,
    (client, server): (SocketHandle, SocketHandle),
    left: usize,
) -> (usize, usize) {
    let mut sent = 0;
    let c = sockets.get_mut::<tcp::Socket>(client);
    if c.can_send() && left > 0 {
        sent = c
            .send(|b| {
                let n = b.len().min(left);
                (n, n)
            })
            .unwrap();
    }
    let s = sockets.get_mut::<tcp::Socket>(server);
    let got = if s.can_recv() {
        s.recv(|b| (b.len(), b.len())).unwrap()
    } else {
        0
    };
    (sent, got)
}

fn run(idle: usize, bytes: usize) -> (f64, f64) {
    let mut dev = Wire {
        lo: Loopback::new(Medium::Ethernet),
        frames: 0,
    };
    let cfg = Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
    let mut iface = Interface::new(cfg, &mut dev, Instant::now());
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap();
    });
    let mut sockets = SocketSet::new(vec![]);
    for i in 0..idle {
        // Small buffers: idle sockets, as the backlog pool holds them.
        let h = sockets.add(socket(1024));
        sockets
            .get_mut::<tcp::Socket>(h)
            .listen(10_000 + i as u16)
            .unwrap();
    }
    let (server, client) = connected(&mut sockets, &mut iface, Ipv4Address::new(127, 0, 0, 1));
    let start = std::time::Instant::now();
    dev.frames = 0;
    let (mut sent, mut got) = (0, 0);
    while got < bytes {
        iface.poll(Instant::now(), &mut dev, &mut sockets);
        let (s, g) = move_bytes(&mut sockets, (client, server), bytes - sent);
        sent += s;
        got += g;
    }
    let t = start.elapsed();
    (
        t.as_nanos() as f64 / dev.frames as f64,
        bytes as f64 / 1e6 / t.as_secs_f64(),
    )
}

/// A loopback whose next frame can be looked at before smoltcp takes it
/// (as the engine's `Tap::peek`).
#[derive(Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    sent: u64,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Queue);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.frames.push_back(b);
        self.0.sent += 1;
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.max_transmission_unit = 1514;
        c.medium = Medium::Ethernet;
        c
    }
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let f = self.frames.pop_front()?;
        Some((Rx(f), Tx(self)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(self))
    }
}

type Key = (Ipv4Address, u16, u16);

/// The engine's route of a frame: (remote address, remote port, local
/// port) of a TCP segment to `local`.
fn key(frame: &[u8], local: Ipv4Address) -> Option<Key> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.dst_addr() != local {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((ip.src_addr(), tcp.src_port(), tcp.dst_port()))
}

/// [`run`] routed: every frame keyed and looked up in an index of all
/// `idle + 2` sockets, then given to the shard of the two; the idle
/// sockets sit in shards of 8 that no frame reaches and nothing polls.
fn run_routed(idle: usize, bytes: usize) -> (f64, f64) {
    let mut dev = Queue::default();
    let cfg = Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
    let mut iface = Interface::new(cfg, &mut dev, Instant::now());
    let local = Ipv4Address::new(127, 0, 0, 1);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::Ipv4(local), 8)).unwrap();
    });
    let mut idle_shards: Vec<SocketSet> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for i in 0..idle {
        if i % 8 == 0 {
            idle_shards.push(SocketSet::new(vec![]));
        }
        let shard = idle_shards.last_mut().unwrap();
        let h = shard.add(socket(1024));
        let port = 10_000 + i as u16;
        shard.get_mut::<tcp::Socket>(h).listen(port).unwrap();
        // As an established connection would be indexed.
        index.insert((Ipv4Address::new(127, 0, 1, 1), port, 80), 1 + i / 8);
    }
    let mut sockets = SocketSet::new(vec![]);
    let (server, client) = connected(&mut sockets, &mut iface, local);
    index.insert((local, 49152, 80), 0);
    index.insert((local, 80, 49152), 0);
    let start = std::time::Instant::now();
    dev.sent = 0;
    let (mut sent, mut got, mut routed) = (0, 0, 0u64);
    while got < bytes {
        let now = Instant::now();
        while let Some(f) = dev.frames.front() {
            // The handshake's SYN is not indexed: the listen shard, here
            // the same set.
            let shard = key(f, local).and_then(|k| index.get(&k)).copied();
            routed += u64::from(shard == Some(0));
            iface.poll_ingress_single(now, &mut dev, &mut sockets);
        }
        iface.poll_egress(now, &mut dev, &mut sockets);
        let (s, g) = move_bytes(&mut sockets, (client, server), bytes - sent);
        sent += s;
        got += g;
    }
    let t = start.elapsed();
    assert!(routed > 0 && idle_shards.len() == idle.div_ceil(8));
    (
        t.as_nanos() as f64 / dev.sent as f64,
        bytes as f64 / 1e6 / t.as_secs_f64(),
    )
}

/// The process's resident set, KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    let bytes = 64 << 20;
    println!("idle sockets | ns per frame | MB/s (64 MiB, 1500-byte MTU, loopback)");
    for idle in [0, 100, 1_000, 10_000] {
        let (ns, mbs) = run(idle, bytes);
        println!("{idle:>12} | {ns:>12.0} | {mbs:>8.1}");
    }
    println!("routed as the engine does (index lookup per frame, a shard of its own):");
    println!("idle sockets | ns per frame | MB/s");
    for idle in [0, 100, 1_000, 10_000] {
        let (ns, mbs) = run_routed(idle, bytes);
        println!("{idle:>12} | {ns:>12.0} | {mbs:>8.1}");
    }
    // 10 000 listening sockets, as a backlog pool holds them.
    for kib in [64, 256] {
        let before = rss_kib();
        let mut sockets = SocketSet::new(vec![]);
        for i in 0..10_000u16 {
            let h = sockets.add(socket(kib * 1024));
            sockets
                .get_mut::<tcp::Socket>(h)
                .listen(10_000 + i)
                .unwrap();
        }
        let after = rss_kib();
        println!(
            "10 000 listening sockets, {kib} KiB + {kib} KiB buffers: {} KiB resident ({} bytes each)",
            after.saturating_sub(before),
            after.saturating_sub(before) * 1024 / 10_000
        );
    }
}

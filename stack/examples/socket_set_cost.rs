//! What smoltcp's walk of the whole socket set costs per packet: one bulk
//! transfer between two sockets over a loopback device with the TAP's
//! frame size, with 0, 100, 1 000 and 10 000 idle sockets in the same
//! set (listening on other ports, added before the two, so every
//! incoming segment walks past them); then the memory a listening socket
//! of a backlog pool holds with the default buffers. Run in release:
//! `cargo run --release -p saps-stack --example socket_set_cost`.

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

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
    let server = sockets.add(socket(64 * 1024));
    let client = sockets.add(socket(64 * 1024));
    sockets.get_mut::<tcp::Socket>(server).listen(80).unwrap();
    let cx = iface.context();
    sockets
        .get_mut::<tcp::Socket>(client)
        .connect(cx, (IpAddress::v4(127, 0, 0, 1), 80), 49152)
        .unwrap();
    let start = std::time::Instant::now();
    dev.frames = 0;
    let (mut sent, mut got) = (0, 0);
    while got < bytes {
        iface.poll(Instant::now(), &mut dev, &mut sockets);
        let c = sockets.get_mut::<tcp::Socket>(client);
        if c.can_send() && sent < bytes {
            sent += c.send(|b| (b.len(), b.len())).unwrap();
        }
        let s = sockets.get_mut::<tcp::Socket>(server);
        if s.can_recv() {
            got += s.recv(|b| (b.len(), b.len())).unwrap();
        }
    }
    let t = start.elapsed();
    (
        t.as_nanos() as f64 / dev.frames as f64,
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

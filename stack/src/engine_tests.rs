//! The engine's routing without root: a `SOCK_SEQPACKET` pair stands for
//! the TAP (one frame per message), frames are built with smoltcp's wire
//! types and the loop is turned by hand.

use super::*;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetRepr, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber,
};
use std::os::fd::OwnedFd;

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];

struct Rig {
    engine: Engine,
    /// The far end of the TAP.
    wire: OwnedFd,
    ready: Arc<Mailbox<Connection>>,
    users: Vec<Connection>,
}

impl Rig {
    fn new() -> Rig {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (tap, wire) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut config = Config::new(Ipv4Addr::new(192, 0, 2, 2), 24, None);
        // Four data shards.
        config.max_sockets = 4 * PER_SHARD;
        let tap = Tap::new(tap, config.mtu).unwrap();
        let wake = Arc::new(Wake::new().unwrap());
        let (_commands, rx) = std::sync::mpsc::sync_channel(4);
        let stop = Arc::new(AtomicBool::new(false));
        let mut engine = Engine::new(config, tap, rx, wake.clone(), stop).unwrap();
        assert_eq!(engine.shards.len(), 5);
        let ready = Arc::new(Mailbox::new(16, wake).unwrap());
        engine.listen(80, 16, ready.clone()).unwrap();
        let mut rig = Rig {
            engine,
            wire,
            ready,
            users: Vec::new(),
        };
        rig.send(&rig.arp());
        rig.engine.turn();
        let replies = rig.replies();
        assert!(
            replies.iter().any(|f| is_arp(f)),
            "the ARP request answered"
        );
        rig
    }

    fn send(&self, frame: &[u8]) {
        sys::write(self.wire.as_fd(), frame).unwrap();
    }

    /// The frames the engine wrote since the last call.
    fn replies(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0; 2048];
        while let Ok(n) = sys::read(self.wire.as_fd(), &mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn eth(&self, ethertype: EthernetProtocol) -> EthernetRepr {
        EthernetRepr {
            src_addr: EthernetAddress(CLIENT_MAC),
            dst_addr: EthernetAddress(self.engine.config.mac),
            ethertype,
        }
    }

    /// The client's ARP request for the stack's address.
    fn arp(&self) -> Vec<u8> {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(CLIENT_MAC),
            source_protocol_addr: CLIENT,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: self.engine.config.address,
        };
        let eth = self.eth(EthernetProtocol::Arp);
        let mut buf = vec![0; eth.buffer_len() + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        buf
    }

    /// A segment from the client's port `port` to the stack's port 80.
    fn segment(
        &self,
        port: u16,
        control: TcpControl,
        seq: i32,
        ack: Option<i32>,
        payload: &[u8],
    ) -> Vec<u8> {
        let local = self.engine.config.address;
        segment(
            (CLIENT, port),
            (local, 80),
            &self.eth(EthernetProtocol::Ipv4),
            control,
            seq,
            ack,
            payload,
        )
    }

    /// A client's handshake from `port`; the connection queued for accept.
    fn connect(&mut self, port: u16) -> i32 {
        self.send(&self.segment(port, TcpControl::Syn, 1000, None, &[]));
        self.engine.turn();
        let synack = self
            .replies()
            .into_iter()
            .find_map(|f| {
                let eth = EthernetFrame::new_checked(&f[..]).ok()?;
                let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
                let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
                (tcp.syn() && tcp.ack() && tcp.dst_port() == port).then(|| tcp.seq_number().0)
            })
            .expect("a SYN-ACK");
        self.send(&self.segment(port, TcpControl::None, 1001, Some(synack + 1), &[]));
        self.engine.turn();
        self.users
            .push(self.ready.pop().expect("the connection queued"));
        synack + 1
    }

    fn shard_of(&self, port: u16) -> Option<usize> {
        let id = self.engine.index.get(&(CLIENT, port, 80))?;
        Some(self.engine.slots[id].shard)
    }
}

#[allow(clippy::too_many_arguments)]
fn segment(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    eth: &EthernetRepr,
    control: TcpControl,
    seq: i32,
    ack: Option<i32>,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.1,
        dst_port: dst.1,
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: 65535,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: src.0,
        dst_addr: dst.0,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut p, &caps);
    let mut t = TcpPacket::new_unchecked(p.payload_mut());
    tcp.emit(&mut t, &src.0.into(), &dst.0.into(), &caps);
    buf
}

#[test]
fn a_frame_is_keyed_by_its_remote_end_and_local_port() {
    let local = Ipv4Addr::new(192, 0, 2, 2);
    let eth = EthernetRepr {
        src_addr: EthernetAddress(CLIENT_MAC),
        dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
        ethertype: EthernetProtocol::Ipv4,
    };
    let f = segment(
        (CLIENT, 40000),
        (local, 80),
        &eth,
        TcpControl::Syn,
        7,
        None,
        b"x",
    );
    assert_eq!(frame_key(&f, local), Some((CLIENT, 40000, 80)));
    // To another address, truncated, not IPv4: not routed.
    assert_eq!(frame_key(&f, Ipv4Addr::new(192, 0, 2, 3)), None);
    assert_eq!(frame_key(&f[..30], local), None);
    let mut arp = f.clone();
    EthernetFrame::new_unchecked(&mut arp[..]).set_ethertype(EthernetProtocol::Arp);
    assert_eq!(frame_key(&arp, local), None);
    assert!(is_arp(&arp) && !is_arp(&f));
}

#[test]
fn an_accepted_connection_moves_to_a_data_shard_indexed_and_leaves_the_index_when_closed() {
    let mut rig = Rig::new();
    assert!(rig.engine.index.is_empty());
    let seq = rig.connect(40000);
    let shard = rig.shard_of(40000).expect("indexed once accepted");
    assert_ne!(shard, LISTEN);
    assert_eq!(rig.engine.shards[shard].ids.len(), 1);
    // The pool is refilled in the listen shard (the accept made room).
    rig.engine.turn();
    assert_eq!(rig.engine.shards[LISTEN].ids.len(), 16);
    // Bytes from the client reach the user's end through the data shard.
    rig.send(&rig.segment(40000, TcpControl::Psh, 1001, Some(seq), b"hello"));
    rig.engine.turn();
    let mut buf = [0; 16];
    let n = sys::read(rig.users[0].fd.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // The client's reset ends it: out of its shard and of the index.
    rig.send(&rig.segment(40000, TcpControl::Rst, 1006, None, &[]));
    rig.engine.turn();
    assert!(rig.shard_of(40000).is_none());
    assert!(rig.engine.index.is_empty());
    assert!(rig.engine.shards[shard].ids.is_empty());
    assert_eq!(rig.engine.count, 16);
    assert_eq!(rig.engine.resets, 1);
}

#[test]
fn only_the_shard_a_frame_went_to_is_polled_for_egress() {
    let mut rig = Rig::new();
    let seq = rig.connect(40000);
    rig.connect(40001);
    let (a, b) = (rig.shard_of(40000).unwrap(), rig.shard_of(40001).unwrap());
    assert_ne!(a, b, "spread over the data shards");
    rig.engine.turn();
    let before = rig.engine.egress_passes.clone();
    rig.send(&rig.segment(40000, TcpControl::Psh, 1001, Some(seq), b"ping"));
    rig.engine.turn();
    let after = &rig.engine.egress_passes;
    assert!(after[a] > before[a], "the shard that got the frame");
    for i in (0..after.len()).filter(|&i| i != a) {
        assert_eq!(after[i], before[i], "shard {i} is clean and not due");
    }
    // The bytes reached their user; the ACK is delayed: the shard has a
    // deadline.
    let mut buf = [0; 16];
    let n = sys::read(rig.users[0].fd.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    assert!(rig.engine.shards[a].at.is_some());
}

#[test]
fn a_shard_whose_deadline_comes_is_polled_without_a_frame() {
    let mut rig = Rig::new();
    let seq = rig.connect(40000);
    let a = rig.shard_of(40000).unwrap();
    // A delay no slow machine outruns between two turns.
    let id = rig.engine.index[&(CLIENT, 40000, 80)];
    rig.engine
        .socket_mut(id)
        .set_ack_delay(Some(SDuration::from_millis(300)));
    rig.engine.turn();
    rig.replies();
    rig.send(&rig.segment(40000, TcpControl::Psh, 1001, Some(seq), b"ping"));
    rig.engine.turn();
    // The bridge moved the bytes to the pair: one more egress, then
    // nothing to do but smoltcp's delayed ACK, a deadline in the heap.
    rig.engine.turn();
    assert!(rig.replies().is_empty(), "the ACK is delayed");
    let at = rig.engine.shards[a].at.expect("the delayed ACK's deadline");
    assert!(rig.engine.dirty.is_empty());
    let passes = rig.engine.egress_passes[a];
    while SInstant::now() <= at {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    rig.engine.turn();
    assert_eq!(rig.engine.egress_passes[a], passes + 1);
    let acked = rig
        .replies()
        .iter()
        .any(|f| frame_ack(f).is_some_and(|(port, ack)| port == 40000 && ack == 1005));
    assert!(acked, "the delayed ACK went out at its deadline");
}

/// The destination port and acknowledgment number of a TCP frame.
fn frame_ack(f: &[u8]) -> Option<(u16, i32)> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    tcp.ack().then(|| (tcp.dst_port(), tcp.ack_number().0))
}

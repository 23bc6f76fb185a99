//! The stack's bounds and addresses, each with the default a careful
//! operator would choose (docs/stack.md "Bounds").

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::time::Duration;

/// How a [`crate::Stack`] is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The single address, and its prefix length on the TAP's link.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The next hop for everything off that link (the TAP's kernel side
    /// or a router behind it); `None`: on-link only.
    pub gateway: Option<Ipv4Addr>,
    /// The stack's Ethernet address on the TAP (locally administered).
    pub mac: [u8; 6],
    /// The IP MTU of the TAP's link.
    pub mtu: usize,
    /// Bound on smoltcp sockets: connections, listening sockets of every
    /// backlog pool and pending connects together (`maxconn`).
    pub max_sockets: usize,
    /// smoltcp's receive and send buffer per socket, bytes (the receive
    /// buffer is the largest window the stack advertises).
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    /// `SO_SNDBUF` of each end of a bridge's socketpair (0: the kernel's).
    pub pair_buffer: usize,
    /// Largest backlog a listener may ask for (`somaxconn`).
    pub max_backlog: u32,
    /// Local ports for outbound connects.
    pub ephemeral_ports: RangeInclusive<u16>,
    /// An outbound connect not established by then fails with ETIMEDOUT.
    pub connect_timeout: Duration,
    /// A connection whose peer stops answering (no ACK of sent data, no
    /// answer to keep-alives) is reset after this long.
    pub idle_timeout: Duration,
    /// Keep-alive probes on idle connections, this often.
    pub keep_alive: Duration,
    /// Commands (listen, connect, stats) queued for the stack's thread.
    pub command_queue: usize,
    /// How long a caller waits for the thread's answer to a command.
    pub command_timeout: Duration,
}

impl Config {
    /// The defaults for `address`/`prefix_len` behind `gateway`.
    pub fn new(address: Ipv4Addr, prefix_len: u8, gateway: Option<Ipv4Addr>) -> Config {
        Config {
            address,
            prefix_len,
            gateway,
            mac: [0x02, 0x53, 0x41, 0x50, 0x53, 0x01],
            mtu: 1500,
            max_sockets: 4096,
            rx_buffer: 64 * 1024,
            tx_buffer: 64 * 1024,
            pair_buffer: 0,
            max_backlog: 4096,
            ephemeral_ports: 32768..=60999,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            keep_alive: Duration::from_secs(60),
            command_queue: 1024,
            command_timeout: Duration::from_secs(5),
        }
    }
}

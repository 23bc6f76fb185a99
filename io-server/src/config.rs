//! The io-server's settings (DESIGN.md "Interfaces"). The same struct is the
//! clap flags and the TOML file of `--config`; flags given on the command
//! line override the file.

use crate::allow::AllowPorts;
use clap::{Args, ValueEnum};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// Default control socket of `io-server status` / `io-server weight`.
pub const DEFAULT_CONTROL: &str = "/run/saps-io-server.ctl";
/// Default grace period of a graceful shutdown, in seconds.
pub const DEFAULT_SHUTDOWN_TIMEOUT: u64 = 30;
/// Default bound on an upgrade's handover (`--upgrade-timeout`).
pub const DEFAULT_UPGRADE_TIMEOUT: u64 = 10;
/// Default `--handshake-timeout`, in seconds: the protocol's own deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: u64 = saps_fabric::channel::HANDSHAKE_TIMEOUT.as_secs();
/// Default `--max-handshakes`: well above a cluster's nodes (re)joining at
/// once, well below the descriptors an io-server has.
pub const DEFAULT_MAX_HANDSHAKES: u32 = 64;
/// Default `--max-handshakes-per-source`: a host runs a few nodes; one
/// address cannot take the whole of `--max-handshakes`.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 8;
/// Default `--node-ping-interval`, in seconds.
pub const DEFAULT_NODE_PING_INTERVAL: u64 = saps_fabric::channel::DEFAULT_PING_INTERVAL.as_secs();
/// Default `--node-timeout`, in seconds.
pub const DEFAULT_NODE_TIMEOUT: u64 = saps_fabric::channel::DEFAULT_PEER_TIMEOUT.as_secs();

/// Default `--max-window`: the largest `B_r` a node may announce.
pub const DEFAULT_MAX_WINDOW: u32 = 16 * 1024 * 1024;
/// Default `--max-weight`, the top of LVS's and haproxy's weight range.
pub const DEFAULT_MAX_WEIGHT: u32 = 256;
/// Default `--max-node-output`: what may wait to go to one node before
/// its channel is no longer read.
pub const DEFAULT_MAX_NODE_OUTPUT: u32 = 16 * 1024 * 1024;
/// Default `--max-node-requests`: a node's requests the io-server works
/// on at once before it stops reading that node.
pub const DEFAULT_MAX_NODE_REQUESTS: u32 = 1024;
/// Default `--client-idle-timeout`, in seconds: LVS's timeout of an
/// established TCP connection (`ipvsadm --set 900 …`). A layer-4 gateway
/// carries ssh, database and long-poll sessions, which an HTTP-sized
/// `timeout client` (haproxy's example, 50 s) would cut.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: u64 = 900;
/// Default `--half-closed-timeout`, in seconds: the kernel's FIN_WAIT2
/// bound (`tcp_fin_timeout`), between haproxy's usual `timeout
/// client-fin` (30 s) and LVS's `tcpfin` (120 s).
pub const DEFAULT_HALF_CLOSED_TIMEOUT: u64 = 60;
/// Default `--connect-timeout`, in seconds: room for five SYNs (the
/// kernel gives up after seven, about 127 s); haproxy's usual 5 s is for
/// a backend on the same LAN, not a destination on the Internet.
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 30;
/// Default `--node-request-timeout`, in seconds: longer than
/// `--node-timeout`, so a node that is only slow is not given up before
/// one that is dead is dropped.
pub const DEFAULT_NODE_REQUEST_TIMEOUT: u64 = 10;

/// Default `--metrics-interval`, in milliseconds: scrapes within a
/// second of each other share one snapshot (Prometheus scrapes every 15 s
/// by default; two HA scrapers, or a dashboard polling, cost one
/// collection a second at most).
pub const DEFAULT_METRICS_INTERVAL: u64 = 1000;
/// Default `--metrics-timeout`, in seconds: Prometheus's own default
/// `scrape_timeout`, beyond which its scrape has failed anyway.
pub const DEFAULT_METRICS_TIMEOUT: u64 = 10;
/// Default `--metrics-max-connections`: a few scrapers (an HA pair, an
/// operator's curl) with room to spare; each one beyond waits in the
/// kernel's accept queue.
pub const DEFAULT_METRICS_MAX_CONNECTIONS: u32 = 16;
/// Default `--metrics-max-request`, in bytes: a scraper's request line
/// and headers are a few hundred bytes; haproxy's whole request buffer
/// (`tune.bufsize`) is 16 KiB.
pub const DEFAULT_METRICS_MAX_REQUEST: u32 = 8192;

/// Default `--max-conn-per-node`: no limit of its own, as haproxy's
/// server `maxconn` and LVS's upper threshold (0); what a node holds
/// unaccepted is bounded by its program's listen backlog.
pub const DEFAULT_MAX_CONN_PER_NODE: u32 = 0;
/// Default `--max-conn-per-group`: 0, derived from the io-server's
/// descriptor limit as haproxy derives its global `maxconn` from
/// `ulimit -n` (`groups::Limits::new`).
pub const DEFAULT_MAX_CONN_PER_GROUP: u32 = 0;
/// Default `--max-queue`: clients one group keeps waiting for a member
/// (beyond, they wait in the kernel's accept queue).
pub const DEFAULT_MAX_QUEUE: u32 = 1024;
/// Default `--queue-timeout`, in seconds: haproxy's `timeout queue` of
/// the configuration distributions ship (1m).
pub const DEFAULT_QUEUE_TIMEOUT: u64 = 60;

/// Default `--tap-prefix`: a /24 around the single address on the TAP's link.
pub const DEFAULT_TAP_PREFIX: u8 = 24;
/// Default `--stack-max-sockets`: saps-stack's own default, smoltcp
/// sockets of every kind together (docs/stack.md "Bounds").
pub const DEFAULT_STACK_MAX_SOCKETS: usize = 4096;
/// Default `--stack-buffer`: saps-stack's receive and send buffer per
/// socket (the largest window it advertises), 64 KiB.
pub const DEFAULT_STACK_BUFFER: usize = 64 * 1024;
/// Default `--stack-max-backlog`: the largest listen backlog on the stack
/// (the kernel's `somaxconn`).
pub const DEFAULT_STACK_MAX_BACKLOG: u32 = 4096;
/// Default `--stack-idle-timeout`, in seconds: a connection whose peer
/// stops answering (data unacknowledged, keep-alives unanswered) is reset
/// after this long.
pub const DEFAULT_STACK_IDLE_TIMEOUT: u64 = 300;
/// Default `--stack-keepalive`, in seconds: keep-alive probes on idle
/// connections this often.
pub const DEFAULT_STACK_KEEPALIVE: u64 = 60;

/// `--scheduler`: how a listener group picks a member per client connection.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// Round robin: members in turn.
    #[default]
    Rr,
    /// Weighted round robin: in proportion to the weights.
    Wrr,
    /// Least connection: fewest live connections.
    Lc,
    /// Weighted least connection: fewest live connections per weight.
    Wlc,
    /// Modified WLC (CSSNS): fewest bytes still to deliver per weight.
    Mwlc,
    /// Source hashing: a client address always goes to the same member.
    Sh,
}

impl SchedulerKind {
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Rr => "rr",
            SchedulerKind::Wrr => "wrr",
            SchedulerKind::Lc => "lc",
            SchedulerKind::Wlc => "wlc",
            SchedulerKind::Mwlc => "mwlc",
            SchedulerKind::Sh => "sh",
        }
    }
}

/// `--stack`: which TCP/IP stack serves clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    /// The host's Linux TCP stack.
    #[default]
    Kernel,
    /// smoltcp on a TAP device (--tap or --tap-fd), in user space.
    Smoltcp,
}

/// Everything the io-server needs to start.
#[derive(Debug, Clone, Args, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where application nodes connect: unix:/PATH, tcp://HOST:PORT or
    /// rdma://HOST:PORT (rdma needs a build with --features rdma). Repeat
    /// for several.
    #[arg(long = "fabric", value_name = "URL")]
    pub fabric: Vec<String>,
    /// The single address: client-facing listeners bind it and outbound
    /// connections leave from it.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub address: IpAddr,
    /// How each listener group picks a node for a new client connection.
    #[arg(long, value_enum, value_name = "NAME", default_value_t)]
    pub scheduler: SchedulerKind,
    /// The TCP/IP stack that serves clients.
    #[arg(long, value_enum, value_name = "STACK", default_value_t)]
    pub stack: Stack,
    /// TAP device for `--stack smoltcp` (opened, or created, in the
    /// io-server's network namespace; the operator sets its link up).
    #[arg(long, value_name = "NAME", conflicts_with = "tap_fd")]
    pub tap: Option<String>,
    /// An open TAP device for `--stack smoltcp`, inherited as descriptor N
    /// (opened with IFF_TAP|IFF_NO_PI by a privileged helper, so the
    /// io-server needs no CAP_NET_ADMIN).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(3..))]
    pub tap_fd: Option<i32>,
    /// Prefix length of --address on the TAP's link (`--stack smoltcp`).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TAP_PREFIX, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub tap_prefix: u8,
    /// Next hop for destinations off the TAP's link (`--stack smoltcp`;
    /// without it only on-link peers are reachable).
    #[arg(long, value_name = "IP")]
    pub tap_gateway: Option<Ipv4Addr>,
    /// Most smoltcp sockets at once (`--stack smoltcp`): connections,
    /// the listening sockets of every listener's backlog pool and pending
    /// connects together; past it new clients are refused.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STACK_MAX_SOCKETS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16..=1_000_000))]
    pub stack_max_sockets: usize,
    /// Receive and send buffer of each smoltcp socket, bytes (`--stack
    /// smoltcp`): the largest window the stack advertises, and what an
    /// idle connection holds in memory each way.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_STACK_BUFFER, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(4096..=16 << 20))]
    pub stack_buffer: usize,
    /// Largest listen backlog on the stack (`--stack smoltcp`; a larger
    /// one is clamped, as by the kernel's somaxconn).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STACK_MAX_BACKLOG, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub stack_max_backlog: u32,
    /// A stack connection whose peer stops answering is reset after SECS
    /// (`--stack smoltcp`).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_STACK_IDLE_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    pub stack_idle_timeout: u64,
    /// Keep-alive probes on idle stack connections every SECS (`--stack
    /// smoltcp`).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_STACK_KEEPALIVE, value_parser = clap::value_parser!(u64).range(1..))]
    pub stack_keepalive: u64,
    /// File holding the shared token nodes must prove (surrounding
    /// whitespace is ignored).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The token itself (embedded use and config files; on the command
    /// line use --token-file so it does not show in `ps`).
    #[arg(skip)]
    pub token: Option<String>,
    /// Ports nodes may bind and listen on, e.g. 80,443,8000-9000
    /// (default: any). Others get EACCES.
    #[arg(long, value_name = "RANGES")]
    pub allow_ports: Option<AllowPorts>,
    /// Unix socket for `io-server status` and `io-server weight`
    /// [default: /run/saps-io-server.ctl].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve metrics over HTTP on this address: `GET /metrics` in
    /// Prometheus's text format, `GET /` the status report.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// A metrics snapshot serves every scrape for this many milliseconds
    /// before the next scrape takes a new one.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_METRICS_INTERVAL, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub metrics_interval: u64,
    /// A metrics connection must send its request, and take the answer,
    /// each within this many seconds, or it is closed.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_METRICS_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub metrics_timeout: u64,
    /// Metrics connections served at once; more wait in the kernel's
    /// accept queue.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_METRICS_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub metrics_max_connections: u32,
    /// Largest metrics request (request line and headers), in bytes;
    /// a larger one is answered 431 and closed.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_METRICS_MAX_REQUEST, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub metrics_max_request: u32,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT)]
    pub shutdown_timeout: u64,
    /// `io-server upgrade`: how long the old and the new process may each
    /// wait for the other at each step of the handover; past it the old
    /// one goes on serving (before the commit) or exits (after it). The
    /// nodes' quiesce takes at most half of it and never more than 3 s
    /// (frozen, the io-server answers no node's pings).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_UPGRADE_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub upgrade_timeout: u64,
    /// Receive buffer (Appendix A's B_r) per connection and direction, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = saps_fabric::channel::DEFAULT_WINDOW)]
    pub window: u32,
    /// Largest receive buffer (B_r) a node may announce, in bytes: the
    /// io-server may hold that much per connection on its behalf. A node
    /// asking more is refused with a GoAway saying so.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_WINDOW)]
    pub max_window: u32,
    /// Largest weight a node may announce (in its handshake or later). A
    /// node asking more is refused with a GoAway saying so.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_WEIGHT)]
    pub max_weight: u32,
    /// While more than this many bytes wait to go to one node, its channel
    /// is not read (a node that sends Pings or requests without reading
    /// the answers stops being read).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_NODE_OUTPUT)]
    pub max_node_output: u32,
    /// While more than this many of one node's requests (bind, connect,
    /// options...) wait for their answer, its channel is not read.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_NODE_REQUESTS)]
    pub max_node_requests: u32,
    /// Let nodes connect to the gateway's own addresses (its loopback,
    /// the single address) at ports no listener group serves, and to the
    /// io-server's metrics and tcp:// fabric addresses.
    #[arg(long)]
    pub allow_connect_local: bool,
    /// Event-loop threads. One serves best on a small gateway (threads of
    /// one loop wake each other for every hand-over of work); give more
    /// where the gateway has cores to spare for relaying.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// Do not confine the io-server's threads to their allow-list of
    /// system calls once it serves (for debugging: a call outside the list
    /// fails with EPERM and is logged).
    #[arg(long)]
    pub no_sandbox: bool,
    /// A fabric connection that has not authenticated within this many
    /// seconds is closed.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_HANDSHAKE_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Fabric connections that may be authenticating at once; more are
    /// closed at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HANDSHAKES, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,
    /// Of --max-handshakes, how many may come from one address (one
    /// process on a unix fabric).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HANDSHAKES_PER_SOURCE, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes_per_source: u32,
    /// Ping a node that has sent nothing for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_NODE_PING_INTERVAL, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub node_ping_interval: u64,
    /// Drop a node that has sent nothing, its answer to the ping included,
    /// for this many seconds: it leaves its groups and its clients go to
    /// the other members (0: never). Also the TCP_USER_TIMEOUT of tcp://
    /// fabric connections.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_NODE_TIMEOUT, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub node_timeout: u64,
    /// Connections one node's listener may have from its group at once
    /// (haproxy's server maxconn): relayed ones until they end, handed-over
    /// ones until its program accepts them. Beyond, clients go to another
    /// member or wait in the group's queue. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONN_PER_NODE)]
    pub max_conn_per_node: u32,
    /// Connections one listener group may have at once, counted as for
    /// --max-conn-per-node. 0: the io-server's descriptor limit less 128.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONN_PER_GROUP)]
    pub max_conn_per_group: u32,
    /// Clients one group keeps waiting for a member below its bounds;
    /// beyond, new clients are left in the kernel's accept queue.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_QUEUE, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_queue: u32,
    /// A client waiting longer than this many seconds in a group's queue
    /// is closed (haproxy's `timeout queue`).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_QUEUE_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub queue_timeout: u64,
    /// Close a relayed client connection that moved no byte, either way,
    /// for this many seconds (haproxy's `timeout client`; 0: never). The
    /// client gets a reset, the node's program ETIMEDOUT.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_CLIENT_IDLE_TIMEOUT)]
    pub client_idle_timeout: u64,
    /// After the node's program closed its side (its FIN went to the
    /// client), close a relayed client connection that neither sends nor
    /// closes for this many seconds (FIN_WAIT2-like, haproxy's `timeout
    /// client-fin`; 0: --client-idle-timeout applies).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_HALF_CLOSED_TIMEOUT)]
    pub half_closed_timeout: u64,
    /// A node's outbound connect that is not established within this many
    /// seconds fails with ETIMEDOUT (haproxy's `timeout connect`; 0: the
    /// kernel's own, about 127 s).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_CONNECT_TIMEOUT)]
    pub connect_timeout: u64,
    /// A node that joins (or rejoins) gets its share of new clients ramped
    /// up from 1 % to its full weight over this many seconds (haproxy's
    /// `slowstart`; 0: its full weight at once).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub slow_start: u64,
    /// A same-host node that takes no handed-over client socket for this
    /// many seconds (its hand-off socket full) while its channel lives is
    /// given no more: its clients are relayed from then on, and those
    /// waiting go to a member again (0: wait for ever).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_NODE_REQUEST_TIMEOUT)]
    pub node_request_timeout: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fabric: Vec::new(),
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            scheduler: SchedulerKind::default(),
            stack: Stack::default(),
            tap: None,
            tap_fd: None,
            tap_prefix: DEFAULT_TAP_PREFIX,
            tap_gateway: None,
            stack_max_sockets: DEFAULT_STACK_MAX_SOCKETS,
            stack_buffer: DEFAULT_STACK_BUFFER,
            stack_max_backlog: DEFAULT_STACK_MAX_BACKLOG,
            stack_idle_timeout: DEFAULT_STACK_IDLE_TIMEOUT,
            stack_keepalive: DEFAULT_STACK_KEEPALIVE,
            token_file: None,
            token: None,
            allow_ports: None,
            control: None,
            metrics: None,
            metrics_interval: DEFAULT_METRICS_INTERVAL,
            metrics_timeout: DEFAULT_METRICS_TIMEOUT,
            metrics_max_connections: DEFAULT_METRICS_MAX_CONNECTIONS,
            metrics_max_request: DEFAULT_METRICS_MAX_REQUEST,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            window: saps_fabric::channel::DEFAULT_WINDOW,
            max_window: DEFAULT_MAX_WINDOW,
            max_weight: DEFAULT_MAX_WEIGHT,
            max_node_output: DEFAULT_MAX_NODE_OUTPUT,
            max_node_requests: DEFAULT_MAX_NODE_REQUESTS,
            allow_connect_local: false,
            threads: 1,
            no_sandbox: false,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            node_ping_interval: DEFAULT_NODE_PING_INTERVAL,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            max_conn_per_node: DEFAULT_MAX_CONN_PER_NODE,
            max_conn_per_group: DEFAULT_MAX_CONN_PER_GROUP,
            max_queue: DEFAULT_MAX_QUEUE,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            client_idle_timeout: DEFAULT_CLIENT_IDLE_TIMEOUT,
            half_closed_timeout: DEFAULT_HALF_CLOSED_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            slow_start: 0,
            node_request_timeout: DEFAULT_NODE_REQUEST_TIMEOUT,
        }
    }
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, crate::Error> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::Error::ConfigRead {
            path: path.into(),
            source: e,
        })?;
        toml::from_str(&text).map_err(|e| crate::Error::ConfigParse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// The channel settings of a node joining over a fabric listener:
    /// the handshake's deadline and, when `node_timeout` is set, liveness.
    pub fn node_channel(&self, token: Vec<u8>) -> saps_fabric::ChannelConfig {
        let mut c = saps_fabric::ChannelConfig::new(token).window(self.window);
        c.handshake_timeout = std::time::Duration::from_secs(self.handshake_timeout);
        // What a node over a fabric may ask (issue 24).
        c.max_peer_window = self.max_window;
        c.max_weight = self.max_weight;
        c.output_limit = self.max_node_output as usize;
        c.max_unanswered = self.max_node_requests as usize;
        if let Some(l) = self.tcp_liveness() {
            c = c.liveness(l.interval, l.timeout);
        }
        c
    }

    /// The liveness of node channels, `None` when `node_timeout` is 0.
    pub fn tcp_liveness(&self) -> Option<saps_fabric::transport::TcpLiveness> {
        let secs = std::time::Duration::from_secs;
        (self.node_timeout > 0).then(|| saps_fabric::transport::TcpLiveness {
            interval: secs(self.node_ping_interval),
            timeout: secs(self.node_timeout),
        })
    }

    /// The token from `token` or `token_file`, trimmed.
    pub fn load_token(&self) -> Result<Vec<u8>, crate::Error> {
        use saps_fabric::token::{read_token_file, TokenFileError};
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.trim().as_bytes().to_vec(),
            (None, Some(path)) => read_token_file(path).map_err(|e| match e {
                TokenFileError::Read(source) => crate::Error::TokenRead {
                    path: path.clone(),
                    source,
                },
                TokenFileError::NotPrivate { mode } => crate::Error::TokenNotPrivate {
                    path: path.clone(),
                    mode,
                },
            })?,
            (None, None) => return Err(crate::Error::NoToken),
        };
        if token.is_empty() {
            return Err(crate::Error::EmptyToken);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_open_to_other_users_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("saps-config-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let config = Config {
            token_file: Some(path.clone()),
            ..Config::default()
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = config.load_token().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the token file {0} is open to other users (mode 0644); make it private: chmod o-rwx {0}",
                path.display()
            )
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(config.load_token().unwrap(), b"s3cret");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_file_sets_every_field() {
        let c: Config = toml::from_str(
            r#"
            fabric = ["unix:/run/saps.sock", "tcp://0.0.0.0:7700"]
            address = "192.0.2.10"
            scheduler = "wrr"
            token = "secret"
            allow-ports = "80,8000-9000"
            control = "/run/x.ctl"
            shutdown-timeout = 5
            window = 65536
            max-window = 1048576
            max-weight = 100
            max-node-output = 4194304
            max-node-requests = 64
            allow-connect-local = true
            threads = 4
            handshake-timeout = 3
            max-handshakes = 100
            max-handshakes-per-source = 4
            node-ping-interval = 1
            node-timeout = 5
            max-conn-per-node = 10
            max-conn-per-group = 100
            max-queue = 50
            queue-timeout = 7
            metrics-interval = 250
            metrics-timeout = 2
            metrics-max-connections = 4
            metrics-max-request = 1024
            client-idle-timeout = 600
            half-closed-timeout = 30
            connect-timeout = 10
            slow-start = 20
            node-request-timeout = 4
            stack = "smoltcp"
            tap = "tap0"
            tap-prefix = 28
            tap-gateway = "192.0.2.1"
            "#,
        )
        .unwrap();
        assert_eq!(c.fabric.len(), 2);
        assert_eq!(c.scheduler, SchedulerKind::Wrr);
        assert_eq!(c.address.to_string(), "192.0.2.10");
        assert!(c.allow_ports.as_ref().unwrap().allows(8080));
        assert_eq!((c.shutdown_timeout, c.window, c.threads), (5, 65536, 4));
        assert_eq!(
            (c.handshake_timeout, c.node_ping_interval, c.node_timeout),
            (3, 1, 5)
        );
        assert_eq!((c.max_handshakes, c.max_handshakes_per_source), (100, 4));
        assert_eq!((c.max_window, c.max_weight), (1 << 20, 100));
        assert_eq!((c.max_node_output, c.max_node_requests), (4 << 20, 64));
        assert!(c.allow_connect_local);
        assert_eq!((c.max_conn_per_node, c.max_conn_per_group), (10, 100));
        assert_eq!((c.max_queue, c.queue_timeout), (50, 7));
        assert_eq!((c.metrics_interval, c.metrics_timeout), (250, 2));
        assert_eq!(
            (c.metrics_max_connections, c.metrics_max_request),
            (4, 1024)
        );
        assert_eq!((c.client_idle_timeout, c.half_closed_timeout), (600, 30));
        assert_eq!((c.connect_timeout, c.slow_start), (10, 20));
        assert_eq!(c.node_request_timeout, 4);
        assert_eq!((c.stack, c.tap.as_deref()), (Stack::Smoltcp, Some("tap0")));
        assert_eq!(
            (c.tap_prefix, c.tap_gateway),
            (28, Some(Ipv4Addr::new(192, 0, 2, 1)))
        );
        let c: Config = toml::from_str("tap-fd = 5\nstack-max-sockets = 20000").unwrap();
        assert_eq!((c.tap_fd, c.stack_max_sockets), (Some(5), 20000));
        let c: Config =
            toml::from_str("stack-buffer = 262144\nstack-max-backlog = 128\nstack-idle-timeout = 30\nstack-keepalive = 10")
                .unwrap();
        assert_eq!(
            (
                c.stack_buffer,
                c.stack_max_backlog,
                c.stack_idle_timeout,
                c.stack_keepalive
            ),
            (262144, 128, 30, 10)
        );
        let e = toml::from_str::<Config>("schedular = \"rr\"").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}

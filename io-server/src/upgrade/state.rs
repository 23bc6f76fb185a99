//! The state an upgrade carries from the old io-server to the new one
//! (design note §3): the [`Envelope`], hand-rolled and fixed for ever so
//! that a binary of any version reads the version of another, and the
//! serde structs its JSON metadata holds ([`StateSnap`]).
//!
//! The structs hold no descriptor, no instant and no bulk bytes: a
//! descriptor is an index into the list sent beside the envelope (§4.2),
//! gathered by a [`Capture`] and handed out again by a [`Source`]; an
//! instant is its age in nanoseconds at the snapshot (rebuilt as `now -
//! age`); bytes (a queued client's replay) are a [`BlobRef`] into the
//! envelope's blob.
//!
//! Every struct here, and [`SchedState`], is the format: a change to one
//! bumps [`STATE_VERSION`] (the golden test in `tests.rs` fails until it
//! is bumped and the sample blessed). Unknown JSON fields are refused.
//! They mirror the in-memory types (`Groups`, `Ledger`, ...) instead of
//! deriving serde on them, so that those change freely and the format
//! only with a version.

use crate::config::SchedulerKind;
pub use crate::scheduler::SchedState;
use crate::state::{Client, ServerState};
use saps_fabric::endpoint::Replay;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The first octets of every state.
pub const MAGIC: [u8; 8] = *b"SAPSUPG\0";

/// The version of the state format this binary writes and reads.
pub const STATE_VERSION: u32 = 3;

/// Magic, version, metadata length, blob length, descriptor count.
pub const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 4;

/// Why a state cannot be read or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("not an io-server state (bad magic)")]
    Magic,
    #[error("the state is of version {found}, this binary reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("the state is truncated: {need} octets needed, {have} there")]
    Truncated { need: u64, have: u64 },
    #[error("{0} octets follow the end of the state")]
    Trailing(u64),
    #[error("the state's metadata cannot be written or read: {0}")]
    Meta(#[from] serde_json::Error),
    #[error("octets {offset}+{len} are beyond the state's blob of {blob}")]
    Blob { offset: u64, len: u64, blob: u64 },
    #[error("descriptor {index} is not among the {count} received")]
    FdIndex { index: u32, count: usize },
    #[error("descriptor {0} is used twice by the state")]
    FdTwice(u32),
    #[error("descriptor {0} is not used by the state")]
    FdUnused(u32),
    #[error("an age of {0} ns is older than this host's clock")]
    Age(u64),
    #[error("the state is not consistent: {0}")]
    Invalid(String),
}

/// The state as sent (§3.1): header, JSON metadata, blob. The
/// descriptors travel beside it, `fds` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub meta: Vec<u8>,
    pub blob: Vec<u8>,
    pub fds: u32,
}

impl Envelope {
    /// `state` as metadata, with the blob and the descriptor count a
    /// [`Capture`] gathered.
    pub fn seal(state: &StateSnap, blob: Vec<u8>, fds: u32) -> Result<Envelope, StateError> {
        Ok(Envelope {
            meta: serde_json::to_vec(state)?,
            blob,
            fds,
        })
    }

    /// The metadata, parsed; unknown fields are refused.
    pub fn state(&self) -> Result<StateSnap, StateError> {
        Ok(serde_json::from_slice(&self.meta)?)
    }

    /// The envelope's octets, of this binary's [`STATE_VERSION`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.meta.len() + self.blob.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_be_bytes());
        out.extend_from_slice(&(self.meta.len() as u64).to_be_bytes());
        out.extend_from_slice(&(self.blob.len() as u64).to_be_bytes());
        out.extend_from_slice(&self.fds.to_be_bytes());
        out.extend_from_slice(&self.meta);
        out.extend_from_slice(&self.blob);
        out
    }

    /// Reads an envelope that is all of `wire`: the magic, then the
    /// version (another one is refused before anything else is looked
    /// at), then the lengths against what is there.
    pub fn decode(wire: &[u8]) -> Result<Envelope, StateError> {
        let have = wire.len() as u64;
        let short = || StateError::Truncated {
            need: HEADER_LEN as u64,
            have,
        };
        let n = wire.len().min(MAGIC.len());
        if wire[..n] != MAGIC[..n] {
            return Err(StateError::Magic);
        }
        let version = be_u32(wire.get(8..12).ok_or_else(short)?);
        if version != STATE_VERSION {
            return Err(StateError::Version {
                found: version,
                expected: STATE_VERSION,
            });
        }
        let header = wire.get(..HEADER_LEN).ok_or_else(short)?;
        let meta_len = be_u64(&header[12..20]);
        let blob_len = be_u64(&header[20..28]);
        let fds = be_u32(&header[28..32]);
        let need = (HEADER_LEN as u64)
            .checked_add(meta_len)
            .and_then(|n| n.checked_add(blob_len))
            .unwrap_or(u64::MAX);
        if need > have {
            return Err(StateError::Truncated { need, have });
        }
        if need < have {
            return Err(StateError::Trailing(have - need));
        }
        // Both fit in `wire` now, so in a usize.
        let (meta, blob) = wire[HEADER_LEN..].split_at(meta_len as usize);
        Ok(Envelope {
            meta: meta.to_vec(),
            blob: blob.to_vec(),
            fds,
        })
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap_or_default())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or_default())
}

/// How long before `now` `then` was, in nanoseconds (an instant is
/// carried as this). Everything carried is in the past; an instant a
/// moment after `now` (taken by another thread) counts as `now`.
pub fn age(now: Instant, then: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(then).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `age` nanoseconds before `now`.
pub fn since(now: Instant, age: u64) -> Result<Instant, StateError> {
    now.checked_sub(Duration::from_nanos(age))
        .ok_or(StateError::Age(age))
}

/// Some octets of the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    pub offset: u64,
    pub len: u64,
}

/// What a snapshot gathers beside its structs: the descriptors, in index
/// order, borrowed from what it was taken of, and the blob.
#[derive(Debug, Default)]
pub struct Capture<'a> {
    pub fds: Vec<BorrowedFd<'a>>,
    pub blob: Vec<u8>,
}

impl<'a> Capture<'a> {
    /// Adds a descriptor to send: its index.
    pub fn fd(&mut self, fd: BorrowedFd<'a>) -> u32 {
        self.fds.push(fd);
        (self.fds.len() - 1) as u32
    }

    /// Adds octets to the blob: where they are.
    pub fn bytes(&mut self, bytes: &[u8]) -> BlobRef {
        let offset = self.blob.len() as u64;
        self.blob.extend_from_slice(bytes);
        BlobRef {
            offset,
            len: bytes.len() as u64,
        }
    }
}

/// The received descriptors and blob a rebuild takes from: each
/// descriptor exactly once, each range within the blob.
#[derive(Debug)]
pub struct Source {
    fds: Vec<Option<OwnedFd>>,
    blob: Vec<u8>,
}

impl Source {
    pub fn new(fds: Vec<OwnedFd>, blob: Vec<u8>) -> Source {
        Source {
            fds: fds.into_iter().map(Some).collect(),
            blob,
        }
    }

    /// [`Source::new`] where some descriptors were taken already (`None`).
    pub fn with_slots(fds: Vec<Option<OwnedFd>>, blob: Vec<u8>) -> Source {
        Source { fds, blob }
    }

    /// Descriptor `index`, taken.
    pub fn fd(&mut self, index: u32) -> Result<OwnedFd, StateError> {
        let count = self.fds.len();
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.fds.get_mut(i))
            .ok_or(StateError::FdIndex { index, count })?;
        slot.take().ok_or(StateError::FdTwice(index))
    }

    /// The octets `r` refers to.
    pub fn bytes(&self, r: BlobRef) -> Result<&[u8], StateError> {
        let usize = |n: u64| usize::try_from(n).ok();
        let end = r.offset.checked_add(r.len);
        let range = end.and_then(|end| Some(usize(r.offset)?..usize(end)?));
        let bytes = range.and_then(|range| self.blob.get(range));
        bytes.ok_or(StateError::Blob {
            offset: r.offset,
            len: r.len,
            blob: self.blob.len() as u64,
        })
    }

    /// Every descriptor was taken: one left over means the state and the
    /// descriptors do not match.
    pub fn finish(self) -> Result<(), StateError> {
        match self.fds.iter().position(Option::is_some) {
            Some(i) => Err(StateError::FdUnused(i as u32)),
            None => Ok(()),
        }
    }
}

/// Everything carried (§3.2), as far as it is built: the server's
/// counters and the tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSnap {
    pub server: ServerSnap,
    pub tables: TablesSnap,
    /// What the io-server listens on, each with the index of its
    /// descriptor: the new process serves on the very same sockets.
    pub listeners: Vec<ListenerSnap>,
}

/// One listening socket of the io-server, as its settings name it (the new
/// process must be given the same settings: these sockets are what moves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSnap {
    pub kind: ListenerKind,
    /// Its descriptor's index.
    pub fd: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ListenerKind {
    /// A `--fabric` listener: the URL as given (`unix:PATH`, `tcp://…`).
    Fabric { url: String },
    /// The hand-off socket next to a `unix:` fabric listener.
    Handoff { path: String },
    /// The control socket (`--control`).
    Control { path: String },
    /// The metrics listener (`--metrics`), as given.
    Metrics { addr: String },
}

/// `ServerState`'s counters (§1.1), carried so that `io-server status` and
/// Prometheus's counters go on from where they were.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSnap {
    /// The age of `started` (`uptime_secs` goes on).
    pub uptime_ns: u64,
    /// Node requests refused by `guard`.
    pub refused: u64,
    /// Takeovers so far (the new process bumps it at commit).
    pub upgrades: u64,
    /// Connections closed by each timeout.
    pub timed_out: TimedOutSnap,
    /// Fabric connections refused or dropped in their handshake.
    pub handshakes: HandshakesSnap,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimedOutSnap {
    pub idle: u64,
    pub half_closed: u64,
    pub connect: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakesSnap {
    pub refused: u64,
    pub failed: u64,
    pub silent_nodes: u64,
}

impl ServerSnap {
    /// `state`'s counters at `now`.
    pub(crate) fn capture(state: &ServerState, now: Instant) -> ServerSnap {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (t, h) = (&state.timed_out, &state.handshakes);
        ServerSnap {
            uptime_ns: age(now, state.started),
            refused: get(&state.refused),
            upgrades: get(&state.upgrades),
            timed_out: TimedOutSnap {
                idle: get(&t.idle),
                half_closed: get(&t.half_closed),
                connect: get(&t.connect),
            },
            handshakes: HandshakesSnap {
                refused: get(&h.refused),
                failed: get(&h.failed),
                silent_nodes: get(&h.silent_nodes),
            },
        }
    }

    /// Carries the counters on in the new process's `state`, before it is
    /// shared.
    pub(crate) fn apply(&self, state: &mut ServerState, now: Instant) -> Result<(), StateError> {
        state.started = since(now, self.uptime_ns)?;
        let set = |a: &std::sync::atomic::AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&state.refused, self.refused);
        set(&state.upgrades, self.upgrades);
        let (t, h) = (&state.timed_out, &state.handshakes);
        set(&t.idle, self.timed_out.idle);
        set(&t.half_closed, self.timed_out.half_closed);
        set(&t.connect, self.timed_out.connect);
        set(&h.refused, self.handshakes.refused);
        set(&h.failed, self.handshakes.failed);
        set(&h.silent_nodes, self.handshakes.silent_nodes);
        Ok(())
    }
}

/// The tables under the server's lock, as far as they are built: the
/// nodes' ids and the listener groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablesSnap {
    /// The id the next node to join gets.
    pub next_node: u32,
    pub groups: GroupsSnap,
    /// The groups' real ports, by address.
    pub ports: Vec<PortSnap>,
    /// The nodes whose channels move, by id.
    pub nodes: Vec<NodeSnap>,
    /// The nodes whose channels cannot move (`rdma://`): they leave their
    /// groups in the new process, and join it again.
    pub left_behind: Vec<u32>,
}

/// A group's real port (`ports.rs`): its socket, bound or listening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSnap {
    pub key: SocketAddr,
    pub fd: u32,
    pub listening: bool,
    /// The backlog it listens with.
    pub backlog: u32,
}

/// A joined node (`state.rs` `NodeEntry`) and its fabric endpoint, frozen
/// (`saps_fabric::Endpoint::capture`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSnap {
    pub id: u32,
    pub name: String,
    pub peer: String,
    /// The process of a unix fabric's peer (who may claim the hand-off).
    pub pid: Option<i32>,
    pub notifies_accepts: bool,
    /// Its channel's transport: a unix or a TCP stream.
    pub transport: TransportSnap,
    /// `saps_proto::ChannelSnap`, in its own encoding.
    pub channel: BlobRef,
    /// `saps_fabric::endpoint::RouterSnap`, in its own encoding.
    pub router: BlobRef,
    /// The endpoint capture's descriptors, in the capture's order.
    pub fds: Vec<u32>,
    /// The sockets the io-server holds state for, by id.
    pub sockets: Vec<SocketSnap>,
    /// Its listening sockets (admission counts start again from none).
    pub listeners: Vec<u64>,
    /// The hand-off socket of a same-host node (zero-relay).
    pub handoff: Option<u32>,
    /// Sockets handed to it that its program has not accepted, by id.
    pub handed: Vec<HandedSnap>,
    /// Its outbound connects in progress (or finished and not answered).
    pub connects: Vec<ConnectSnap>,
}

/// An outbound connect of a node (`state.rs` `PendingConnect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectSnap {
    pub req: u32,
    pub conn: u64,
    pub to: SocketAddr,
    pub fd: u32,
    /// Finished: 0 (connected) or the errno.
    pub outcome: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum TransportSnap {
    Unix,
    Tcp,
}

/// One socket of a node (`state.rs` `Socket`). Its TCP socket, if
/// relayed, is the relay's in the endpoint's capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketSnap {
    pub conn: u64,
    pub group: Option<SocketAddr>,
    /// Options set before it was connected: `(level, name, value)`.
    pub opts: Vec<(i32, i32, BlobRef)>,
    /// Relayed: an outbound connection, or a client of a group.
    pub relay: Option<RelayedSnap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum RelayedSnap {
    Outbound,
    Client {
        key: SocketAddr,
        listener: u64,
        peer: SocketAddr,
    },
}

/// The io-server's copy of a socket handed to a node (`unaccepted.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedSnap {
    pub conn: u64,
    pub key: SocketAddr,
    pub peer: SocketAddr,
    pub fd: u32,
}

/// Every field of `Groups` (§1.6). Lists are in a fixed order (address,
/// node, or as kept), so one state always encodes the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsSnap {
    /// The scheduler every group uses.
    pub scheduler: SchedulerKind,
    pub limits: LimitsSnap,
    /// `--slow-start` (0: none).
    pub slow_start_ns: u64,
    /// Each node's weight as the schedulers see it, by node.
    pub weights: Vec<(u32, u32)>,
    /// The nodes in their slow start, by node.
    pub ramps: Vec<RampSnap>,
    /// The groups, by address.
    pub groups: Vec<GroupSnap>,
    pub ledger: LedgerSnap,
    /// Orphanings so far (each orphan's number).
    pub orphanings: u64,
    /// Listeners that left their group, oldest first.
    pub left: Vec<LeftSnap>,
}

/// `groups::Limits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSnap {
    pub per_node: u64,
    pub per_group: u64,
    pub max_queue: u64,
    pub queue_timeout_ns: u64,
}

/// A node ramping up its weight (`slowstart::Ramp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampSnap {
    pub node: u32,
    /// Since the ramp began.
    pub age_ns: u64,
    /// The weight it ramps up to.
    pub weight: u32,
}

/// A listener that left group `key` (for `Groups::lingers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeftSnap {
    pub key: SocketAddr,
    pub node: u32,
    pub flags: u32,
    pub age_ns: u64,
}

/// A group member: a node's listening socket (`traffic::MemberId`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSnap {
    pub node: u32,
    pub listener: u64,
}

/// One group (`groups::Group`) at its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSnap {
    pub key: SocketAddr,
    /// The node sockets bound to the port, as kept.
    pub binds: Vec<BindSnap>,
    /// The members, in the order they listened.
    pub members: Vec<MemberSnap>,
    /// Each member's `listen` backlog, by member.
    pub backlogs: Vec<(MemberSnap, u32)>,
    pub scheduler: SchedState,
    /// The queue, first to go first.
    pub queue: Vec<QueuedSnap>,
    /// A timer was set for the queue's oldest client: the new process
    /// sets it again.
    pub expiring: bool,
    pub queued_total: u64,
    pub timed_out: u64,
    pub paused: bool,
    pub pauses: u64,
    pub redispatched: u64,
    pub listening: bool,
    pub orphaned: Option<u64>,
}

/// A node socket bound to a group's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindSnap {
    pub node: u32,
    pub conn: u64,
    pub flags: u32,
}

/// A client waiting in a group's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuedSnap {
    pub client: ClientSnap,
    /// Since it was queued (its queue timeout runs on).
    pub age_ns: u64,
}

/// A queued client: its socket, its address, what it sent to a node that
/// left before accepting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSnap {
    /// Index of its socket among the descriptors.
    pub fd: u32,
    pub peer: SocketAddr,
    pub replay: BlobRef,
    /// The client's FIN came after the replay.
    pub replay_fin: bool,
}

/// `traffic::Ledger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSnap {
    /// Every open scope's counters, by scope.
    pub scopes: Vec<TrafficSnap>,
    /// Live relayed connections and the member each was given to
    /// (`None`: outbound), by (node, connection).
    pub conns: Vec<LedgerConnSnap>,
    /// Connections ever relayed or handed off.
    pub connections: u64,
}

/// `traffic::Scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ScopeSnap {
    Node(u32),
    Group(SocketAddr),
    Member(SocketAddr, MemberSnap),
}

/// `traffic::Traffic` of one scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSnap {
    pub scope: ScopeSnap,
    /// Live relayed connections, by (node, connection).
    pub live: Vec<(u32, u64)>,
    pub total: u64,
    pub handed_off: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConnSnap {
    pub node: u32,
    pub conn: u64,
    pub member: Option<(SocketAddr, MemberSnap)>,
}

/// A client type a group's queue holds, as the state carries it: what
/// `Groups::snapshot` and `Groups::restore` do with each queued client.
pub trait QueuedClient: Sized {
    /// Its snapshot; its socket and bytes go into `into`.
    fn capture<'a>(&'a self, into: &mut Capture<'a>) -> ClientSnap;

    /// The client again, its socket and bytes taken from `from`.
    fn rebuild(snap: &ClientSnap, from: &mut Source) -> Result<Self, StateError>;
}

impl QueuedClient for Client {
    fn capture<'a>(&'a self, into: &mut Capture<'a>) -> ClientSnap {
        ClientSnap {
            fd: into.fd(self.stream.as_fd()),
            peer: self.peer,
            replay: into.bytes(&self.replay.data),
            replay_fin: self.replay.fin,
        }
    }

    fn rebuild(snap: &ClientSnap, from: &mut Source) -> Result<Client, StateError> {
        let data = bytes::Bytes::copy_from_slice(from.bytes(snap.replay)?);
        Ok(Client {
            stream: std::net::TcpStream::from(from.fd(snap.fd)?),
            peer: snap.peer,
            replay: Replay {
                data,
                fin: snap.replay_fin,
            },
        })
    }
}

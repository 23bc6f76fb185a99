//! The `io-server status` report: nodes, listener groups, weights,
//! active/total connections and bytes in/out, laid out like
//! `ipvsadm -L -n --stats` (a group is a virtual service, its members the
//! real servers). `--metrics` serves it over HTTP, with its Prometheus
//! form (`metrics.rs`).

use crate::config::SchedulerKind;
use crate::state::{conn_in_flight, held, lock_handed, ServerState};
use crate::traffic::{NodeId, Scope, Traffic};
use saps_fabric::{ConnId, Endpoint};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

/// Counters of a node, group or member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Live connections.
    pub active: u64,
    /// Connections since start.
    pub total: u64,
    /// Client → node bytes.
    pub bytes_in: u64,
    /// Node → client bytes.
    pub bytes_out: u64,
    /// Bytes still to deliver on live connections (MWLC's `C_i`): what the
    /// io-server holds or has sent but the other side has not yet taken.
    pub in_flight: u64,
    /// Connections handed to a same-host node as sockets (zero-relay); no
    /// byte of theirs is counted in `bytes_in`/`bytes_out`.
    pub handed_off: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub id: u32,
    pub name: String,
    pub peer: String,
    pub weight: u32,
    pub counters: Counters,
    /// Accepted sockets go to this node itself (zero-relay).
    pub zero_relay: bool,
    /// Connections given to it that its program has not accepted yet,
    /// kept for re-dispatch should it leave (`unaccepted.rs`).
    pub unaccepted: usize,
    /// In its slow start: the weight it ramps up to (`weight` is the
    /// effective one now).
    pub ramping_to: Option<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberStatus {
    pub node_id: u32,
    pub node: String,
    pub listener: ConnId,
    pub weight: u32,
    pub counters: Counters,
    /// Its program's `listen` backlog.
    pub backlog: u32,
    /// Clients given to it that its program has not accepted yet (known
    /// for a node that tells of accepts; bounded by the backlog).
    pub unaccepted: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupStatus {
    pub addr: SocketAddr,
    /// Clients waiting for an eligible member.
    pub queued: usize,
    /// Clients ever queued, and those closed at the queue timeout.
    pub queued_total: u64,
    pub queue_timeouts: u64,
    /// New clients are left in the kernel's accept queue now.
    pub paused: bool,
    /// How many times they were.
    pub pauses: u64,
    /// The port's kernel accept queue: clients in it, and its bound.
    pub kernel_queue: Option<(u32, u32)>,
    /// Clients dispatched again because their node left before its
    /// program accepted them.
    pub redispatched: u64,
    pub counters: Counters,
    pub members: Vec<MemberStatus>,
}

/// The fabric's bounds before authentication and on node liveness, and
/// what they refused or dropped (`handshakes.rs`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FabricStatus {
    /// Connections authenticating now.
    pub handshakes: usize,
    pub max_handshakes: u32,
    pub max_handshakes_per_source: u32,
    pub handshake_timeout_secs: u64,
    /// Connections closed at once, beyond a bound.
    pub refused: u64,
    /// Handshakes that failed (timed out, wrong token, garbage).
    pub failed: u64,
    pub node_ping_interval_secs: u64,
    /// 0: nodes are never dropped for silence.
    pub node_timeout_secs: u64,
    /// Nodes dropped for their silence.
    pub silent_nodes: u64,
}

/// A snapshot of the whole io-server.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub address: IpAddr,
    pub scheduler: SchedulerKind,
    pub uptime_secs: u64,
    /// Connections relayed or handed off since start.
    pub connections: u64,
    /// Times this io-server took over from another process (`io-server
    /// upgrade`, issue 19), counted across the takeovers.
    pub upgrades: u64,
    pub nodes: Vec<NodeStatus>,
    pub groups: Vec<GroupStatus>,
    pub fabric: FabricStatus,
    /// What a node may ask (issue 24), and how many of its requests were
    /// refused.
    pub limits: Limits,
    /// The timeouts of client connections and connects, and what they
    /// closed.
    pub timeouts: Timeouts,
    /// The admission bounds of every group (docs/io-server.md "Admission").
    pub admission: AdmissionLimits,
    /// The smoltcp stack's state (`--stack smoltcp`); `None` on the
    /// kernel's stack.
    pub stack: Option<StackStatus>,
}

/// The smoltcp stack (`Stack::stats`): its sockets, bytes, TAP frames
/// and refusals; `answered` false if its thread did not answer in time
/// (the rest is then zero).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StackStatus {
    pub answered: bool,
    /// smoltcp sockets held: connections, listening pools, connects.
    pub sockets: usize,
    /// Sockets by TCP state (RFC 793 names).
    pub by_state: BTreeMap<String, usize>,
    pub listening_ports: usize,
    /// Established connections waiting to be accepted.
    pub accept_queued: usize,
    pub bridges: usize,
    pub pending_connects: usize,
    /// Bytes from the network to the io-server, and back.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub tap_rx_frames: u64,
    pub tap_tx_frames: u64,
    pub tap_tx_drops: u64,
    /// Connections ended by a reset (either side) or a timeout.
    pub resets: u64,
    /// Sockets not made at the socket limit.
    pub refused_max_sockets: u64,
}

impl StackStatus {
    /// Asks the stack (waits for its thread: never under the tables' lock).
    fn ask(stack: &saps_stack::Stack) -> StackStatus {
        let Ok(s) = stack.stats() else {
            return StackStatus::default();
        };
        StackStatus {
            answered: true,
            sockets: s.sockets,
            by_state: s.by_state,
            listening_ports: s.listening_ports,
            accept_queued: s.accept_queued,
            bridges: s.bridges,
            pending_connects: s.pending_connects,
            bytes_in: s.bytes_to_pair,
            bytes_out: s.bytes_to_net,
            tap_rx_frames: s.tap.rx_frames,
            tap_tx_frames: s.tap.tx_frames,
            tap_tx_drops: s.tap.tx_drops,
            resets: s.resets,
            refused_max_sockets: s.refused_max_sockets,
        }
    }
}

/// `--max-conn-per-node` (0: none), `--max-conn-per-group` (as in force),
/// `--max-queue`, `--queue-timeout`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AdmissionLimits {
    pub max_conn_per_node: usize,
    pub max_conn_per_group: usize,
    pub max_queue: usize,
    pub queue_timeout_secs: u64,
}

/// `--client-idle-timeout`, `--half-closed-timeout`, `--connect-timeout`,
/// `--node-request-timeout` and `--slow-start` (seconds, 0: off), and the connections each timeout
/// closed so far (`timeouts.rs`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timeouts {
    pub client_idle_secs: u64,
    pub half_closed_secs: u64,
    pub connect_secs: u64,
    pub node_request_secs: u64,
    pub slow_start_secs: u64,
    /// Client connections closed for moving no byte.
    pub idle_closed: u64,
    /// Client connections closed half-closed.
    pub half_closed_closed: u64,
    /// Outbound connects that timed out.
    pub connects_timed_out: u64,
}

/// The caps on what a node may ask (`--max-window`, `--max-weight`,
/// `--max-node-output`, `--max-node-requests`) and the requests refused
/// so far (options off the allow-list, connects to the gateway itself).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Limits {
    pub max_window: u32,
    pub max_weight: u32,
    pub max_node_output: u32,
    pub max_node_requests: u32,
    pub refused_requests: u64,
}

/// What the tables' lock yields for one scope: its ledger counters and
/// its live connections, whose bytes are asked from their endpoints
/// once the lock is released ([`Raw::counters`]).
#[derive(Default)]
struct Raw {
    counters: Counters,
    live: Vec<(NodeId, ConnId)>,
}

impl Raw {
    /// Copies the counters of `t` (none for a scope not counted).
    fn of(t: Option<&Traffic>) -> Raw {
        let Some(t) = t else {
            return Raw::default();
        };
        let (bytes_in, bytes_out) = t.bytes();
        Raw {
            counters: Counters {
                active: t.active(),
                total: t.total(),
                bytes_in,
                bytes_out,
                in_flight: 0,
                handed_off: t.handed_off(),
            },
            live: t.live().collect(),
        }
    }

    /// The counters, with the live connections' bytes asked from the
    /// endpoints relaying them (outside the tables' lock).
    fn counters(self, eps: &BTreeMap<NodeId, Endpoint>) -> Counters {
        let mut c = self.counters;
        for (node, conn) in self.live {
            if let Some(ep) = eps.get(&node) {
                let (i, o) = ep.relayed_bytes(conn);
                c.bytes_in += i;
                c.bytes_out += o;
                c.in_flight += conn_in_flight(ep, conn);
            }
        }
        c
    }
}

impl Status {
    /// Takes the report: the tables' lock is held only to copy their
    /// counters, never while asking an endpoint (another module, with
    /// locks of its own) for the bytes of live connections.
    pub(crate) fn collect(server: &ServerState) -> Status {
        let st = server.lock();
        let traffic = st.groups.traffic();
        let eps: BTreeMap<NodeId, Endpoint> =
            st.nodes.iter().map(|(&id, n)| (id, n.ep.clone())).collect();
        let raw_nodes: Vec<_> = st
            .nodes
            .iter()
            .map(|(&id, n)| {
                let node = NodeStatus {
                    id,
                    name: n.name.clone(),
                    peer: n.peer.clone(),
                    weight: st.groups.weight(id),
                    counters: Counters::default(),
                    zero_relay: false,
                    unaccepted: 0,
                    ramping_to: st.groups.ramping_to(id),
                };
                let handoff = n.handoff.clone();
                (
                    node,
                    Raw::of(traffic.get(Scope::Node(id))),
                    handoff,
                    n.handed.clone(),
                )
            })
            .collect();
        let raw_groups: Vec<_> = st
            .groups
            .iter()
            .filter(|(_, g)| !g.members().is_empty() || g.queued() > 0)
            .map(|(addr, g)| {
                let group = GroupStatus {
                    addr,
                    queued: g.queued(),
                    queued_total: g.queue_counts().0,
                    queue_timeouts: g.queue_counts().1,
                    paused: g.paused().0,
                    pauses: g.paused().1,
                    kernel_queue: st.ports.kernel_queue(addr),
                    redispatched: g.redispatched(),
                    counters: Counters::default(),
                    members: Vec::new(),
                };
                let members: Vec<_> = g
                    .members()
                    .iter()
                    .map(|&m| {
                        let node = st.nodes.get(&m.node);
                        let member = MemberStatus {
                            node_id: m.node,
                            node: node.map_or_else(String::new, |n| n.name.clone()),
                            listener: m.listener,
                            weight: st.groups.weight(m.node),
                            counters: Counters::default(),
                            backlog: g.backlog(m),
                            unaccepted: {
                                let h = held(&st.nodes, m);
                                h.relayed + h.handed
                            },
                        };
                        (member, Raw::of(traffic.get(Scope::Member(addr, m))))
                    })
                    .collect();
                (group, Raw::of(traffic.get(Scope::Group(addr))), members)
            })
            .collect();
        let connections = traffic.connections();
        let a = st.groups.limits();
        drop(st);
        let stack = server.stack.as_ref().map(StackStatus::ask);
        let admission = AdmissionLimits {
            max_conn_per_node: a.per_node,
            max_conn_per_group: a.per_group,
            max_queue: a.max_queue,
            queue_timeout_secs: a.queue_timeout.as_secs(),
        };
        let nodes = raw_nodes
            .into_iter()
            .map(|(mut n, raw, handoff, handed)| {
                n.counters = raw.counters(&eps);
                n.zero_relay = handoff.as_ref().is_some_and(|h| h.is_open());
                let ep = &eps[&n.id];
                n.unaccepted = ep.unaccepted() + lock_handed(&handed).len();
                n
            })
            .collect();
        let mut groups: Vec<GroupStatus> = raw_groups
            .into_iter()
            .map(|(mut g, raw, members)| {
                g.counters = raw.counters(&eps);
                g.members = members
                    .into_iter()
                    .map(|(mut m, raw)| {
                        m.counters = raw.counters(&eps);
                        m
                    })
                    .collect();
                g
            })
            .collect();
        groups.sort_by_key(|g| g.addr);
        let h = &server.handshakes;
        let c = &server.config;
        let fabric = FabricStatus {
            handshakes: h.in_flight(),
            max_handshakes: c.max_handshakes,
            max_handshakes_per_source: c.max_handshakes_per_source,
            handshake_timeout_secs: c.handshake_timeout,
            refused: h.refused.load(Ordering::Relaxed),
            failed: h.failed.load(Ordering::Relaxed),
            node_ping_interval_secs: c.node_ping_interval,
            node_timeout_secs: c.node_timeout,
            silent_nodes: h.silent_nodes.load(Ordering::Relaxed),
        };
        Status {
            address: server.config.address,
            scheduler: server.config.scheduler,
            uptime_secs: server.started.elapsed().as_secs(),
            connections,
            upgrades: server.upgrades.load(Ordering::Relaxed),
            nodes,
            groups,
            fabric,
            limits: Limits {
                max_window: server.config.max_window,
                max_weight: server.config.max_weight,
                max_node_output: server.config.max_node_output,
                max_node_requests: server.config.max_node_requests,
                refused_requests: server.refused.load(std::sync::atomic::Ordering::Relaxed),
            },
            timeouts: Timeouts {
                client_idle_secs: c.client_idle_timeout,
                half_closed_secs: c.half_closed_timeout,
                connect_secs: c.connect_timeout,
                node_request_secs: c.node_request_timeout,
                slow_start_secs: c.slow_start,
                idle_closed: server.timed_out.idle.load(Ordering::Relaxed),
                half_closed_closed: server.timed_out.half_closed.load(Ordering::Relaxed),
                connects_timed_out: server.timed_out.connect.load(Ordering::Relaxed),
            },
            admission,
            stack,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "SAPS io-server {} (address {}, scheduler {}, {} node(s), up {}s)",
            env!("CARGO_PKG_VERSION"),
            self.address,
            self.scheduler.name(),
            self.nodes.len(),
            self.uptime_secs
        )?;
        let row = |f: &mut fmt::Formatter<'_>, label: String, weight: String, c: &Counters| {
            writeln!(
                f,
                "{label:<34} {weight:>6} {:>10} {:>10} {:>14} {:>14} {:>10}",
                c.active, c.total, c.bytes_in, c.bytes_out, c.in_flight
            )
        };
        writeln!(
            f,
            "{:<34} {:>6} {:>10} {:>10} {:>14} {:>14} {:>10}",
            "Prot LocalAddress:Port Scheduler",
            "Weight",
            "ActiveConn",
            "Conns",
            "InBytes",
            "OutBytes",
            "InFlight"
        )?;
        writeln!(f, "  -> Node (id/listener)")?;
        for g in &self.groups {
            let mut queued = if g.queued > 0 {
                format!(" queued {}", g.queued)
            } else {
                String::new()
            };
            if g.redispatched > 0 {
                queued += &format!(" redispatched {}", g.redispatched);
            }
            if g.paused {
                queued += " paused";
            }
            row(
                f,
                format!("TCP  {} {}{queued}", g.addr, self.scheduler.name()),
                String::new(),
                &g.counters,
            )?;
            for m in &g.members {
                row(
                    f,
                    format!("  -> {} ({}/{})", m.node, m.node_id, m.listener),
                    m.weight.to_string(),
                    &m.counters,
                )?;
            }
            let (kq, kmax) = g.kernel_queue.unwrap_or_default();
            let members: Vec<String> = g
                .members
                .iter()
                .map(|m| format!("{} {}/{}", m.node, m.unaccepted, m.backlog))
                .collect();
            writeln!(
                f,
                "     admission: queue {}/{}, queued {}, timed out {}, kernel queue {kq}/{kmax}, \
                 paused {} times; unaccepted/backlog: {}",
                g.queued,
                self.admission.max_queue,
                g.queued_total,
                g.queue_timeouts,
                g.pauses,
                members.join(", ")
            )?;
        }
        writeln!(f)?;
        writeln!(f, "Nodes")?;
        for n in &self.nodes {
            row(
                f,
                format!(
                    "  {} ({}) from {}{}{}",
                    n.name,
                    n.id,
                    n.peer,
                    if n.zero_relay { ", zero-relay" } else { "" },
                    n.ramping_to
                        .map_or_else(String::new, |w| format!(", slow start to {w}"))
                ),
                n.weight.to_string(),
                &n.counters,
            )?;
        }
        let b = &self.fabric;
        writeln!(f)?;
        writeln!(
            f,
            "Fabric: handshakes {} (max {}, {} per source, timeout {}s), refused {}, failed {}; \
             node ping {}s, timeout {}s, dropped silent {}",
            b.handshakes,
            b.max_handshakes,
            b.max_handshakes_per_source,
            b.handshake_timeout_secs,
            b.refused,
            b.failed,
            b.node_ping_interval_secs,
            b.node_timeout_secs,
            b.silent_nodes
        )?;
        let a = &self.admission;
        writeln!(
            f,
            "Admission: max conn per node {} per group {}, max queue {}, queue timeout {}s",
            match a.max_conn_per_node {
                0 => "none".to_string(),
                n => n.to_string(),
            },
            a.max_conn_per_group,
            a.max_queue,
            a.queue_timeout_secs
        )?;
        let t = &self.timeouts;
        writeln!(
            f,
            "Timeouts: client idle {}s (closed {}), half-closed {}s (closed {}), \
             connect {}s (timed out {}), node request {}s; slow start {}s",
            t.client_idle_secs,
            t.idle_closed,
            t.half_closed_secs,
            t.half_closed_closed,
            t.connect_secs,
            t.connects_timed_out,
            t.node_request_secs,
            t.slow_start_secs
        )?;
        let l = &self.limits;
        writeln!(
            f,
            "Limits per node: window {} weight {} output {} requests {}; refused requests {}",
            l.max_window, l.max_weight, l.max_node_output, l.max_node_requests, l.refused_requests
        )?;
        if let Some(k) = &self.stack {
            if !k.answered {
                writeln!(f, "Stack smoltcp: its thread did not answer")?;
                return Ok(());
            }
            let states: Vec<String> = k.by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
            writeln!(
                f,
                "Stack smoltcp: sockets {} ({}), listening ports {}, accept queued {}, \
                 connections {}, connects pending {}; bytes in {} out {}; TAP frames in {} \
                 out {} dropped {}; resets {}, refused at the socket limit {}",
                k.sockets,
                states.join(", "),
                k.listening_ports,
                k.accept_queued,
                k.bridges,
                k.pending_connects,
                k.bytes_in,
                k.bytes_out,
                k.tap_rx_frames,
                k.tap_tx_frames,
                k.tap_tx_drops,
                k.resets,
                k.refused_max_sockets
            )?;
        }
        Ok(())
    }
}

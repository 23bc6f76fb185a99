//! The [`Status`] in Prometheus's text exposition format (version 0.0.4),
//! named after haproxy's exporter (`addons/promex`): `saps_node_*` for
//! what haproxy calls servers, `saps_group_*` for its backends (a listener
//! group, labelled by its address), `saps_member_*` for a node in one
//! group. Each family has its `# HELP` and `# TYPE`; counters end in
//! `_total`, durations are in seconds and sizes in bytes.

use crate::status::{Counters, Status};
use std::fmt::Write;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A row's labels, owned.
type Labels = Vec<(&'static str, String)>;

/// One metric family being written: its samples follow its header.
struct Family<'a> {
    out: &'a mut String,
    name: String,
}

/// Starts family `name` of `kind` (`counter`, `gauge`).
fn family<'a>(out: &'a mut String, name: impl Into<String>, kind: &str, help: &str) -> Family<'a> {
    let name = name.into();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    Family { out, name }
}

impl Family<'_> {
    /// One sample with `labels`.
    fn sample(&mut self, labels: &[(&str, String)], value: impl std::fmt::Display) -> &mut Self {
        self.out.push_str(&self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// One sample for each row.
    fn each<R>(&mut self, rows: &[(Labels, R)], value: impl Fn(&R) -> u64) -> &mut Self {
        for (labels, r) in rows {
            self.sample(labels, value(r));
        }
        self
    }
}

/// A label value as the format writes it: `\`, `"` and newlines escaped.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The families every kind of row (node, group, member) has: the
/// [`Counters`] of `io-server status`, with the row's labels.
fn counters(out: &mut String, prefix: &str, rows: &[(Labels, &Counters)]) {
    let name = |n: &str| format!("{prefix}_{n}");
    family(
        out,
        name("current_connections"),
        "gauge",
        "Live relayed connections.",
    )
    .each(rows, |c| c.active);
    family(
        out,
        name("connections_total"),
        "counter",
        "Connections relayed or handed off since start.",
    )
    .each(rows, |c| c.total);
    let mut f = family(
        out,
        name("bytes_total"),
        "counter",
        "Bytes relayed: direction in is client to node, out node to client.",
    );
    for (labels, c) in rows {
        for (direction, v) in [("in", c.bytes_in), ("out", c.bytes_out)] {
            let mut l = labels.clone();
            l.push(("direction", direction.into()));
            f.sample(&l, v);
        }
    }
    family(
        out,
        name("in_flight_bytes"),
        "gauge",
        "Bytes of live connections not yet taken by the other side (MWLC's C_i).",
    )
    .each(rows, |c| c.in_flight);
    family(
        out,
        name("handed_off_total"),
        "counter",
        "Connections handed over as sockets (zero-relay); their bytes are not counted.",
    )
    .each(rows, |c| c.handed_off);
}

/// The whole report in the text format.
pub fn render(s: &Status) -> String {
    let mut out = String::with_capacity(4096 + 2048 * (s.nodes.len() + s.groups.len()));
    let o = &mut out;
    let none: &[(&str, String)] = &[];
    family(
        o,
        "saps_info",
        "gauge",
        "The io-server's version, address and scheduler (always 1).",
    )
    .sample(
        &[
            ("version", env!("CARGO_PKG_VERSION").into()),
            ("address", s.address.to_string()),
            ("scheduler", s.scheduler.name().into()),
        ],
        1,
    );
    family(
        o,
        "saps_uptime_seconds",
        "gauge",
        "Seconds since this io-server started.",
    )
    .sample(none, s.uptime_secs);
    family(
        o,
        "saps_upgrades_total",
        "counter",
        "Times an io-server process took over from the one before (io-server upgrade).",
    )
    .sample(none, s.upgrades);
    family(
        o,
        "saps_connections_total",
        "counter",
        "Client and outbound connections relayed or handed off since start.",
    )
    .sample(none, s.connections);
    family(
        o,
        "saps_current_connections",
        "gauge",
        "Live relayed connections, all nodes.",
    )
    .sample(none, s.nodes.iter().map(|n| n.counters.active).sum::<u64>());
    family(o, "saps_nodes", "gauge", "Nodes joined.").sample(none, s.nodes.len());

    let nodes: Vec<(Labels, _)> = s
        .nodes
        .iter()
        .map(|n| (vec![("node", n.name.clone()), ("id", n.id.to_string())], n))
        .collect();
    family(
        o,
        "saps_node_up",
        "gauge",
        "1 for each node joined (a node that leaves has no series).",
    )
    .each(&nodes, |_| 1);
    family(
        o,
        "saps_node_weight",
        "gauge",
        "The node's weight (0: drained).",
    )
    .each(&nodes, |n| n.weight.into());
    family(
        o,
        "saps_node_zero_relay",
        "gauge",
        "1 if accepted sockets are handed to the node itself (zero-relay).",
    )
    .each(&nodes, |n| n.zero_relay.into());
    family(
        o,
        "saps_node_unaccepted_connections",
        "gauge",
        "Connections given to the node that its program has not accepted yet.",
    )
    .each(&nodes, |n| n.unaccepted as u64);
    let rows: Vec<_> = nodes
        .iter()
        .map(|(l, n)| (l.clone(), &n.counters))
        .collect();
    counters(o, "saps_node", &rows);

    let groups: Vec<(Labels, _)> = s
        .groups
        .iter()
        .map(|g| (vec![("group", g.addr.to_string())], g))
        .collect();
    family(
        o,
        "saps_group_queue_current",
        "gauge",
        "Clients waiting for an eligible member of the group.",
    )
    .each(&groups, |g| g.queued as u64);
    family(
        o,
        "saps_group_redispatched_total",
        "counter",
        "Clients dispatched again because their node left before its program accepted them.",
    )
    .each(&groups, |g| g.redispatched);
    family(
        o,
        "saps_group_members",
        "gauge",
        "Nodes listening in the group.",
    )
    .each(&groups, |g| g.members.len() as u64);
    family(
        o,
        "saps_group_queued_total",
        "counter",
        "Clients that waited in the group's queue for an eligible member.",
    )
    .each(&groups, |g| g.queued_total);
    family(
        o,
        "saps_group_queue_timeouts_total",
        "counter",
        "Clients closed after waiting --queue-timeout in the group's queue.",
    )
    .each(&groups, |g| g.queue_timeouts);
    family(
        o,
        "saps_group_paused",
        "gauge",
        "1 while new clients are left in the kernel's accept queue (every bound reached).",
    )
    .each(&groups, |g| u64::from(g.paused));
    family(
        o,
        "saps_group_pauses_total",
        "counter",
        "Times new clients were left in the kernel's accept queue.",
    )
    .each(&groups, |g| g.pauses);
    family(
        o,
        "saps_group_kernel_queue_current",
        "gauge",
        "Clients in the port's kernel accept queue, not yet accepted by the io-server.",
    )
    .each(&groups, |g| g.kernel_queue.map_or(0, |(n, _)| u64::from(n)));
    let rows: Vec<_> = groups
        .iter()
        .map(|(l, g)| (l.clone(), &g.counters))
        .collect();
    counters(o, "saps_group", &rows);

    let members: Vec<(Labels, _)> = s
        .groups
        .iter()
        .flat_map(|g| {
            g.members.iter().map(move |m| {
                let labels = vec![
                    ("group", g.addr.to_string()),
                    ("node", m.node.clone()),
                    ("id", m.node_id.to_string()),
                    ("listener", m.listener.to_string()),
                ];
                (labels, m)
            })
        })
        .collect();
    family(
        o,
        "saps_member_weight",
        "gauge",
        "The weight of a node in a group.",
    )
    .each(&members, |m| m.weight.into());
    let rows: Vec<_> = members
        .iter()
        .map(|(l, m)| (l.clone(), &m.counters))
        .collect();
    counters(o, "saps_member", &rows);

    let b = &s.fabric;
    let gauges: [(&str, &str, u64); 5] = [
        (
            "saps_fabric_handshakes_current",
            "Fabric connections authenticating now.",
            b.handshakes as u64,
        ),
        (
            "saps_fabric_max_handshakes",
            "--max-handshakes: fabric connections that may authenticate at once.",
            b.max_handshakes.into(),
        ),
        (
            "saps_fabric_max_handshakes_per_source",
            "--max-handshakes-per-source: of those, from one address or process.",
            b.max_handshakes_per_source.into(),
        ),
        (
            "saps_fabric_handshake_timeout_seconds",
            "--handshake-timeout: a fabric connection not authenticated by then is closed.",
            b.handshake_timeout_secs,
        ),
        (
            "saps_fabric_ping_interval_seconds",
            "--node-ping-interval: a node silent this long is pinged.",
            b.node_ping_interval_secs,
        ),
    ];
    for (name, help, v) in gauges {
        family(o, name, "gauge", help).sample(none, v);
    }
    family(
        o,
        "saps_fabric_node_timeout_seconds",
        "gauge",
        "--node-timeout: a node silent this long is dropped (0: never).",
    )
    .sample(none, b.node_timeout_secs);
    let l = &s.limits;
    let caps: [(&str, &str, u64); 4] = [
        (
            "saps_limit_node_window_bytes",
            "--max-window: the largest receive buffer a node may announce.",
            l.max_window.into(),
        ),
        (
            "saps_limit_node_weight",
            "--max-weight: the largest weight a node may announce.",
            l.max_weight.into(),
        ),
        (
            "saps_limit_node_output_bytes",
            "--max-node-output: bytes waiting for a node beyond which it is not read.",
            l.max_node_output.into(),
        ),
        (
            "saps_limit_node_requests",
            "--max-node-requests: a node's unanswered requests beyond which it is not read.",
            l.max_node_requests.into(),
        ),
    ];
    for (name, help, v) in caps {
        family(o, name, "gauge", help).sample(none, v);
    }
    let refusals: [(&str, &str, u64); 4] = [
        (
            "saps_fabric_refused_total",
            "Fabric connections closed at once, beyond the bounds on handshakes.",
            b.refused,
        ),
        (
            "saps_fabric_handshakes_failed_total",
            "Fabric handshakes that failed (timed out, wrong token, not the protocol).",
            b.failed,
        ),
        (
            "saps_fabric_nodes_dropped_silent_total",
            "Nodes dropped for their silence (--node-timeout).",
            b.silent_nodes,
        ),
        (
            "saps_node_requests_refused_total",
            "Node requests refused: options off the allow-list, connects to the gateway itself.",
            l.refused_requests,
        ),
    ];
    for (name, help, v) in refusals {
        family(o, name, "counter", help).sample(none, v);
    }
    let a = &s.admission;
    let admission: [(&str, &str, u64); 4] = [
        (
            "saps_limit_conn_per_node",
            "--max-conn-per-node: a node's connections in one group at once (0: no limit).",
            a.max_conn_per_node as u64,
        ),
        (
            "saps_limit_conn_per_group",
            "--max-conn-per-group: a group's connections at once.",
            a.max_conn_per_group as u64,
        ),
        (
            "saps_limit_queue",
            "--max-queue: clients a group keeps waiting for an eligible member.",
            a.max_queue as u64,
        ),
        (
            "saps_limit_queue_timeout_seconds",
            "--queue-timeout: how long a client may wait in a group's queue.",
            a.queue_timeout_secs,
        ),
    ];
    for (name, help, v) in admission {
        family(o, name, "gauge", help).sample(none, v);
    }
    let t = &s.timeouts;
    let timeouts: [(&str, &str, u64); 5] = [
        (
            "saps_timeout_client_idle_seconds",
            "--client-idle-timeout: a client connection moving no byte this long is closed (0: never).",
            t.client_idle_secs,
        ),
        (
            "saps_timeout_half_closed_seconds",
            "--half-closed-timeout: a client connection half closed this long is closed (0: never).",
            t.half_closed_secs,
        ),
        (
            "saps_timeout_connect_seconds",
            "--connect-timeout: a node's outbound connect not established by then fails (0: never).",
            t.connect_secs,
        ),
        (
            "saps_timeout_node_request_seconds",
            "--node-request-timeout: a same-host node's hand-off not taken by then is given up.",
            t.node_request_secs,
        ),
        (
            "saps_slow_start_seconds",
            "--slow-start: a joining node's weight ramps up over this long (0: at once).",
            t.slow_start_secs,
        ),
    ];
    for (name, help, v) in timeouts {
        family(o, name, "gauge", help).sample(none, v);
    }
    let closed: [(&str, &str, u64); 3] = [
        (
            "saps_client_idle_closed_total",
            "Client connections closed for moving no byte (--client-idle-timeout).",
            t.idle_closed,
        ),
        (
            "saps_client_half_closed_closed_total",
            "Client connections closed half closed (--half-closed-timeout).",
            t.half_closed_closed,
        ),
        (
            "saps_connects_timed_out_total",
            "Outbound connects of nodes that timed out (--connect-timeout).",
            t.connects_timed_out,
        ),
    ];
    for (name, help, v) in closed {
        family(o, name, "counter", help).sample(none, v);
    }
    if let Some(k) = &s.stack {
        stack(o, k);
    }
    out
}

/// The `saps_stack_*` families of `--stack smoltcp`.
fn stack(o: &mut String, k: &crate::status::StackStatus) {
    let none: &[(&str, String)] = &[];
    family(
        o,
        "saps_stack_up",
        "gauge",
        "1 if the smoltcp stack's thread answered this collection, else 0.",
    )
    .sample(none, u8::from(k.answered));
    let mut f = family(
        o,
        "saps_stack_sockets",
        "gauge",
        "smoltcp sockets by TCP state (connections, listening pools, connects).",
    );
    for (state, n) in &k.by_state {
        f.sample(&[("state", state.clone())], n);
    }
    let gauges: [(&str, &str, u64); 4] = [
        (
            "saps_stack_listening_ports",
            "Ports listening on the stack.",
            k.listening_ports as u64,
        ),
        (
            "saps_stack_accept_queued",
            "Established connections on the stack waiting to be accepted.",
            k.accept_queued as u64,
        ),
        (
            "saps_stack_connections",
            "Connections of the stack bridged to the io-server.",
            k.bridges as u64,
        ),
        (
            "saps_stack_pending_connects",
            "Outbound connects under way on the stack.",
            k.pending_connects as u64,
        ),
    ];
    for (name, help, v) in gauges {
        family(o, name, "gauge", help).sample(none, v);
    }
    family(
        o,
        "saps_stack_bytes_total",
        "counter",
        "Bytes through the stack: in, from the network; out, to it.",
    )
    .sample(&[("direction", "in".into())], k.bytes_in)
    .sample(&[("direction", "out".into())], k.bytes_out);
    family(
        o,
        "saps_stack_tap_frames_total",
        "counter",
        "Ethernet frames on the TAP: read (rx), written (tx), not written (dropped).",
    )
    .sample(&[("kind", "rx".into())], k.tap_rx_frames)
    .sample(&[("kind", "tx".into())], k.tap_tx_frames)
    .sample(&[("kind", "dropped".into())], k.tap_tx_drops);
    let counters: [(&str, &str, u64); 2] = [
        (
            "saps_stack_resets_total",
            "Stack connections ended by a reset (either side) or a timeout.",
            k.resets,
        ),
        (
            "saps_stack_refused_max_sockets_total",
            "Sockets the stack did not make at its socket limit.",
            k.refused_max_sockets,
        ),
    ];
    for (name, help, v) in counters {
        family(o, name, "counter", help).sample(none, v);
    }
}

//! The command line of `io-server` (DESIGN.md "Interfaces"): the daemon's
//! flags (the [`Config`] struct, shared with the TOML file of `--config`)
//! and the `status`/`weight` control commands. In the library so that the
//! man page `man/io-server.8` is generated from this definition.

use crate::config::Config;
use clap::parser::ValueSource;
use clap::{ArgMatches, Parser, Subcommand};
use std::path::PathBuf;

/// The SAPS gateway daemon: one IP address for a whole cluster.
///
/// io-server owns the single IP address that clients connect to and runs
/// TCP on this host. Application nodes, started with saps-run, join it over
/// the fabric (--fabric) by proving the shared token (--token-file). The
/// ports they listen on are opened here on --address, and each port's
/// listener group hands every new client connection to one node, chosen by
/// the scheduler (--scheduler). The nodes' outbound connections leave from
/// the same address.
///
/// The status and weight commands talk to a running io-server over its
/// control socket. On SIGTERM or SIGINT the io-server stops accepting and
/// lets open connections finish (--shutdown-timeout). SIGUSR2, like the
/// upgrade command (the unit's systemctl reload), replaces the process and
/// keeps every connection; SIGHUP changes nothing in place: settings take
/// effect at a restart or an upgrade.
///
/// Under systemd (Type=notify) it reports readiness, reloads and shutdown
/// on $NOTIFY_SOCKET, and pings the watchdog when $WATCHDOG_USEC is set.
/// --metrics serves Prometheus's text format on GET /metrics.
///
/// Logs go to standard error; set RUST_LOG (e.g. RUST_LOG=debug) for more.
#[derive(Debug, Parser)]
#[command(name = "io-server", version)]
#[command(after_help = "Examples:
  io-server --fabric unix:/run/saps.sock --fabric tcp://0.0.0.0:7700 \\
      --address 192.0.2.10 --token-file /etc/saps/token
  io-server status
  io-server weight web1 0      # drain node web1")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Read settings from this TOML file (keys as the long flags, e.g.
    /// `scheduler = "wrr"`); flags on the command line override it.
    #[arg(long = "config", value_name = "FILE", id = "config_file")]
    pub config_file: Option<PathBuf>,
    #[command(flatten)]
    pub config: Config,
}

/// The control commands, sent to a running io-server's control socket.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print nodes, listener groups, weights and traffic (like `ipvsadm -L -n --stats`).
    Status {
        /// The io-server's control socket [default: --control, else /run/saps-io-server.ctl].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Replace the running io-server with a new process of this binary,
    /// given the same settings as the running one (`ExecReload=`): the new
    /// process takes over its listening sockets, its state, its nodes'
    /// channels and every open connection, and the old one exits. Exits 0 once the new process serves; on any failure the
    /// old one goes on serving and this exits 1, saying why.
    Upgrade,
    /// Change a node's weight at run time; 0 drains it (no new connections).
    Weight {
        /// The node's name (as given to saps-run --node) or id.
        node: String,
        /// The new weight.
        weight: u32,
        /// The io-server's control socket [default: --control, else /run/saps-io-server.ctl].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

/// Takes from `cli` every setting given on the command line, over `file`.
pub fn overlay(mut file: Config, cli: Config, m: &ArgMatches) -> Config {
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    macro_rules! take {
        ($($field:ident),*) => {
            $( if given(stringify!($field)) { file.$field = cli.$field; } )*
        };
    }
    take!(
        fabric,
        address,
        scheduler,
        stack,
        tap,
        tap_fd,
        tap_prefix,
        tap_gateway,
        stack_max_sockets,
        stack_buffer,
        stack_max_backlog,
        stack_idle_timeout,
        stack_keepalive,
        token_file,
        allow_ports,
        control,
        metrics,
        metrics_interval,
        metrics_timeout,
        metrics_max_connections,
        metrics_max_request,
        shutdown_timeout,
        upgrade_timeout,
        window,
        max_window,
        max_weight,
        max_node_output,
        max_node_requests,
        allow_connect_local,
        threads,
        no_sandbox,
        handshake_timeout,
        max_handshakes,
        max_handshakes_per_source,
        node_ping_interval,
        node_timeout,
        max_conn_per_node,
        max_conn_per_group,
        max_queue,
        queue_timeout,
        client_idle_timeout,
        half_closed_timeout,
        connect_timeout,
        slow_start,
        node_request_timeout
    );
    file
}

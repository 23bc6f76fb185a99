//! The command line of `saps-run` (DESIGN.md, "Interfaces").

use clap::{Parser, ValueEnum};
use saps_interceptor::supervisor::Loopback;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::trace::{TraceFormat, TraceOptions, TraceWriter};

/// The environment variable that may name the token file; saps-run removes
/// it from the program's environment.
pub const TOKEN_FILE_ENV: &str = "SAPS_TOKEN_FILE";

/// Run a program with its TCP sockets served by a SAPS io-server.
///
/// saps-run starts PROGRAM under a seccomp filter that traps its
/// connection-management calls (socket, bind, listen, accept, connect,
/// shutdown, getsockopt, ...) and serves them with virtual TCP sockets from
/// an io-server: the program listens and connects on the cluster's single
/// address, sees its clients' real addresses, and needs no changes. Reads
/// and writes are never trapped.
///
/// With --io-server this node joins a gateway's io-server over the fabric;
/// without it an io-server runs inside saps-run on this host's own TCP
/// stack. Every process of the program's tree is served. saps-run forwards
/// the signals it receives to PROGRAM and exits with PROGRAM's exit status,
/// or with 125 when saps-run itself fails.
///
/// Logs go to standard error; set RUST_LOG (e.g. RUST_LOG=debug) for more.
#[derive(Debug, Parser)]
#[command(name = "saps-run", version)]
#[command(after_help = "Examples:
  saps-run -- python3 -m http.server 8000
  saps-run --io-server tcp://gw:7700 --token-file /etc/saps/token --node web1 -- nginx
  saps-run --trace -e trace=connect,accept -- curl -s http://example.com/")]
pub struct Args {
    /// The io-server to join: unix:/PATH, tcp://HOST:PORT or
    /// rdma://HOST:PORT (rdma needs a build with --features rdma).
    /// Default: an embedded io-server on this host.
    #[arg(long, value_name = "URL", env = "SAPS_IO_SERVER")]
    pub io_server: Option<String>,

    /// This node's name on the io-server (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// This node's scheduling weight (0 drains: no new connections).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub weight: u32,

    /// File holding the fabric's shared token (needed with --io-server).
    #[arg(long, value_name = "PATH", env = TOKEN_FILE_ENV)]
    pub token_file: Option<PathBuf>,

    /// Loopback binds and connects stay on this node (local) or go through
    /// the io-server like any other address (cluster).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = LoopbackArg::Local)]
    pub loopback: LoopbackArg,

    /// Embedded io-server only: the address client connections arrive on
    /// and outbound connections leave from.
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub address: IpAddr,

    /// Embedded io-server only: ports the program may listen on (e.g.
    /// "80,443,8000-9000"; default: all).
    #[arg(long, value_name = "RANGES")]
    pub allow_ports: Option<String>,

    /// Hand each accepted client's TCP socket to the program itself, so no
    /// byte is relayed (on), or relay every byte through the io-server (off).
    /// Applies to the embedded io-server and to one on this host reached
    /// over a unix: fabric; a tcp:// or rdma:// one always relays.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub zero_relay: Switch,

    /// Embedded io-server only: where it would answer every call as this
    /// host's kernel does (zero-relay on, --loopback local, --address the
    /// wildcard, no --allow-ports), give the program the kernel's own
    /// sockets and trap no socket call (listen alone with --trace, to show
    /// the listeners): nothing per connection or request (on). Off:
    /// virtual sockets as with any io-server, every socket call served
    /// through the embedded one (what --trace then shows).
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub native_sockets: Switch,

    /// With --io-server: a request to the io-server (bind, listen,
    /// connect, options) not answered within SECS fails the program's
    /// call with ETIMEDOUT, while the channel stays (0: wait for ever).
    /// Keep it above the io-server's --connect-timeout.
    #[arg(long, value_name = "SECS", default_value_t = saps_interceptor::node::DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub node_request_timeout: u64,

    /// Event-loop threads of the supervisor (and of the embedded
    /// io-server). One serves best unless relaying needs more than a core:
    /// threads of one loop wake each other for every hand-over of work.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// Do not confine saps-run's own threads to their allow-list of system
    /// calls once the program has started (for debugging: a call outside
    /// the list fails with EPERM and is logged). The program is never
    /// confined by it either way.
    #[arg(long)]
    pub no_sandbox: bool,

    /// Print one line per trapped syscall, in strace's notation, with what
    /// SAPS did with it.
    #[arg(long)]
    pub trace: bool,

    /// Write the trace to FILE instead of standard error.
    #[arg(short = 'o', long = "output", value_name = "FILE", requires = "trace")]
    pub output: Option<PathBuf>,

    /// With -o: one file per process, FILE.PID (like strace -ff).
    #[arg(long = "ff", requires = "output")]
    pub per_pid: bool,

    /// Trace output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = TraceFormat::Text, requires = "trace")]
    pub trace_format: TraceFormat,

    /// Which calls to trace, like strace: -e trace=connect,accept.
    #[arg(short = 'e', value_name = "EXPR", requires = "trace")]
    pub filter: Option<String>,

    /// Absolute timestamps with microseconds on each line (like strace -tt).
    #[arg(long = "tt", requires = "trace")]
    pub timestamps: bool,

    /// Leave out the SAPS annotations: pure strace output.
    #[arg(long, requires = "trace")]
    pub no_annotate: bool,

    /// On exit, print a summary of calls, errors and time per syscall
    /// (like strace -c).
    #[arg(short = 'c', long = "summary", requires = "trace")]
    pub summary: bool,

    /// The program to run.
    #[arg(required = true, value_name = "PROGRAM")]
    pub program: OsString,

    /// Its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoopbackArg {
    /// 127.0.0.0/8 and ::1 stay on this node, as without SAPS.
    Local,
    /// Loopback goes through the io-server like any other address.
    Cluster,
}

impl From<LoopbackArg> for Loopback {
    fn from(l: LoopbackArg) -> Self {
        match l {
            LoopbackArg::Local => Loopback::Local,
            LoopbackArg::Cluster => Loopback::Cluster,
        }
    }
}

impl Args {
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".into())
        })
    }

    /// Whether the embedded io-server's node gets the kernel's own
    /// sockets: asked for, and the embedded io-server's answers would be
    /// the kernel's (every client handed over, the wildcard address served,
    /// no port policy, loopback local).
    pub fn native_sockets(&self) -> bool {
        self.native_sockets == Switch::On
            && self.io_server.is_none()
            && self.zero_relay == Switch::On
            && self.loopback == LoopbackArg::Local
            && self.address.is_unspecified()
            && self.allow_ports.is_none()
    }

    /// The configuration of the embedded io-server.
    pub fn embedded_config(&self, token: &str) -> anyhow::Result<saps_io_server::Config> {
        let allow_ports = match &self.allow_ports {
            Some(r) => Some(
                r.parse()
                    .map_err(|e| anyhow::anyhow!("--allow-ports {r}: {e}"))?,
            ),
            None => None,
        };
        Ok(saps_io_server::Config {
            address: self.address,
            token: Some(token.to_owned()),
            allow_ports,
            ..Default::default()
        })
    }
}

/// The tracer `--trace` asks for.
pub fn tracer(args: &Args) -> anyhow::Result<Option<Arc<TraceWriter>>> {
    if !args.trace {
        return Ok(None);
    }
    let opts = TraceOptions {
        format: args.trace_format,
        output: args.output.clone(),
        per_pid: args.per_pid,
        filter: args
            .filter
            .as_deref()
            .map(|e| {
                e.parse::<crate::trace::TraceFilter>()
                    .map_err(|err| anyhow::anyhow!("-e {e}: {err}"))
            })
            .transpose()?,
        timestamps: args.timestamps,
        annotate: !args.no_annotate,
        summary: args.summary,
    };
    Ok(Some(Arc::new(TraceWriter::new(opts)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(flags: &[&str]) -> bool {
        let argv = ["saps-run"].iter().chain(flags).chain(&["--", "true"]);
        Args::try_parse_from(argv).unwrap().native_sockets()
    }

    #[test]
    fn native_sockets_only_where_the_embedded_io_server_would_be_the_kernel() {
        assert!(native(&[]), "the defaults");
        assert!(native(&["--native-sockets", "on", "--address", "::"]));
        assert!(native(&["--address", "0.0.0.0", "--weight", "3"]));
        for flags in [
            &["--native-sockets", "off"][..],
            &["--address", "127.0.0.1"],
            &["--allow-ports", "8000"],
            &["--zero-relay", "off"],
            &["--loopback", "cluster"],
            &[
                "--io-server",
                "unix:/nonexistent",
                "--token-file",
                "/dev/null",
            ],
        ] {
            assert!(!native(flags), "{flags:?}");
        }
    }
}

//! `io-server`: the SAPS gateway daemon (thin CLI over `saps_io_server`).

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use saps_io_server::config::DEFAULT_CONTROL;
use saps_io_server::{control, Config, IoServer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The SAPS io-server: owns the single IP address that clients connect to,
/// runs TCP on this host, and serves application nodes (started with
/// `saps-run`) over the fabric. Ports that several nodes listen on are
/// load-balanced by the scheduler.
#[derive(Debug, Parser)]
#[command(
    name = "io-server",
    version,
    after_help = "Examples:\n  io-server --fabric unix:/run/saps.sock --fabric tcp://0.0.0.0:7700 \\\n            --address 192.0.2.10 --token-file /etc/saps/token --control /run/saps-io-server.ctl\n  io-server status\n  io-server weight web1 0      # drain node web1\n\nLogs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more detail."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Read settings from this TOML file (keys as the long flags, e.g.
    /// `scheduler = "wrr"`); flags on the command line override it.
    #[arg(long = "config", value_name = "FILE", id = "config_file")]
    config_file: Option<PathBuf>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print nodes, listener groups, weights and traffic (like `ipvsadm -L -n --stats`).
    Status {
        /// The io-server's control socket.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Change a node's weight at run time; 0 drains it (no new connections).
    Weight {
        /// The node's name (as given to saps-run --node) or id.
        node: String,
        /// The new weight.
        weight: u32,
        /// The io-server's control socket.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

/// Takes from `cli` every setting given on the command line, over `file`.
fn overlay(mut file: Config, cli: Config, m: &ArgMatches) -> Config {
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
        token_file,
        allow_ports,
        control,
        metrics,
        shutdown_timeout,
        window
    );
    file
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("io-server: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, &matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error message already names its cause: one line.
            eprintln!("io-server: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    let control_path = |c: Option<PathBuf>| {
        c.or_else(|| cli.config.control.clone())
            .unwrap_or_else(|| DEFAULT_CONTROL.into())
    };
    match cli.command {
        Some(Command::Status { ref control }) => {
            print!(
                "{}",
                control::request(&control_path(control.clone()), "status").await?
            );
            return Ok(());
        }
        Some(Command::Weight {
            ref node,
            weight,
            ref control,
        }) => {
            let cmd = format!("weight {node} {weight}");
            print!(
                "{}",
                control::request(&control_path(control.clone()), &cmd).await?
            );
            return Ok(());
        }
        None => {}
    }
    let mut config = match &cli.config_file {
        Some(path) => overlay(Config::from_file(path)?, cli.config, matches),
        None => cli.config,
    };
    if config.fabric.is_empty() {
        anyhow::bail!("no --fabric given: nodes could not reach this io-server (e.g. --fabric unix:/run/saps.sock or --fabric tcp://0.0.0.0:7700)");
    }
    config.control.get_or_insert_with(|| DEFAULT_CONTROL.into());
    let grace = Duration::from_secs(config.shutdown_timeout);
    let server = IoServer::start(config).await?;
    tracing::info!("io-server ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot install the SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: graceful shutdown"),
        r = tokio::signal::ctrl_c() => {
            r.map_err(|e| anyhow::anyhow!("cannot install the SIGINT handler: {e}"))?;
            tracing::info!("SIGINT: graceful shutdown");
        }
    }
    let cut = server.shutdown(grace).await;
    if cut > 0 {
        tracing::warn!(cut, "connections still open at the deadline were closed");
    }
    Ok(())
}

//! `io-server`: the SAPS gateway daemon (thin CLI over `saps_io_server`).

use clap::{ArgMatches, CommandFactory, FromArgMatches};
use saps_io_server::cli::{overlay, Cli, Command};
use saps_io_server::config::DEFAULT_CONTROL;
use saps_io_server::notify::{self, Notifier, State};
use saps_io_server::{control, Config, IoServer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::SignalKind;

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
    match start(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error message already names its cause: one line.
            eprintln!("io-server: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A control command, or the daemon on a runtime of `--threads` workers.
fn start(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    let runtime = |threads: u16| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.into())
            .thread_name("io-server")
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
    };
    let control_path = |c: &Option<PathBuf>| {
        c.clone()
            .or_else(|| cli.config.control.clone())
            .unwrap_or_else(|| DEFAULT_CONTROL.into())
    };
    let command = match &cli.command {
        Some(Command::Status { control }) => Some((control_path(control), "status".to_string())),
        Some(Command::Weight {
            node,
            weight,
            control,
        }) => Some((control_path(control), format!("weight {node} {weight}"))),
        None => None,
    };
    if let Some((path, cmd)) = command {
        let reply = runtime(1)?.block_on(control::request(&path, &cmd))?;
        print!("{reply}");
        return Ok(());
    }
    let mut config = match &cli.config_file {
        Some(path) => overlay(Config::from_file(path)?, cli.config, matches),
        None => cli.config,
    };
    if config.fabric.is_empty() {
        anyhow::bail!("no --fabric given: nodes could not reach this io-server (e.g. --fabric unix:/run/saps.sock or --fabric tcp://0.0.0.0:7700)");
    }
    config.control.get_or_insert_with(|| DEFAULT_CONTROL.into());
    runtime(config.threads)?.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let grace = Duration::from_secs(config.shutdown_timeout);
    let sandbox = !config.no_sandbox;
    // Made before the sandbox: sending on it is all it needs after.
    let notifier = match Notifier::from_env() {
        Some(Ok(n)) => Some(Arc::new(n)),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "NOTIFY_SOCKET unusable: systemd will not hear from the io-server");
            None
        }
        None => None,
    };
    let notify = |states: &[State]| {
        if let Some(n) = &notifier {
            n.notify(states)
        }
    };
    let server = IoServer::start(config).await?;
    let signal = |kind: SignalKind, name: &str| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| anyhow::anyhow!("cannot install the {name} handler: {e}"))
    };
    let mut term = signal(SignalKind::terminate(), "SIGTERM")?;
    let mut hup = signal(SignalKind::hangup(), "SIGHUP")?;
    if sandbox {
        // Everything is bound and open: from here the io-server's threads
        // make only the calls of their allow-list (docs/io-server.md,
        // "The sandbox").
        saps_sandbox::confine(
            "io-server",
            &[saps_sandbox::RUNTIME, saps_sandbox::IO_SERVER],
        )?;
    }
    tracing::info!("io-server ready");
    let serving = State::Status(format!(
        "serving nodes on {}",
        server
            .fabric_urls()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    notify(&[State::Ready, serving.clone()]);
    if let (Some(n), Some(every)) = (&notifier, notify::watchdog_interval()) {
        let n = n.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                n.notify(&[State::Watchdog]);
            }
        });
    }
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: graceful shutdown");
                break;
            }
            r = tokio::signal::ctrl_c() => {
                r.map_err(|e| anyhow::anyhow!("cannot install the SIGINT handler: {e}"))?;
                tracing::info!("SIGINT: graceful shutdown");
                break;
            }
            _ = hup.recv() => {
                // systemd's reload (`ExecReload`): RELOADING=1 … READY=1.
                // The io-server has nothing it can change in place yet;
                // `io-server upgrade` (issue 19) will replace the process
                // here, its new process sending MAINPID= and READY=1.
                notify(&[State::Reloading, State::Status("reloading".into())]);
                tracing::info!("SIGHUP: nothing to reload (settings take effect at a restart)");
                notify(&[State::Ready, serving.clone()]);
            }
        }
    }
    notify(&[
        State::Stopping,
        State::Status(format!(
            "shutting down: open connections get up to {}s",
            grace.as_secs()
        )),
    ]);
    let cut = server.shutdown(grace).await;
    if cut > 0 {
        tracing::warn!(cut, "connections still open at the deadline were closed");
    }
    Ok(())
}

//! `io-server`: the SAPS gateway daemon (thin CLI over `saps_io_server`).

use clap::{ArgMatches, CommandFactory, FromArgMatches};
use saps_io_server::cli::{overlay, Cli, Command};
use saps_io_server::config::DEFAULT_CONTROL;
use saps_io_server::notify::{self, Notifier, State};
use saps_io_server::{control, upgrade, Config, IoServer};
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
        // A log that cannot be written (standard error a closed pipe) is
        // lost quietly: the fallback report would panic the thread.
        .log_internal_errors(false)
        .init();
    match start(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error message already names its cause: one line.
            say_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// `io-server: error: …` on standard error, if it can be written (a
/// closed pipe there must not panic a process about to leave).
fn say_error(e: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "io-server: error: {e}");
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
        Some(Command::Upgrade) | None => None,
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
    if matches!(cli.command, Some(Command::Upgrade)) {
        return upgrade(config, runtime);
    }
    runtime(config.threads)?.block_on(serve(config, None))
}

/// `io-server [settings] upgrade`: starts the new daemon, a child of this
/// command in a session of its own (under systemd, `ExecReload=`'s child,
/// which the old process names the unit's main process), and exits with
/// its word: 0 once it serves, 1 with the reason the old one goes on.
fn upgrade(
    config: Config,
    runtime: impl Fn(u16) -> anyhow::Result<tokio::runtime::Runtime>,
) -> anyhow::Result<()> {
    let (word_r, word_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Waits this long for the word, at most: each step of the handover is
    // bounded by --upgrade-timeout.
    let bound = Duration::from_secs(config.upgrade_timeout * 4 + 5);
    // SAFETY: no thread has been started yet (the runtime comes after), so
    // the child may do anything the parent could.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(word_r);
            let _ = nix::unistd::setsid();
            // The command's output ends with the command: the daemon keeps
            // only its standard error, for its log.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                use std::os::fd::AsRawFd;
                let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
                let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
            }
            // Before any thread: room for every descriptor it takes over.
            saps_io_server::presize_fd_table();
            let result = runtime(config.threads)?.block_on(serve(config, Some(word_w)));
            if result.is_err() {
                // Told through the pipe: the command says it.
                std::process::exit(1);
            }
            result
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(word_w);
            let word = read_word(word_r, bound);
            match word.strip_prefix("ok: ") {
                Some(text) => {
                    println!("{}", text.trim_end());
                    Ok(())
                }
                None if word.is_empty() => anyhow::bail!(
                    "upgrade: the new process ended without a word; the old one goes on serving"
                ),
                None => anyhow::bail!("{}", word.trim_end().trim_start_matches("error: ")),
            }
        }
    }
}

/// This program's path and its arguments without a trailing `upgrade`
/// (the subcommand of the process that took over): the daemon's settings.
fn own_command_line() -> std::io::Result<(PathBuf, Vec<std::ffi::OsString>)> {
    let program = std::env::current_exe()?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.last().is_some_and(|a| a == "upgrade") {
        args.pop();
    }
    Ok((program, args))
}

/// What the new daemon wrote on `fd` before closing it, or within `bound`.
fn read_word(fd: std::os::fd::OwnedFd, bound: Duration) -> String {
    use std::io::Read;
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + bound;
    let mut file = std::fs::File::from(fd);
    let mut word = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(
            file.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        let mut buf = [0u8; 4096];
        match file.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) if word.len() < 64 * 1024 => word.extend_from_slice(&buf[..n]),
            Ok(_) => break,
        }
    }
    String::from_utf8_lossy(&word).into_owned()
}

/// The daemon: binds and serves, or (`word`: the `upgrade` command's
/// pipe) takes a running io-server over and tells the command how it went.
async fn serve(config: Config, word: Option<std::os::fd::OwnedFd>) -> anyhow::Result<()> {
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
    // Handlers first: a signal that comes while the listeners are being
    // bound or taken over must not find the default action (SIGHUP and
    // SIGUSR2 would end the process).
    let signal = |kind: SignalKind, name: &str| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| anyhow::anyhow!("cannot install the {name} handler: {e}"))
    };
    let mut term = signal(SignalKind::terminate(), "SIGTERM")?;
    let mut hup = signal(SignalKind::hangup(), "SIGHUP")?;
    let mut usr2 = signal(SignalKind::user_defined2(), "SIGUSR2")?;
    let tell = |word: Option<std::os::fd::OwnedFd>, text: String| {
        if let Some(fd) = word {
            use std::io::Write;
            let _ = std::fs::File::from(fd).write_all(text.as_bytes());
        }
    };
    let (server, word) = match word {
        None => (IoServer::start(config).await?, None),
        Some(word) => match upgrade::handover::take(config).await {
            Ok(t) => {
                tracing::info!(
                    old_pid = t.old_pid,
                    upgrades = t.upgrades,
                    "took over from the old io-server"
                );
                let text = format!(
                    "ok: pid {} took over from pid {} (upgrade {})\n",
                    std::process::id(),
                    t.old_pid,
                    t.upgrades
                );
                (t.io_server, Some((word, text)))
            }
            Err(e) => {
                tell(Some(word), format!("error: {e}\n"));
                // Out at once, past every destructor: dropping the runtime
                // would drop tasks of what was rebuilt from the old
                // process's descriptors, and their write halves shut the
                // old process's sockets down.
                say_error(&e);
                upgrade::handover::leave(1)
            }
        },
    };
    if let Some(n) = &notifier {
        server.set_notifier(n.clone());
    }
    // SIGUSR2 runs `io-server [these settings] upgrade` through a launcher
    // made before the sandbox.
    let launcher = match own_command_line() {
        Ok((program, args)) => upgrade::launcher(&program, &args)
            .inspect_err(
                |e| tracing::warn!(error = %e, "no upgrade launcher: SIGUSR2 does nothing"),
            )
            .ok(),
        Err(e) => {
            tracing::warn!(error = %e, "no upgrade launcher: SIGUSR2 does nothing");
            None
        }
    };
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
    if let Some((word, text)) = word {
        tell(Some(word), text);
    }
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
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: starting `io-server upgrade`");
                if let Some(fd) = &launcher {
                    if let Err(e) = nix::unistd::write(fd, &[1]) {
                        tracing::warn!(error = %e, "SIGUSR2: the upgrade launcher is gone");
                    }
                }
            }
            _ = hup.recv() => {
                // Nothing changes in place: a new process with new settings
                // takes over with `io-server upgrade` (`ExecReload=`).
                notify(&[State::Reloading, State::Status("reloading".into())]);
                tracing::info!("SIGHUP: nothing to reload in place (`io-server upgrade` replaces the process)");
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

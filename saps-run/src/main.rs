//! `saps-run -- PROGRAM [ARGS]...`: runs an unmodified program whose TCP
//! sockets are virtual sockets served by a SAPS io-server (DESIGN.md,
//! "Virtual TCP sockets").
//!
//! With `--io-server URL` the node joins a remote io-server over the fabric;
//! without it an io-server runs in-process on the host's own stack, joined
//! over the in-memory transport. The supervisor serves every process of the
//! program's tree until the last one has exited (saps-run is their
//! subreaper); saps-run exits with the main process's status and forwards
//! the signals it receives to it, or to the rest of the tree once the main
//! process has exited (docs/interceptor.md, "The program's process tree").

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use saps_fabric::endpoint::{Endpoint, EndpointEvent};
use saps_fabric::handoff::{self, side, HandoffReceiver, HandoffSender};
use saps_fabric::transport::{self, FabricUrl, StreamReader, StreamWriter};
use saps_fabric::{Channel, ChannelConfig};
use saps_interceptor::launch::{self, Target, Tree};
use saps_interceptor::supervisor::{Supervisor, SupervisorConfig};
use saps_run::cli::{self, Args, Switch};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How long to wait for the io-server to welcome the node.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the rest of the program's tree has, after a terminating signal
/// reached it (the main process having exited), before it gets `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long killing the tree may take before saps-run gives up on it.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Signals whose forwarding means "stop": once the main process has
/// exited, what remains of the tree gets them and, [`STOP_GRACE`] later,
/// `SIGKILL`. `SIGHUP`, `SIGUSR1` … ask daemons to reload or reopen logs.
const TERMINATING: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("saps-run: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(args: Args) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.into())
        .thread_name("saps-run")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (endpoint, events, handoffs, _server) = rt.block_on(join(&args))?;
    let tracer = cli::tracer(&args)?;
    // Before the spawn: a daemon's orphans must come to us, not to init.
    launch::become_subreaper().context("becoming the program's subreaper")?;
    // On this (the main) thread, which lives as long as saps-run: the
    // program's parent-death signal follows the thread that forked it.
    let (target, notifier) = match Target::spawn(args.program.as_os_str(), &args.args) {
        Ok(t) => t,
        Err(e @ saps_interceptor::Error::Exec { .. }) => {
            // Like a shell: 127 for a program that cannot be run.
            eprintln!("saps-run: {e}");
            return Ok(127);
        }
        Err(e) => return Err(e).context("starting the program"),
    };
    let tree = match target.reap_tree() {
        Ok(tree) => Arc::new(tree),
        Err(e) => {
            let _ = target.signal(libc::SIGKILL);
            let _ = target.wait();
            return Err(e).context("watching the program");
        }
    };
    // From here on, whichever way run() returns (an error, a panic), the
    // tree goes down with saps-run.
    let _guard = KillOnDrop(tree.clone());
    let target = Arc::new(target);
    let supervisor = Supervisor::new(
        notifier,
        endpoint,
        rt.handle().clone(),
        SupervisorConfig {
            loopback: args.loopback.into(),
            tracer: tracer.clone().map(|t| t as _),
            io_server: args.io_server.as_deref().unwrap_or("embedded").into(),
            node: args.node_name().into(),
        },
    );
    let args = Arc::new(args);
    let (handoff_tx, handoffs) = match handoffs {
        Handoffs::Embedded(rx) => (None, Some(rx)),
        Handoffs::Side(tx, rx) => (Some(tx), Some(rx)),
        Handoffs::None => (None, None),
    };
    rt.spawn(stay_joined(
        args.clone(),
        supervisor.clone(),
        events,
        handoff_tx,
    ));
    if let Some(rx) = handoffs {
        rt.spawn(supervisor.clone().serve_handoffs(rx));
    }
    let (stopping, stopped) = tokio::sync::watch::channel(None);
    forward_signals(&rt, &target, &tree, &Arc::new(stopping));
    rt.spawn(stop_the_rest(target.clone(), tree.clone(), stopped));
    supervisor.run(tree.as_fd());
    if !tree.is_done() {
        // The supervisor gave up: its program would get ENOSYS from every
        // trapped call. `_guard` kills it.
        bail!("the supervisor stopped serving the program; killing it");
    }
    let status = target.wait().context("waiting for the program")?;
    if let Some(t) = tracer {
        t.finish();
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(status.exit_code().clamp(0, 255) as u8)
}

type Events = tokio::sync::mpsc::UnboundedReceiver<EndpointEvent>;

/// Where zero-relay sockets come from.
enum Handoffs {
    /// The embedded io-server, in this process.
    Embedded(HandoffReceiver),
    /// A same-host io-server over `PATH.handoff`; the sender is fed again
    /// after each rejoin.
    Side(HandoffSender, HandoffReceiver),
    None,
}

/// Joins the io-server (remote, or an embedded one started here) and waits
/// for its Welcome.
async fn join(
    args: &Args,
) -> Result<(
    Endpoint,
    Events,
    Handoffs,
    Option<Arc<saps_io_server::IoServer>>,
)> {
    if let Some(url) = &args.io_server {
        let token = read_token(args)?;
        let (endpoint, events, node_id) = handshake(args, token, connect(url).await?).await?;
        let handoffs = match side_path(args) {
            Some(path) => {
                let (tx, rx) = handoff::channel();
                claim_handoff(&path, node_id, tx.clone()).await;
                Handoffs::Side(tx, rx)
            }
            None => Handoffs::None,
        };
        return Ok((endpoint, events, handoffs, None));
    }
    let token = random_token();
    let config = args.embedded_config(&token)?;
    let server = Arc::new(
        saps_io_server::IoServer::start(config)
            .await
            .context("starting the embedded io-server")?,
    );
    let (node_end, (r, w)) = transport::memory_pair();
    let s = server.clone();
    let handoffs = match args.zero_relay {
        Switch::On => {
            let (tx, rx) = handoff::channel();
            tokio::spawn(async move { s.attach_local(r, w, tx).await });
            Handoffs::Embedded(rx)
        }
        Switch::Off => {
            tokio::spawn(async move { s.attach(r, w).await });
            Handoffs::None
        }
    };
    let (endpoint, events, _) = handshake(args, token.into_bytes(), node_end).await?;
    Ok((endpoint, events, handoffs, Some(server)))
}

/// The hand-off socket of a same-host io-server (`unix:` fabric) when
/// zero-relay is on.
fn side_path(args: &Args) -> Option<std::path::PathBuf> {
    match (
        args.zero_relay,
        args.io_server.as_deref()?.parse::<FabricUrl>(),
    ) {
        (Switch::On, Ok(FabricUrl::Unix(path))) => Some(side::path_for(&path)),
        _ => None,
    }
}

/// Claims node `node_id`'s zero-relay sockets on the io-server's hand-off
/// socket; they reach `tx` until the io-server closes it. Without it (an
/// io-server that does not offer one) the node's connections are relayed.
async fn claim_handoff(path: &std::path::Path, node_id: u32, tx: HandoffSender) {
    let side = match side::SideSocket::connect(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no hand-off socket: relaying every byte");
            return;
        }
    };
    // The program starts serving only once the io-server took the claim,
    // so its first clients already come as sockets.
    let claimed = async {
        side.send_hello(u64::from(node_id)).await?;
        side.recv_ack().await
    };
    match tokio::time::timeout(JOIN_TIMEOUT, claimed).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            tracing::warn!("the io-server refused the hand-off claim: relaying every byte");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "hand-off claim failed: relaying every byte");
            return;
        }
        Err(_) => {
            tracing::warn!("no answer to the hand-off claim: relaying every byte");
            return;
        }
    }
    tracing::info!(path = %path.display(), "zero-relay through the io-server's hand-off socket");
    tokio::spawn(side::receive(side, tx));
}

/// Opens the node's channel over `(r, w)` and waits for the Welcome.
async fn handshake(
    args: &Args,
    token: Vec<u8>,
    (r, w): (StreamReader, StreamWriter),
) -> Result<(Endpoint, Events, u32)> {
    let channel = Channel::node(ChannelConfig::new(token).node(args.node_name(), args.weight));
    let (endpoint, mut events) = Endpoint::spawn(channel, r, w);
    let welcome = tokio::time::timeout(JOIN_TIMEOUT, async {
        while let Some(ev) = events.recv().await {
            match ev {
                EndpointEvent::Welcome { node_id } => return Ok(node_id),
                EndpointEvent::Closed { error } => {
                    bail!("the io-server refused this node: {error}")
                }
                _ => {}
            }
        }
        bail!("the io-server closed the fabric connection")
    })
    .await
    .map_err(|_| anyhow!("the io-server did not answer within {JOIN_TIMEOUT:?}"))??;
    tracing::info!(node_id = welcome, "joined the io-server");
    Ok((endpoint, events, welcome))
}

/// Serves the io-server's events; with a remote io-server, joins it again
/// whenever the channel is lost (an io-server restart), re-registering the
/// program's listeners.
async fn stay_joined(
    args: Arc<Args>,
    supervisor: Supervisor,
    mut events: Events,
    handoffs: Option<HandoffSender>,
) {
    loop {
        supervisor.clone().serve_events(events).await;
        let (Some(url), Ok(token)) = (&args.io_server, read_token(&args)) else {
            return;
        };
        tracing::warn!(%url, "lost the io-server; joining again");
        let mut pause = Duration::from_millis(100);
        events = loop {
            let joined = match connect(url).await {
                Ok(t) => handshake(&args, token.clone(), t).await,
                Err(e) => Err(e),
            };
            match joined {
                Ok((endpoint, events, node_id)) => {
                    // Claimed first, so clients of the listeners registered
                    // again come as sockets from the start.
                    if let (Some(tx), Some(path)) = (&handoffs, side_path(&args)) {
                        claim_handoff(&path, node_id, tx.clone()).await;
                    }
                    supervisor.rejoin(endpoint).await;
                    break events;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "joining the io-server again failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
    }
}

async fn connect(url: &str) -> Result<(StreamReader, StreamWriter)> {
    let url: FabricUrl = url.parse().with_context(|| format!("--io-server {url}"))?;
    transport::connect_stream(&url)
        .await
        .with_context(|| format!("connecting to the io-server at {url}"))
}

fn read_token(args: &Args) -> Result<Vec<u8>> {
    let path = args
        .token_file
        .as_ref()
        .ok_or_else(|| anyhow!("--io-server needs --token-file (the fabric's shared token)"))?;
    let t = std::fs::read(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let t = t.trim_ascii().to_vec();
    if t.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(t)
}

/// The embedded io-server and its node share a token no one else knows.
fn random_token() -> String {
    saps_fabric::auth::nonce()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `SIGKILL`s what remains of the program's tree when dropped.
struct KillOnDrop(Arc<Tree>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.0.is_done() && !self.0.kill(KILL_TIMEOUT) {
            eprintln!("saps-run: processes of the program survived SIGKILL for {KILL_TIMEOUT:?}");
        }
    }
}

/// A terminating signal saps-run forwarded, and whether it went to the rest
/// of the tree (the main process had exited) or to the main process.
#[derive(Clone, Copy, Debug)]
struct Stopping {
    signal: i32,
    to_tree: bool,
}

/// Signals sent to saps-run reach the main process, or every process left
/// in its tree once it has exited. The first terminating one is recorded
/// in `stopping` for [`stop_the_rest`].
fn forward_signals(
    rt: &tokio::runtime::Runtime,
    target: &Arc<Target>,
    tree: &Arc<Tree>,
    stopping: &Arc<tokio::sync::watch::Sender<Option<Stopping>>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    for sig in [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGWINCH,
    ] {
        let (target, tree, stopping) = (target.clone(), tree.clone(), stopping.clone());
        let _g = rt.enter();
        let Ok(mut stream) = signal(SignalKind::from_raw(sig)) else {
            continue;
        };
        rt.spawn(async move {
            while stream.recv().await.is_some() {
                let to_tree = target.has_exited();
                if to_tree {
                    let n = tree.signal(sig);
                    tracing::info!(
                        signal = sig,
                        processes = n,
                        "forwarded to the program's remaining processes"
                    );
                } else {
                    let _ = target.signal(sig);
                }
                if TERMINATING.contains(&sig) {
                    stopping.send_if_modified(|s| {
                        let first = s.is_none();
                        if first {
                            *s = Some(Stopping {
                                signal: sig,
                                to_tree,
                            });
                        }
                        first
                    });
                }
            }
        });
    }
}

/// Once the main process has exited and a terminating signal has been
/// forwarded (before or after), the rest of the tree gets that signal too,
/// like the units of a service manager being stopped, and [`STOP_GRACE`]
/// later `SIGKILL`. Without such a signal the rest runs on (a daemon).
async fn stop_the_rest(
    target: Arc<Target>,
    tree: Arc<Tree>,
    mut stopped: tokio::sync::watch::Receiver<Option<Stopping>>,
) {
    if let Err(e) = target.exited().await {
        tracing::error!(error = %e, "cannot watch the main process");
        return;
    }
    let stopping = loop {
        let now = *stopped.borrow_and_update();
        if let Some(s) = now {
            break s;
        }
        if stopped.changed().await.is_err() {
            return;
        }
    };
    if !stopping.to_tree {
        let n = tree.signal(stopping.signal);
        tracing::info!(
            signal = stopping.signal,
            processes = n,
            "the main process has exited: signalled the rest of the program"
        );
    }
    tokio::time::sleep(STOP_GRACE).await;
    if tree.is_done() {
        return;
    }
    tracing::warn!(
        "the program's processes outlived {STOP_GRACE:?} after a terminating signal: killing them"
    );
    let _ = tokio::task::spawn_blocking(move || tree.kill(KILL_TIMEOUT)).await;
}

//! The program a node runs, as a process tree (docs/interceptor.md, "The
//! program's process tree"): the node is its subreaper, serves it until
//! its last process has exited, and takes it down if the node stops on a
//! path it controls. Where a forwarded signal goes (the main process, or
//! what remains of the tree once it has exited) and how a terminating one
//! stops the rest is decided here; which signals reach the node's process
//! is its host's business (saps-run listens for them).

use crate::launch::{Target, Tree};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long the rest of the program's tree has, after a terminating signal
/// reached it (the main process having exited), before it gets `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long killing the tree may take before the node gives up on it.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Signals whose forwarding means "stop": once the main process has
/// exited, what remains of the tree gets them and, [`STOP_GRACE`] later,
/// `SIGKILL`. `SIGHUP`, `SIGUSR1` … ask daemons to reload or reopen logs.
const TERMINATING: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// `SIGKILL`s what remains of the program's tree when dropped.
pub(crate) struct KillOnDrop(pub Arc<Tree>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.0.is_done() && !self.0.kill(KILL_TIMEOUT) {
            tracing::error!("processes of the program survived SIGKILL for {KILL_TIMEOUT:?}");
        }
    }
}

/// A terminating signal the node forwarded, and whether it went to the
/// rest of the tree (the main process had exited) or to the main process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stopping {
    pub signal: i32,
    pub to_tree: bool,
}

impl Stopping {
    /// Records `signal` in `first` if it is the first terminating one;
    /// whether it was recorded.
    pub fn record(first: &mut Option<Stopping>, signal: i32, to_tree: bool) -> bool {
        if first.is_some() || !TERMINATING.contains(&signal) {
            return false;
        }
        *first = Some(Stopping { signal, to_tree });
        true
    }
}

/// Forwards signals to the node's program. Cheap to clone.
#[derive(Clone)]
pub struct SignalForwarder {
    target: Arc<Target>,
    tree: Arc<Tree>,
    stopping: Arc<watch::Sender<Option<Stopping>>>,
}

impl SignalForwarder {
    pub(crate) fn new(
        target: Arc<Target>,
        tree: Arc<Tree>,
    ) -> (Self, watch::Receiver<Option<Stopping>>) {
        let (tx, rx) = watch::channel(None);
        let me = SignalForwarder {
            target,
            tree,
            stopping: Arc::new(tx),
        };
        (me, rx)
    }

    /// Sends `signal` to the main process, or to every process left in its
    /// tree once it has exited. The first terminating signal also stops
    /// the rest of the tree once the main process has exited.
    pub fn forward(&self, signal: i32) {
        let to_tree = self.target.has_exited();
        if to_tree {
            let n = self.tree.signal(signal);
            tracing::info!(
                signal,
                processes = n,
                "forwarded to the program's remaining processes"
            );
        } else {
            let _ = self.target.signal(signal);
        }
        self.stopping
            .send_if_modified(|s| Stopping::record(s, signal, to_tree));
    }
}

/// Once the main process has exited and a terminating signal has been
/// forwarded (before or after), the rest of the tree gets that signal too,
/// like the units of a service manager being stopped, and [`STOP_GRACE`]
/// later `SIGKILL`. Without such a signal the rest runs on (a daemon).
pub(crate) async fn stop_the_rest(
    target: Arc<Target>,
    tree: Arc<Tree>,
    mut stopped: watch::Receiver<Option<Stopping>>,
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

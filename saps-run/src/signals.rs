//! The signals sent to saps-run: it listens for them and passes each on to
//! its program; where one goes in the program's tree, and how a
//! terminating one stops the rest of it, is the application node's
//! decision ([`SignalForwarder`]; docs/interceptor.md, "The program's
//! process tree").

use saps_interceptor::node::SignalForwarder;
use tokio::signal::unix::{signal, SignalKind};

/// The signals saps-run passes on to its program.
const FORWARDED: [i32; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// From now on, each of [`FORWARDED`] that saps-run receives goes to the
/// program, handled in tasks on `rt`.
pub fn forward(rt: &tokio::runtime::Handle, to: &SignalForwarder) {
    let _entered = rt.enter();
    for sig in FORWARDED {
        let Ok(mut stream) = signal(SignalKind::from_raw(sig)) else {
            continue;
        };
        let to = to.clone();
        rt.spawn(async move {
            while stream.recv().await.is_some() {
                to.forward(sig);
            }
        });
    }
}

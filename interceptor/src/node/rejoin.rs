//! Staying joined: the node serves its channel's events and, when the
//! channel to a remote io-server is lost (an io-server restart), joins
//! again with backoff, claims its hand-off socket again and hands the new
//! channel to the supervisor, which registers the program's listeners
//! again (docs/architecture.md, "A node survives an io-server restart").
//! The backoff schedule is decided here without a socket.

use saps_fabric::endpoint::Endpoint;
use saps_fabric::handoff::HandoffSender;
use std::future::Future;
use std::time::Duration;

use super::config::RemoteIoServer;
use super::join::{claim_handoff, join_remote, Events, Identity, Welcomed};

/// What a node hands each of its fabric channels to: the supervisor (a
/// test's stand-in in the unit tests).
pub(crate) trait ChannelUser: Send + Sync + 'static {
    /// Serves the channel's events until it closes.
    fn serve_events(&self, events: Events) -> impl Future<Output = ()> + Send;
    /// Takes the channel of a new join in place of the lost one.
    fn rejoined(&self, endpoint: Endpoint) -> impl Future<Output = ()> + Send;
}

impl ChannelUser for crate::supervisor::Supervisor {
    fn serve_events(&self, events: Events) -> impl Future<Output = ()> + Send {
        self.clone().serve_events(events)
    }

    fn rejoined(&self, endpoint: Endpoint) -> impl Future<Output = ()> + Send {
        self.rejoin(endpoint)
    }
}

/// The pauses between failed attempts to join again: doubling from
/// [`Backoff::FIRST`] up to [`Backoff::MAX`]. The first attempt after the
/// channel is lost is made at once.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(2);

    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// The pause after one more failed attempt.
    pub fn after_failure(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(Self::MAX);
        pause
    }
}

/// How a node joins again a remote io-server it lost.
pub(crate) struct Rejoin {
    pub remote: RemoteIoServer,
    pub me: Identity,
    /// Where claimed zero-relay sockets go (the same receiver across
    /// rejoins), when the node claims them.
    pub handoffs: Option<HandoffSender>,
}

impl Rejoin {
    /// Whether to join again after losing the channel, and with which
    /// token: only with one to prove (read again: it may have been
    /// rotated, or removed to keep the node away).
    pub fn token(&self) -> Option<Vec<u8>> {
        match self.remote.read_token() {
            Ok(token) => Some(token),
            Err(e) => {
                tracing::error!(error = %e, "lost the io-server and cannot join it again");
                None
            }
        }
    }

    /// Joins again, pausing per [`Backoff`] between failed attempts, until
    /// it works; claims the hand-off socket again before returning, so
    /// clients of the listeners registered again come as sockets from the
    /// start.
    pub async fn until_joined(&self, token: Vec<u8>) -> Welcomed {
        let mut backoff = Backoff::new();
        loop {
            match join_remote(&self.remote, &self.me, token.clone()).await {
                Ok(joined) => {
                    if let (Some(tx), Some(path)) = (&self.handoffs, &self.remote.handoff_side) {
                        claim_handoff(path, joined.node_id, tx.clone()).await;
                    }
                    return joined;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "joining the io-server again failed");
                    tokio::time::sleep(backoff.after_failure()).await;
                }
            }
        }
    }
}

/// Serves the io-server's events through `user`; with a remote io-server
/// (`rejoin`), joins it again whenever the channel is lost and hands `user`
/// the new channel. Returns when the channel is lost for good.
pub(crate) async fn stay_joined<U: ChannelUser>(
    user: U,
    mut events: Events,
    rejoin: Option<Rejoin>,
) {
    loop {
        user.serve_events(events).await;
        let Some((rejoin, token)) = rejoin.as_ref().and_then(|r| Some((r, r.token()?))) else {
            return;
        };
        tracing::warn!(url = %rejoin.remote.url_text, "lost the io-server; joining again");
        let joined = rejoin.until_joined(token).await;
        user.rejoined(joined.endpoint).await;
        events = joined.events;
    }
}

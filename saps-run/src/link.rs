//! Which io-server saps-run's node joins: the remote one of `--io-server`,
//! or one embedded in saps-run on this host's own TCP stack (DESIGN.md,
//! "Virtual TCP sockets"). The embedded io-server is started here, not in
//! the node: the interceptor crate does not depend on the io-server's.

use crate::cli::{Args, Switch};
use anyhow::{anyhow, Context, Result};
use saps_fabric::handoff;
use saps_fabric::transport;
use saps_interceptor::node::{EmbeddedIoServer, IoServerLink, RemoteIoServer};
use saps_io_server::IoServer;
use std::sync::Arc;

/// The io-server the arguments name, and the embedded one if it is that
/// (it serves as long as it is held).
pub async fn io_server(args: &Args) -> Result<(IoServerLink, Option<Arc<IoServer>>)> {
    let zero_relay = args.zero_relay == Switch::On;
    if let Some(url) = &args.io_server {
        let token_file = args
            .token_file
            .as_deref()
            .ok_or_else(|| anyhow!("--io-server needs --token-file (the fabric's shared token)"))?;
        let mut remote = RemoteIoServer::new(url, token_file, zero_relay)
            .with_context(|| format!("--io-server {url}"))?;
        let secs = args.node_request_timeout;
        remote.request_timeout = (secs > 0).then(|| std::time::Duration::from_secs(secs));
        return Ok((IoServerLink::Remote(remote), None));
    }
    let token = random_token();
    let server = Arc::new(
        IoServer::start(args.embedded_config(&token)?)
            .await
            .context("starting the embedded io-server")?,
    );
    let (node_end, (r, w)) = transport::memory_pair();
    let s = server.clone();
    let handoffs = if zero_relay {
        let (tx, rx) = handoff::channel();
        tokio::spawn(async move { s.attach_local(r, w, tx).await });
        Some(rx)
    } else {
        tokio::spawn(async move { s.attach(r, w).await });
        None
    };
    let embedded = EmbeddedIoServer {
        transport: node_end,
        token: token.into_bytes(),
        handoffs,
        native_sockets: args.native_sockets(),
    };
    Ok((IoServerLink::Embedded(embedded), Some(server)))
}

/// The embedded io-server and its node share a token no one else knows.
fn random_token() -> String {
    saps_fabric::auth::nonce()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

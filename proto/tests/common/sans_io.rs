//! Sans-IO helpers shared by the integration tests, the fuzz targets and the
//! benchmark: two [`Channel`] ends authenticated through the real handshake
//! and wired back to back in memory (no sockets, no sleeps).

use saps_proto::{Channel, ChannelConfig, Event};

/// The shared secret both ends prove.
pub const TOKEN: &str = "fabric-test-token";

/// Moves every queued byte between `a` and `b` until both are quiet. Protocol
/// errors are not returned: they close the channel and surface as
/// `Event::Closed`.
pub fn pump(a: &mut Channel, b: &mut Channel) {
    loop {
        let mut moved = false;
        if let Some(t) = a.poll_transmit() {
            let _ = b.handle_input(&t.bytes);
            moved = true;
        }
        if let Some(t) = b.poll_transmit() {
            let _ = a.handle_input(&t.bytes);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

/// Every event `ch` has queued.
pub fn drain(ch: &mut Channel) -> Vec<Event> {
    std::iter::from_fn(|| ch.poll_event()).collect()
}

/// A node end and an io-server end that both grant `window` octets per
/// connection (`B_r`), open after Hello/Challenge/Auth/Welcome.
pub fn open_pair(window: u32) -> (Channel, Channel) {
    let mut node = Channel::node(ChannelConfig::new(TOKEN).node("node-1", 1).window(window));
    let mut srv = Channel::io_server(ChannelConfig::new(TOKEN).window(window));
    pump(&mut node, &mut srv);
    srv.welcome(1);
    pump(&mut node, &mut srv);
    assert!(node.is_open() && srv.is_open(), "the handshake completes");
    drain(&mut node);
    drain(&mut srv);
    (node, srv)
}

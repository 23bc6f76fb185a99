//! Liveness and the pre-authentication frame limit, with every instant
//! given by the test.

use crate::channel::{Channel, ChannelConfig, Event, HANDSHAKE_MAX_FRAME};
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(6);

fn pump(a: &mut Channel, b: &mut Channel) {
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            b.handle_input(&t.bytes).unwrap();
            moved = true;
        }
        while let Some(t) = b.poll_transmit() {
            a.handle_input(&t.bytes).unwrap();
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn closed_reason(ch: &mut Channel) -> Option<String> {
    std::iter::from_fn(|| ch.poll_event()).find_map(|e| match e {
        Event::Closed { error } => Some(error.to_string()),
        _ => None,
    })
}

/// An open pair; only the io-server end watches its peer.
fn open_pair(t0: Instant) -> (Channel, Channel) {
    let mut node = Channel::node(ChannelConfig::new("tok").node("n1", 1));
    let mut srv = Channel::io_server(ChannelConfig::new("tok").liveness(INTERVAL, TIMEOUT));
    node.start(t0);
    srv.start(t0);
    pump(&mut node, &mut srv);
    srv.welcome(1);
    pump(&mut node, &mut srv);
    assert!(node.is_open() && srv.is_open());
    (node, srv)
}

#[test]
fn a_silent_peer_is_pinged_after_the_interval_and_dropped_at_the_timeout() {
    let t0 = Instant::now();
    let (_node, mut srv) = open_pair(t0);
    // The handshake's input is news at the first check.
    let first = srv
        .poll_timeout()
        .expect("an open channel that watches asks for time");
    assert_eq!(first, t0 + INTERVAL);
    srv.handle_timeout(first);
    assert!(
        srv.poll_transmit().is_none(),
        "input was heard: no ping yet"
    );
    assert_eq!(srv.poll_timeout(), Some(first + INTERVAL));
    srv.handle_timeout(first + INTERVAL);
    let ping = srv
        .poll_transmit()
        .expect("a ping after the interval of silence");
    assert!(!ping.bytes.is_empty());
    assert_eq!(srv.poll_timeout(), Some(first + TIMEOUT));
    srv.handle_timeout(first + TIMEOUT - Duration::from_nanos(1));
    assert!(srv.is_open(), "not a nanosecond early");
    srv.handle_timeout(first + TIMEOUT);
    assert!(srv.is_closed());
    assert_eq!(
        closed_reason(&mut srv).as_deref(),
        Some("closed locally: the peer sent nothing within 6 s")
    );
    assert_eq!(srv.poll_timeout(), None);
}

#[test]
fn a_peer_that_answers_the_ping_stays() {
    let t0 = Instant::now();
    let (mut node, mut srv) = open_pair(t0);
    let mut now = t0;
    for _ in 0..20 {
        now = srv.poll_timeout().unwrap();
        srv.handle_timeout(now);
        // The node answers every Ping with a Pong.
        pump(&mut node, &mut srv);
        assert!(srv.is_open(), "closed at {:?}", now - t0);
    }
    assert!(now - t0 > TIMEOUT * 3, "time went on: {:?}", now - t0);
}

#[test]
fn without_liveness_an_open_channel_asks_for_no_time() {
    let t0 = Instant::now();
    let mut node = Channel::node(ChannelConfig::new("tok").node("n1", 1));
    let mut srv = Channel::io_server(ChannelConfig::new("tok"));
    node.start(t0);
    srv.start(t0);
    pump(&mut node, &mut srv);
    srv.welcome(1);
    pump(&mut node, &mut srv);
    assert_eq!(srv.poll_timeout(), None);
}

#[test]
fn before_authentication_a_large_length_prefix_closes_the_channel() {
    let mut srv = Channel::io_server(ChannelConfig::new("tok"));
    srv.start(Instant::now());
    let len = (HANDSHAKE_MAX_FRAME as u32 + 1).to_be_bytes();
    let e = srv.handle_input(&len).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "frame of {} bytes exceeds the limit of {HANDSHAKE_MAX_FRAME}",
            HANDSHAKE_MAX_FRAME + 1
        )
    );
    assert!(srv.is_closed());
}

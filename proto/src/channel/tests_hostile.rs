//! A hostile or broken node (issue 24): caps on the window and weight it
//! announces, frames that take no credit, output that waits for a peer
//! that does not read.

use super::tests::{events, open_pair, pump};
use super::*;

fn capped() -> ChannelConfig {
    let mut c = ChannelConfig::new("tok");
    c.max_peer_window = 16 << 20;
    c.max_weight = 256;
    c
}

/// The reason the node end closed with (the io-server's GoAway).
fn node_closed(node_cfg: ChannelConfig) -> (String, String) {
    let mut node = Channel::node(node_cfg);
    let mut srv = Channel::io_server(capped());
    pump(&mut node, &mut srv);
    let reason = |evs: Vec<Event>| {
        evs.into_iter()
            .find_map(|e| match e {
                Event::Closed { error } => Some(error.to_string()),
                _ => None,
            })
            .expect("closed")
    };
    (reason(events(&mut node)), reason(events(&mut srv)))
}

#[test]
fn a_window_above_the_cap_is_refused_with_a_clear_goaway() {
    let (node, srv) = node_closed(ChannelConfig::new("tok").node("n", 1).window(u32::MAX));
    assert_eq!(
        node,
        "peer closed the channel: the node's window 4294967295 is above the io-server's cap of 16777216 (--max-window)"
    );
    assert!(srv.contains("above the io-server's cap"), "{srv}");
}

#[test]
fn a_weight_above_the_cap_is_refused_in_hello_and_later() {
    let (node, _) = node_closed(ChannelConfig::new("tok").node("n", 257));
    assert_eq!(
        node,
        "peer closed the channel: the node's weight 257 is above the io-server's cap of 256 (--max-weight)"
    );
    // At the cap: welcome. Above it later (Weight): the channel closes.
    let mut node = Channel::node(ChannelConfig::new("tok").node("n", 256));
    let mut srv = Channel::io_server(capped());
    pump(&mut node, &mut srv);
    assert!(matches!(
        events(&mut srv)[..],
        [Event::NodeAuthenticated { weight: 256, .. }]
    ));
    srv.welcome(1);
    pump(&mut node, &mut srv);
    events(&mut node);
    node.set_weight(u32::MAX);
    pump(&mut node, &mut srv);
    assert!(srv.is_closed());
    assert!(matches!(&events(&mut srv)[..], [Event::Closed { error }]
        if error.to_string().contains("weight 4294967295 is above")));
}

#[test]
fn repeated_fin_and_empty_data_raise_nothing_and_are_counted() {
    let (mut node, mut srv) = open_pair(1 << 20);
    let conn = srv
        .accept_connection(
            2,
            "192.0.2.9:1".parse().unwrap(),
            "192.0.2.1:80".parse().unwrap(),
        )
        .unwrap();
    pump(&mut node, &mut srv);
    events(&mut node);
    let mut out = BytesMut::new();
    for _ in 0..1000 {
        codec::encode(&Frame::Fin { conn }, &mut out);
        codec::encode(&Frame::Fin { conn: 999 }, &mut out);
        codec::encode(
            &Frame::Data {
                conn,
                data: Bytes::new(),
            },
            &mut out,
        );
    }
    srv.handle_input(&out).unwrap();
    assert_eq!(
        events(&mut srv),
        vec![Event::Fin { conn }],
        "one Fin raised"
    );
    assert_eq!(srv.stats().creditless_dropped, 2999);
}

#[test]
fn output_over_its_limit_says_so() {
    let mut cfg = ChannelConfig::new("tok");
    cfg.output_limit = 1000;
    let mut node = Channel::node(ChannelConfig::new("tok").node("n", 1));
    let mut srv = Channel::io_server(cfg);
    pump(&mut node, &mut srv);
    srv.welcome(1);
    pump(&mut node, &mut srv);
    let mut out = BytesMut::new();
    for token in 0..200 {
        codec::encode(&Frame::Ping { token }, &mut out);
    }
    srv.handle_input(&out).unwrap();
    assert!(
        srv.output_full(),
        "200 Pongs wait: {}",
        srv.pending_transmit()
    );
    assert_eq!(srv.stats().pings_received, 200);
    while srv.poll_transmit().is_some() {}
    assert!(!srv.output_full());
}

//! Deterministic tests of the channel state machine: two ends wired back to
//! back in memory, no sockets, no sleeps.

use super::*;
use crate::frame::{ConnId, Request, Response, NONCE_LEN};
use bytes::BufMut;
use std::time::{Duration, Instant};

// The same helpers the integration tests, the benchmark and the fuzz
// targets use.
#[allow(dead_code)]
#[path = "../../tests/common/sans_io.rs"]
mod sans_io;
pub(crate) use sans_io::{drain as events, pump};

pub(crate) fn open_pair(window: u32) -> (Channel, Channel) {
    let mut node = Channel::node(ChannelConfig::new("tok").node("n1", 2).window(window));
    let mut srv = Channel::io_server(ChannelConfig::new("tok").window(window));
    pump(&mut node, &mut srv);
    assert_eq!(
        events(&mut srv),
        vec![Event::NodeAuthenticated {
            node: "n1".into(),
            weight: 2
        }]
    );
    srv.welcome(7);
    pump(&mut node, &mut srv);
    assert_eq!(events(&mut node), vec![Event::Welcome { node_id: 7 }]);
    (node, srv)
}

/// io-server end: a client of 192.0.2.9:80 from 192.0.2.`host` for the
/// node's listener 2.
fn client(srv: &mut Channel, host: u8) -> ConnId {
    let peer = std::net::SocketAddr::from(([192, 0, 2, host], 1));
    srv.accept_connection(2, peer, "192.0.2.9:80".parse().unwrap())
        .unwrap()
}

fn closed_reason(evs: &[Event]) -> Option<String> {
    evs.iter().find_map(|e| match e {
        Event::Closed { error } => Some(error.to_string()),
        _ => None,
    })
}

#[test]
fn wrong_token_is_refused_with_a_reason() {
    let mut node = Channel::node(ChannelConfig::new("wrong").node("n1", 1));
    let mut srv = Channel::io_server(ChannelConfig::new("right"));
    pump(&mut node, &mut srv);
    // The node already rejects the server's proof (mutual auth).
    let reason = closed_reason(&events(&mut node)).unwrap();
    assert!(reason.contains("did not prove the token"), "{reason}");
    assert!(closed_reason(&events(&mut srv))
        .unwrap()
        .contains("peer closed"));
    assert!(node.is_closed() && srv.is_closed());
}

#[test]
fn a_node_that_forges_the_proof_is_refused() {
    let mut srv = Channel::io_server(ChannelConfig::new("right"));
    let mut out = BytesMut::new();
    codec::encode(
        &Frame::Hello {
            min_version: 1,
            max_version: 1,
            node: "evil".into(),
            weight: 1,
            window: 1024,
            nonce: [0; NONCE_LEN],
        },
        &mut out,
    );
    codec::encode(
        &Frame::Auth {
            proof: [0; NONCE_LEN],
        },
        &mut out,
    );
    assert_eq!(srv.handle_input(&out), Err(ChannelError::BadToken));
    assert!(srv.is_closed());
    let goaway = srv.poll_transmit().unwrap().bytes;
    assert!(String::from_utf8_lossy(&goaway).contains("did not prove the token"));
}

#[test]
fn version_mismatch_closes_with_both_ranges() {
    let mut cfg = ChannelConfig::new("tok").node("n1", 1);
    cfg.min_version = 5;
    cfg.max_version = 6;
    let mut node = Channel::node(cfg);
    let mut srv = Channel::io_server(ChannelConfig::new("tok"));
    pump(&mut node, &mut srv);
    let reason = closed_reason(&events(&mut srv)).unwrap();
    assert_eq!(
        reason,
        "version mismatch: node speaks 5..=6, io-server speaks 1..=4"
    );
    assert!(closed_reason(&events(&mut node))
        .unwrap()
        .contains("version mismatch"));
}

#[test]
fn garbage_and_unknown_tags_close_the_channel_without_panicking() {
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0, 0, 0, 2, 1, 0xee][..],
        &[0, 0, 0, 3, 9, 0x41, 0][..],
    ] {
        let (_node, mut srv) = open_pair(1024);
        let err = srv.handle_input(garbage).unwrap_err();
        assert!(srv.is_closed(), "{err}");
        assert!(closed_reason(&events(&mut srv)).is_some());
    }
}

#[test]
fn requests_and_responses_carry_their_ids() {
    let (mut node, mut srv) = open_pair(1024);
    let conn = node.make_connection().unwrap();
    let addr = "127.0.0.1:80".parse().unwrap();
    let req = node.request(Request::Connect { conn, addr }).unwrap();
    pump(&mut node, &mut srv);
    assert_eq!(
        events(&mut srv),
        vec![Event::Request {
            req,
            request: Request::Connect { conn, addr }
        }]
    );
    srv.respond(
        req,
        Response::Status {
            errno: 111,
            addr: None,
        },
    );
    pump(&mut node, &mut srv);
    assert_eq!(
        events(&mut node),
        vec![Event::Response {
            req,
            response: Response::Status {
                errno: 111,
                addr: None
            }
        }]
    );
}

#[test]
fn a_node_may_not_send_io_server_frames() {
    let (mut node, mut srv) = open_pair(1024);
    let mut out = BytesMut::new();
    codec::encode(&Frame::ConnectionClosed { conn: 1, errno: 0 }, &mut out);
    assert!(matches!(
        srv.handle_input(&out),
        Err(ChannelError::Unexpected { .. })
    ));
    pump(&mut node, &mut srv);
    assert!(node.is_closed());
}

/// A pair whose node speaks protocol versions up to `max` (an older
/// build), open, its events read.
fn open_pair_up_to(max: u8) -> (Channel, Channel) {
    let mut cfg = ChannelConfig::new("tok").node("old", 1);
    cfg.max_version = max;
    let mut node = Channel::node(cfg);
    let mut srv = Channel::io_server(ChannelConfig::new("tok"));
    pump(&mut node, &mut srv);
    srv.welcome(3);
    pump(&mut node, &mut srv);
    assert!(node.is_open() && srv.is_open());
    assert_eq!((node.version(), srv.version()), (max, max));
    events(&mut node);
    events(&mut srv);
    (node, srv)
}

/// A pair whose node speaks only protocol version 1 (an older build).
fn open_v1_pair() -> (Channel, Channel) {
    open_pair_up_to(1)
}

#[test]
fn the_highest_common_version_is_agreed_on_both_ends() {
    let (node, srv) = open_pair(1024);
    assert_eq!((node.version(), srv.version()), (4, 4));
    assert!(node.notifies_accepts() && srv.notifies_accepts());
    let (node, srv) = open_v1_pair();
    assert_eq!((node.version(), srv.version()), (1, 1));
    assert!(!srv.notifies_accepts());
}

#[test]
fn the_programs_accept_reaches_the_io_server_once_for_a_known_connection() {
    let (mut node, mut srv) = open_pair(1024);
    let relayed = client(&mut srv, 1);
    pump(&mut node, &mut srv);
    events(&mut node);
    node.accepted(relayed);
    let handed = srv.hand_connection().unwrap();
    assert_ne!(handed, relayed, "one sequence of ids");
    assert_eq!(handed % 2, 1, "allocated by the io-server");
    node.accepted(handed);
    // Late ones: a repeated accept of the handed id, an unknown id.
    node.accepted(handed);
    node.accepted(99);
    pump(&mut node, &mut srv);
    assert_eq!(
        events(&mut srv),
        vec![
            Event::Accepted { conn: relayed },
            Event::Accepted { conn: handed }
        ]
    );
    assert!(srv.is_open());
    // A handed id the node closes unaccepted is reported as closed, once.
    let refused = srv.hand_connection().unwrap();
    let forgotten = srv.hand_connection().unwrap();
    srv.forget_handed(forgotten);
    node.close_connection(refused, 0);
    node.close_connection(refused, 0);
    node.accepted(forgotten);
    pump(&mut node, &mut srv);
    assert_eq!(
        events(&mut srv),
        vec![Event::ConnectionClosed {
            conn: refused,
            errno: 0
        }]
    );
}

#[test]
fn a_node_reset_is_a_reset_frame_on_version_3_and_a_close_below() {
    let (mut node, mut srv) = open_pair(1024);
    let conn = client(&mut srv, 1);
    pump(&mut node, &mut srv);
    events(&mut node);
    node.close_connection(conn, ECONNRESET);
    let sent = node.poll_transmit().unwrap().bytes;
    assert_eq!(sent[5], 0x37, "the Reset tag");
    srv.handle_input(&sent).unwrap();
    assert_eq!(
        events(&mut srv),
        vec![Event::ConnectionClosed {
            conn,
            errno: ECONNRESET
        }]
    );
    // Any errno is a reset; 0 a plain close.
    for (errno, seen) in [(111, ECONNRESET), (0, 0)] {
        let conn = client(&mut srv, 2);
        pump(&mut node, &mut srv);
        events(&mut node);
        node.close_connection(conn, errno);
        pump(&mut node, &mut srv);
        assert_eq!(
            events(&mut srv),
            vec![Event::ConnectionClosed { conn, errno: seen }]
        );
    }
    // Below version 3 a reset goes as a Close, and a Reset frame sent
    // anyway is refused.
    let (mut node, mut srv) = open_v1_pair();
    let conn = client(&mut srv, 1);
    pump(&mut node, &mut srv);
    events(&mut node);
    node.close_connection(conn, ECONNRESET);
    let sent = node.poll_transmit().unwrap().bytes;
    assert_eq!(sent[5], 0x32, "the Close tag");
    let mut out = BytesMut::new();
    codec::encode(&Frame::Reset { conn }, &mut out);
    let err = srv.handle_input(&out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected Reset frame on a channel below version 3"
    );
}

/// A pair whose node speaks up to protocol version 3 (before
/// `Connecting`).
fn open_v3_pair() -> (Channel, Channel) {
    open_pair_up_to(3)
}

#[test]
fn connecting_reaches_a_version_4_node_before_the_response() {
    let (mut node, mut srv) = open_pair(1024);
    assert!(node.speaks_connecting() && srv.speaks_connecting());
    let conn = node.make_connection().unwrap();
    let to = "192.0.2.50:80".parse().unwrap();
    let req = node.request(Request::Connect { conn, addr: to }).unwrap();
    pump(&mut node, &mut srv);
    events(&mut srv);
    let local: std::net::SocketAddr = "192.0.2.1:40000".parse().unwrap();
    assert!(srv.connecting(conn, local), "sent on version 4");
    srv.open_connection(conn).unwrap();
    let response = Response::Status {
        errno: 0,
        addr: Some(local),
    };
    srv.respond(req, response.clone());
    // A late one, for a connection the node no longer has, is dropped.
    srv.connecting(conn + 2, local);
    pump(&mut node, &mut srv);
    assert_eq!(
        events(&mut node),
        vec![
            Event::Connecting { conn, local },
            Event::Response { req, response }
        ]
    );
    assert!(node.is_open());
    // A node does not send it.
    assert!(!node.connecting(conn, local));
    assert!(node.poll_transmit().is_none());
}

#[test]
fn connecting_is_not_sent_below_version_4_and_refused_if_it_comes() {
    let (mut node, mut srv) = open_v3_pair();
    assert!(!node.speaks_connecting() && !srv.speaks_connecting());
    let conn = node.make_connection().unwrap();
    let local: std::net::SocketAddr = "192.0.2.1:40000".parse().unwrap();
    assert!(!srv.connecting(conn, local), "not sent below version 4");
    assert!(srv.poll_transmit().is_none());
    // An io-server that sends it anyway closes the channel.
    let mut out = BytesMut::new();
    codec::encode(&Frame::Connecting { conn, local }, &mut out);
    let err = node.handle_input(&out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected Connecting frame on a channel below version 4"
    );
    // One build in one process speaks it on its version 1 channel.
    let mut cfg = ChannelConfig::new("tok").node("n1", 1);
    cfg.max_version = 1;
    cfg.in_process = true;
    let mut node = Channel::node(cfg);
    let mut server_cfg = ChannelConfig::new("tok");
    server_cfg.in_process = true;
    let mut srv = Channel::io_server(server_cfg);
    pump(&mut node, &mut srv);
    srv.welcome(1);
    pump(&mut node, &mut srv);
    events(&mut node);
    assert_eq!(srv.version(), 1);
    let conn = node.make_connection().unwrap();
    assert!(srv.connecting(conn, local));
    pump(&mut node, &mut srv);
    assert_eq!(events(&mut node), vec![Event::Connecting { conn, local }]);
}

#[test]
fn a_version_1_channel_carries_no_accepted_frame() {
    let (mut node, mut srv) = open_v1_pair();
    let conn = client(&mut srv, 1);
    pump(&mut node, &mut srv);
    events(&mut node);
    node.accepted(conn);
    assert!(
        node.poll_transmit().is_none(),
        "a version 1 node sends none"
    );
    // One sent anyway is a protocol error on that channel.
    let mut out = BytesMut::new();
    codec::encode(&Frame::Accepted { conn }, &mut out);
    let err = srv.handle_input(&out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected Accepted frame on a version 1 channel"
    );
    // And an io-server never sends one.
    let (mut node, _srv) = open_pair(1024);
    assert!(matches!(
        node.handle_input(&out),
        Err(ChannelError::Unexpected {
            frame: "Accepted",
            ..
        })
    ));
}

#[test]
fn sending_past_the_granted_credit_is_a_protocol_error() {
    let (_node, mut srv) = open_pair(100);
    let conn: ConnId = 2;
    srv.open_connection(conn).unwrap();
    let mut out = BytesMut::new();
    codec::encode_data(conn, &[0; 101], &mut out);
    let err = srv.handle_input(&out).unwrap_err();
    assert!(matches!(err, ChannelError::Credit { conn: 2, .. }), "{err}");
}

/// The heart of §2.2: a stopped reader stalls only its own connection.
#[test]
fn slow_reader_does_not_stall_other_connections() {
    let (mut node, mut srv) = open_pair(4096);
    let a = client(&mut srv, 1);
    let b = client(&mut srv, 2);
    pump(&mut node, &mut srv);
    events(&mut node);
    let payload = |i: usize| (i % 251) as u8;
    let total = 1 << 20;
    let (mut sent_a, mut sent_b) = (0, 0);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    // Node reads b always, never a.
    for _ in 0..10_000 {
        for (conn, sent) in [(a, &mut sent_a), (b, &mut sent_b)] {
            let chunk: Vec<u8> = (*sent..(*sent + 1500).min(total)).map(payload).collect();
            *sent += srv.send_message(conn, &chunk).unwrap();
        }
        pump(&mut node, &mut srv);
        for e in events(&mut node) {
            if let Event::MessageReceived { conn, data } = e {
                if conn == b {
                    got_b.extend_from_slice(&data);
                    node.consumed(b, data.len());
                } else {
                    got_a.extend_from_slice(&data);
                }
            }
        }
        if sent_b == total {
            break;
        }
    }
    assert_eq!(sent_b, total, "b kept full throughput");
    assert_eq!(got_a.len(), 4096, "a stopped at exactly its window");
    assert_eq!(sent_a, 4096);
    // The stalled reader resumes: every byte arrives intact, in order.
    let mut consumed_a = 0;
    for _ in 0..10_000 {
        node.consumed(a, got_a.len() - consumed_a);
        consumed_a = got_a.len();
        let chunk: Vec<u8> = (sent_a..(sent_a + 1500).min(total)).map(payload).collect();
        sent_a += srv.send_message(a, &chunk).unwrap();
        pump(&mut node, &mut srv);
        for e in events(&mut node) {
            if let Event::MessageReceived { conn, data } = e {
                assert_eq!(conn, a);
                got_a.extend_from_slice(&data);
            }
        }
        if got_a.len() == total {
            break;
        }
    }
    assert!(got_a.iter().enumerate().all(|(i, &x)| x == payload(i)));
    assert!(got_b.iter().enumerate().all(|(i, &x)| x == payload(i)));
    assert_eq!(got_a.len(), total);
}

#[test]
fn a_blocked_sender_is_told_buffer_available() {
    let (mut node, mut srv) = open_pair(1000);
    let conn = node.make_connection().unwrap();
    srv.open_connection(conn).unwrap();
    assert_eq!(node.send_message(conn, &[1; 1500]).unwrap(), 1000);
    assert_eq!(node.send_message(conn, &[1; 1]).unwrap(), 0);
    pump(&mut node, &mut srv);
    events(&mut srv);
    srv.consumed(conn, 600);
    pump(&mut node, &mut srv);
    assert_eq!(events(&mut node), vec![Event::BufferAvailable { conn }]);
    assert_eq!(node.send_window(conn), 600);
    assert_eq!(node.stats().credit_stalls, 1);
}

#[test]
fn input_given_up_in_buffers_is_decoded_across_any_split() {
    // Three Data frames cut at every byte offset into two buffers: the
    // first buffer becomes the input (nothing pending), the second is
    // appended to the partial frame it left; the payloads arrive whole.
    let frames = || {
        let (mut node, mut srv) = open_pair(64 * 1024);
        let conn = client(&mut srv, 1);
        pump(&mut node, &mut srv);
        events(&mut node);
        for m in [&b"first"[..], b"", b"third message"] {
            srv.send_message(conn, m).unwrap();
        }
        (node, srv.poll_transmit().unwrap().bytes)
    };
    let len = frames().1.len();
    for cut in 0..=len {
        let (mut node, wire) = frames();
        let mut got = Vec::new();
        for part in [&wire[..cut], &wire[cut..]] {
            let mut buf = BytesMut::from(part);
            node.handle_input_buf(&mut buf).unwrap();
            assert!(buf.is_empty(), "the buffer is given up");
            for e in events(&mut node) {
                if let Event::MessageReceived { data, .. } = e {
                    got.extend_from_slice(&data);
                }
            }
        }
        assert_eq!(got, b"firstthird message", "cut at {cut}");
    }
}

/// An owned chunk is the only view of its buffer, so an in-memory reader
/// decodes it in place: the payload it delivers lies in the chunk the
/// writer sent. The next output buffer keeps the capacity; a small chunk
/// is a view, as `poll_transmit` gives.
#[test]
fn owned_transmit_gives_large_buffers_up_and_keeps_their_capacity() {
    let (mut node, mut srv) = open_pair(1 << 20);
    let conn = client(&mut srv, 9);
    pump(&mut node, &mut srv);
    events(&mut node);
    srv.hand_off_buffers(true);
    let big = vec![7; OWNED_MIN + 1000];
    srv.send_message(conn, &big).unwrap();
    let length = srv.pending_transmit();
    let chunk = srv.poll_transmit().unwrap().bytes;
    assert!(srv.poll_transmit().is_none());
    let mut buf = chunk.try_into_mut().expect("the only view of its buffer");
    let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
    node.handle_input_buf(&mut buf).unwrap();
    let data = events(&mut node)
        .into_iter()
        .find_map(|e| match e {
            Event::MessageReceived { data, .. } => Some(data),
            _ => None,
        })
        .unwrap();
    assert_eq!(data[..], big[..]);
    let at = data.as_ptr() as usize;
    assert!(start <= at && at + data.len() <= end, "decoded in place");
    srv.send_message(conn, &[8; 10]).unwrap();
    let small = srv.poll_transmit().unwrap().bytes;
    assert!(small.len() < 100);
    assert!(
        small.try_into_mut().is_err(),
        "a view of the channel's buffer"
    );
    srv.send_message(conn, &big).unwrap();
    let next = srv.poll_transmit().unwrap().bytes;
    assert!(next.try_into_mut().unwrap().capacity() >= length);
}

/// A read straight into a Data frame sends what it read, within the
/// window: a read of nothing queues nothing, and a shut window does not
/// read at all.
#[test]
fn a_read_into_the_frame_sends_what_it_read_within_the_window() {
    let (mut node, mut srv) = open_pair(1000);
    let conn = node.make_connection().unwrap();
    srv.open_connection(conn).unwrap();
    pump(&mut node, &mut srv);
    events(&mut srv);
    let before = node.pending_transmit();
    let nothing = node.reserve(conn, 5000).unwrap().unwrap();
    assert_eq!(nothing.room(), 1000, "room is the window");
    assert_eq!(node.commit(nothing).unwrap(), 0);
    assert_eq!(node.pending_transmit(), before);
    let mut sent = node.reserve(conn, 5000).unwrap().unwrap();
    sent.payload_mut().put_slice(&[5; 600]);
    assert_eq!(node.commit(sent).unwrap(), 600);
    let mut rest = node.reserve(conn, 5000).unwrap().unwrap();
    let room = rest.room();
    rest.payload_mut().put_slice(&vec![6; room]);
    assert_eq!(node.commit(rest).unwrap(), 400);
    assert!(
        node.reserve(conn, 10).unwrap().is_none(),
        "the window is shut"
    );
    pump(&mut node, &mut srv);
    let got: Vec<u8> = events(&mut srv)
        .into_iter()
        .filter_map(|e| match e {
            Event::MessageReceived { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(got, [[5; 600].as_slice(), &[6; 400]].concat());
}

/// The node end of an open pair with one client connection, and the wire
/// octets of `messages` sent on it by the io-server.
fn wire_of(window: u32, messages: &[&[u8]]) -> (Channel, ConnId, Bytes) {
    let (mut node, mut srv) = open_pair(window);
    let conn = client(&mut srv, 1);
    pump(&mut node, &mut srv);
    events(&mut node);
    for m in messages {
        assert_eq!(srv.send_message(conn, m).unwrap(), m.len());
    }
    (node, conn, srv.poll_transmit().unwrap_or_default().bytes)
}

/// What the node received: the payloads delivered and the lengths
/// spliced, in order.
fn received(node: &mut Channel) -> Vec<Result<Bytes, usize>> {
    events(node)
        .into_iter()
        .filter_map(|e| match e {
            Event::MessageReceived { data, .. } => Some(Ok(data)),
            Event::MessageSpliced { len, .. } => Some(Err(len)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_large_data_frame_is_delivered_as_it_arrives_and_may_be_spliced() {
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let (mut node, conn, wire) = wire_of(1 << 18, &[&big, b"after"]);
    let hdr = codec::DATA_OVERHEAD;
    // The header and 10 000 octets: those are delivered now, not held.
    node.handle_input(&wire[..hdr + 10_000]).unwrap();
    assert_eq!(
        received(&mut node),
        vec![Ok(Bytes::from(big[..10_000].to_vec()))]
    );
    assert_eq!(node.payload_pending(), Some((conn, 190_000)));
    // The reader splices 50 000 of them itself.
    node.payload_spliced(50_000);
    assert_eq!(received(&mut node), vec![Err(50_000)]);
    assert_eq!(node.payload_pending(), Some((conn, 140_000)));
    // The rest comes as input, with the next frame behind it.
    node.handle_input(&wire[hdr + 60_000..]).unwrap();
    assert_eq!(
        received(&mut node),
        vec![
            Ok(Bytes::from(big[60_000..].to_vec())),
            Ok(Bytes::from_static(b"after"))
        ]
    );
    assert_eq!(node.payload_pending(), None);
    assert_eq!(node.stats().bytes_received, 200_005);
    // Credited like any payload (past half the window: a Credit frame).
    node.consumed(conn, 200_005);
    assert!(node.pending_transmit() > 0, "a Credit frame is queued");
}

#[test]
fn a_large_frame_past_the_credit_is_refused_at_its_header() {
    let (_node, mut srv) = open_pair(20_000);
    let conn: ConnId = 2;
    srv.open_connection(conn).unwrap();
    let mut out = BytesMut::new();
    codec::encode_data(conn, &[0; 30_000], &mut out);
    // Only the header and a few octets are in: refused already.
    let err = srv
        .handle_input(&out[..codec::DATA_OVERHEAD + 100])
        .unwrap_err();
    assert!(matches!(err, ChannelError::Credit { conn: 2, .. }), "{err}");
    assert!(srv.is_closed());
}

#[test]
fn large_frames_are_decoded_across_any_three_way_split() {
    let first: Vec<u8> = (0..STREAM_MIN as u32 + 3000)
        .map(|i| (i % 241) as u8)
        .collect();
    let second: Vec<u8> = (0..STREAM_MIN as u32 * 2)
        .map(|i| (i % 239) as u8)
        .collect();
    let expect = [&first[..], b"small", &second[..]].concat();
    let (_, _, wire) = wire_of(1 << 20, &[&first, b"small", &second]);
    for a in (0..wire.len()).step_by(997) {
        for b in (a..wire.len()).step_by(3001) {
            let (mut node, conn, _) = wire_of(1 << 20, &[]);
            let mut got = Vec::new();
            for part in [&wire[..a], &wire[a..b], &wire[b..]] {
                node.handle_input(part).unwrap();
                for r in received(&mut node) {
                    got.extend_from_slice(&r.expect("nothing spliced"));
                }
            }
            assert!(got == expect, "cut at {a} and {b}");
            assert_eq!(node.payload_pending(), None);
            node.consumed(conn, got.len());
        }
    }
}

// The sans-IO calls: time in (`start`, `poll_timeout`, `handle_timeout`),
// payload room lent and taken back (`reserve`, `commit`,
// `commit_spliced`), one `poll_transmit`. No runtime, no sockets, and
// every instant given by the test.

/// Both ends of a node channel whose handshake clocks started at `t0`,
/// the handshake not run yet.
fn started_pair(t0: Instant) -> (Channel, Channel) {
    let mut node = Channel::node(ChannelConfig::new("tok").node("n1", 2).window(1000));
    let mut srv = Channel::io_server(ChannelConfig::new("tok").window(1000));
    node.start(t0);
    srv.start(t0);
    (node, srv)
}

/// An open pair with a window of 1000 and one node-made connection on it.
fn pair_with_a_connection() -> (Channel, Channel, ConnId) {
    let (mut node, mut srv) = open_pair(1000);
    let conn = node.make_connection().unwrap();
    srv.open_connection(conn).unwrap();
    pump(&mut node, &mut srv);
    events(&mut srv);
    (node, srv, conn)
}

#[test]
fn the_handshake_times_out_at_exactly_its_deadline_and_not_before() {
    let t0 = Instant::now();
    let (mut node, mut srv) = started_pair(t0);
    let deadline = t0 + HANDSHAKE_TIMEOUT;
    assert_eq!(srv.poll_timeout(), Some(deadline));
    assert_eq!(node.poll_timeout(), Some(deadline));
    // The node's Hello never reaches the io-server.
    let hello = node.poll_transmit().unwrap();
    assert_eq!(hello.spliced, 0);
    srv.handle_timeout(deadline - Duration::from_nanos(1));
    assert!(!srv.is_closed(), "not a nanosecond early");
    assert_eq!(srv.poll_timeout(), Some(deadline));
    srv.handle_timeout(deadline);
    assert!(srv.is_closed());
    assert_eq!(
        closed_reason(&events(&mut srv)).as_deref(),
        Some("closed locally: authentication did not complete within 10 s")
    );
    let goaway = srv.poll_transmit().unwrap().bytes;
    assert!(String::from_utf8_lossy(&goaway).contains("did not complete within 10 s"));
    assert_eq!(
        srv.poll_timeout(),
        None,
        "a closed channel asks for no time"
    );
}

#[test]
fn poll_timeout_is_none_once_open_and_time_no_longer_closes_it() {
    let t0 = Instant::now();
    let (mut node, mut srv) = started_pair(t0);
    pump(&mut node, &mut srv);
    srv.welcome(7);
    pump(&mut node, &mut srv);
    assert!(node.is_open() && srv.is_open());
    assert_eq!(node.poll_timeout(), None);
    assert_eq!(srv.poll_timeout(), None);
    node.handle_timeout(t0 + HANDSHAKE_TIMEOUT * 100);
    srv.handle_timeout(t0 + HANDSHAKE_TIMEOUT * 100);
    assert!(node.is_open() && srv.is_open());
}

#[test]
fn a_channel_whose_clock_never_started_asks_for_no_time() {
    let mut node = Channel::node(ChannelConfig::new("tok").node("n1", 1));
    assert_eq!(node.poll_timeout(), None);
    node.handle_timeout(Instant::now() + HANDSHAKE_TIMEOUT * 2);
    assert!(!node.is_closed());
}

#[test]
fn reserve_never_lends_past_the_window_and_a_short_commit_leaves_the_rest() {
    let (mut node, _srv, conn) = pair_with_a_connection();
    let mut first = node.reserve(conn, 5000).unwrap().unwrap();
    assert_eq!(first.room(), 1000, "the whole window, not the 5000 asked");
    assert!(
        node.reserve(conn, 1).unwrap().is_none(),
        "what is lent is not lent twice"
    );
    first.payload_mut().put_slice(&[1; 300]);
    assert_eq!(node.commit(first).unwrap(), 300);
    assert_eq!(node.send_window(conn), 700);
    let second = node.reserve(conn, 5000).unwrap().unwrap();
    assert_eq!(second.room(), 700, "the 700 not written are the window's");
    assert_eq!(node.commit(second).unwrap(), 0);
    assert_eq!(node.send_window(conn), 700);
    assert_eq!(node.reserve(conn, 200).unwrap().unwrap().room(), 200);
}

#[test]
fn a_payload_never_outgrows_its_reservation() {
    let (mut node, _srv, conn) = pair_with_a_connection();
    let mut r = node.reserve(conn, 100).unwrap().unwrap();
    assert_eq!(r.payload_mut().remaining_mut(), 100);
    r.payload_mut().put_slice(&[2; 60]);
    assert_eq!(r.payload_mut().remaining_mut(), 40);
    assert_eq!((r.len(), r.payload()), (60, &[2; 60][..]));
    assert_eq!(node.commit(r).unwrap(), 60);
}

#[test]
fn a_commit_after_the_connection_closed_sends_nothing() {
    let (mut node, _srv, conn) = pair_with_a_connection();
    let mut r = node.reserve(conn, 100).unwrap().unwrap();
    r.payload_mut().put_slice(b"late");
    node.close_connection(conn, 0);
    let before = node.pending_transmit();
    assert_eq!(node.commit(r), Err(CallError::UnknownConnection(conn)));
    assert_eq!(node.pending_transmit(), before);
    assert_eq!(node.stats().bytes_sent, 0);
}

#[test]
fn commit_spliced_counts_the_payload_and_queues_its_header_before_it() {
    let (mut node, mut srv, conn) = pair_with_a_connection();
    let r = node.reserve(conn, 5000).unwrap().unwrap();
    assert_eq!(node.commit_spliced(r, 600).unwrap(), 600);
    assert_eq!(node.send_window(conn), 400);
    let stats = node.stats();
    assert_eq!((stats.bytes_sent, stats.bytes_spliced), (600, 600));
    assert_eq!(node.pending_transmit(), codec::DATA_OVERHEAD + 600);
    let t = node.poll_transmit().unwrap();
    assert_eq!(t.spliced, 600);
    assert_eq!(codec::peek_data(&t.bytes), Some((conn, 600)));
    assert_eq!(t.bytes.len(), codec::DATA_OVERHEAD);
    assert_eq!(node.poll_transmit(), None);
    // The header and the payload after it are one Data frame to the peer.
    let mut wire = t.bytes.to_vec();
    wire.extend_from_slice(&[3; 600]);
    srv.handle_input(&wire).unwrap();
    assert_eq!(
        events(&mut srv),
        vec![Event::MessageReceived {
            conn,
            data: Bytes::from(vec![3; 600])
        }]
    );
    // Nothing spliced, nothing sent: the room goes back.
    let r = node.reserve(conn, 5000).unwrap().unwrap();
    assert_eq!(node.commit_spliced(r, 0).unwrap(), 0);
    assert_eq!((node.send_window(conn), node.pending_transmit()), (400, 0));
}

/// A shell stopped in the middle of a write gives the rest back: it goes
/// out first, before what was queued since, and counts as pending (and
/// in a snapshot) until written. The peer sees one unbroken stream.
#[test]
fn the_unwritten_rest_of_a_transmit_goes_out_first() {
    let (mut node, mut srv, conn) = pair_with_a_connection();
    node.send_message(conn, b"first message").unwrap();
    let r = node.reserve(conn, 100).unwrap().unwrap();
    node.commit_spliced(r, 40).unwrap();
    let t = node.poll_transmit().unwrap();
    assert_eq!(t.spliced, 40);
    // Written: all but 5 of its bytes; none of its spliced octets.
    let cut = t.bytes.len() - 5;
    let mut wire = t.bytes[..cut].to_vec();
    node.unpoll_transmit(Transmit {
        bytes: t.bytes.slice(cut..),
        spliced: 40,
    });
    node.send_message(conn, b"then this").unwrap();
    assert_eq!(node.pending_transmit(), 5 + 40 + codec::DATA_OVERHEAD + 9);
    let snap = node.snapshot(Instant::now()).unwrap();
    let mut node = Channel::restore(
        ChannelConfig::new("tok").node("n1", 2).window(1000),
        snap,
        Instant::now(),
    )
    .unwrap();
    let rest = node.poll_transmit().unwrap();
    assert_eq!((&rest.bytes[..], rest.spliced), (&t.bytes[cut..], 40));
    wire.extend_from_slice(&rest.bytes);
    // Then: the header was written, 30 of the 40 spliced octets.
    wire.extend_from_slice(&[3; 30]);
    node.unpoll_transmit(Transmit {
        bytes: Bytes::new(),
        spliced: 10,
    });
    // Nothing written: nothing given back.
    node.unpoll_transmit(Transmit::default());
    let rest = node.poll_transmit().unwrap();
    assert_eq!((rest.bytes.len(), rest.spliced), (0, 10));
    wire.extend_from_slice(&[3; 10]);
    while let Some(t) = node.poll_transmit() {
        assert_eq!(t.spliced, 0);
        wire.extend_from_slice(&t.bytes);
    }
    srv.handle_input(&wire).unwrap();
    let got: Vec<Bytes> = events(&mut srv)
        .into_iter()
        .filter_map(|e| match e {
            Event::MessageReceived { data, .. } => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        vec![
            Bytes::from_static(b"first message"),
            Bytes::from(vec![3; 40]),
            Bytes::from_static(b"then this")
        ]
    );
}

#[test]
fn one_poll_transmit_drains_frames_and_spliced_payloads_in_order() {
    let (mut node, _srv, conn) = pair_with_a_connection();
    node.send_message(conn, b"before").unwrap();
    let r = node.reserve(conn, 100).unwrap().unwrap();
    node.commit_spliced(r, 100).unwrap();
    let mut r = node.reserve(conn, 100).unwrap().unwrap();
    r.payload_mut().put_slice(b"read");
    node.commit(r).unwrap();
    node.send_fin(conn).unwrap();
    let first = node.poll_transmit().unwrap();
    let second = node.poll_transmit().unwrap();
    assert_eq!(node.poll_transmit(), None);
    assert_eq!(
        first.spliced, 100,
        "the spliced payload follows the first bytes"
    );
    assert_eq!(second.spliced, 0);
    let mut head = BytesMut::from(&first.bytes[..]);
    assert_eq!(
        codec::decode(&mut head, codec::DEFAULT_MAX_FRAME).unwrap(),
        Some(Frame::Data {
            conn,
            data: Bytes::from_static(b"before")
        })
    );
    assert_eq!(
        &head[..],
        &first.bytes[first.bytes.len() - codec::DATA_OVERHEAD..]
    );
    assert_eq!(codec::peek_data(&head), Some((conn, 100)));
    let mut rest = BytesMut::from(&second.bytes[..]);
    let frames: Vec<Frame> =
        std::iter::from_fn(|| codec::decode(&mut rest, codec::DEFAULT_MAX_FRAME).unwrap())
            .collect();
    assert_eq!(
        frames,
        vec![
            Frame::Data {
                conn,
                data: Bytes::from_static(b"read")
            },
            Frame::Fin { conn }
        ]
    );
}

/// The zero-copy shape of the relay's reads: once the output buffer has
/// room ([`codec::READ_FLOOR`]), each payload is written where it goes
/// out, and frames committed one after another leave in one buffer, with
/// no copy and no new buffer.
#[test]
fn committed_reads_go_out_in_one_buffer_where_they_were_written() {
    let (mut node, mut srv) = open_pair(1 << 20);
    let conn = node.make_connection().unwrap();
    srv.open_connection(conn).unwrap();
    pump(&mut node, &mut srv);
    // A first large read that found nothing leaves its room behind.
    let r = node.reserve(conn, 64 * 1024).unwrap().unwrap();
    assert_eq!(node.commit(r).unwrap(), 0);
    let mut at = Vec::new();
    for payload in [&b"first read"[..], b"second read"] {
        let mut r = node.reserve(conn, 100).unwrap().unwrap();
        r.payload_mut().put_slice(payload);
        at.push(r.payload().as_ptr() as usize);
        node.commit(r).unwrap();
    }
    let t = node.poll_transmit().unwrap();
    assert_eq!(node.poll_transmit(), None, "one buffer");
    let start = t.bytes.as_ptr() as usize;
    assert_eq!(
        at,
        [
            start + codec::DATA_OVERHEAD,
            start + 2 * codec::DATA_OVERHEAD + b"first read".len()
        ],
        "each payload lies where it was written"
    );
}

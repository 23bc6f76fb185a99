//! Round trips, truncations and limits of the codec.

use super::*;
use crate::frame::bind_flags;

/// A frame split off for a read uses the room the buffer has when that
/// is ample (no new buffer), asks for `limit` when it is not, and rejoins
/// the buffer without a copy, framing only what was read.
#[test]
fn a_read_into_a_frame_uses_ample_room_and_frames_what_it_read() {
    let mut out = BytesMut::with_capacity(DATA_OVERHEAD + READ_FLOOR + 100);
    let at = out.as_ptr();
    let (mut frame, room) = split_data_frame(3, 64 * 1024, &mut out);
    assert_eq!(room, READ_FLOOR + 100);
    frame.put_slice(b"abc");
    seal_data_frame(&mut frame, 3);
    out.unsplit(frame);
    assert_eq!(out.as_ptr(), at, "no new buffer");
    let mut small = BytesMut::new();
    let (_, room) = split_data_frame(3, 5000, &mut small);
    assert_eq!(room, 5000);
    assert!(small.is_empty(), "nothing framed in the buffer itself");
    match decode(&mut out, 1 << 20).unwrap() {
        Some(Frame::Data { conn: 3, data }) => assert_eq!(&data[..], b"abc"),
        f => panic!("{f:?}"),
    }
    assert!(out.is_empty());
}

fn samples() -> Vec<Frame> {
    let v4: SocketAddr = "192.0.2.7:8080".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    vec![
        Frame::Hello {
            min_version: 1,
            max_version: 1,
            node: "web-1".into(),
            weight: 3,
            window: 65536,
            nonce: [7; NONCE_LEN],
        },
        Frame::Challenge {
            version: 1,
            window: 1 << 20,
            nonce: [1; NONCE_LEN],
            proof: [2; NONCE_LEN],
        },
        Frame::Auth {
            proof: [3; NONCE_LEN],
        },
        Frame::Welcome { node_id: 9 },
        Frame::GoAway {
            reason: "bye".into(),
        },
        Frame::Request {
            req: 1,
            request: Request::Bind {
                conn: 2,
                addr: v6,
                flags: bind_flags::REUSEPORT,
            },
        },
        Frame::Request {
            req: 2,
            request: Request::Listen {
                conn: 2,
                backlog: 511,
            },
        },
        Frame::Request {
            req: 3,
            request: Request::Connect { conn: 4, addr: v4 },
        },
        Frame::Request {
            req: 4,
            request: Request::Shutdown {
                conn: 4,
                how: ShutdownHow::Write,
            },
        },
        Frame::Request {
            req: 5,
            request: Request::SetOpt {
                conn: 4,
                level: 6,
                name: 1,
                value: Bytes::from_static(&[1, 0, 0, 0]),
            },
        },
        Frame::Request {
            req: 6,
            request: Request::GetOpt {
                conn: 4,
                level: 6,
                name: 11,
                len: 232,
            },
        },
        Frame::Response {
            req: 1,
            response: Response::Status {
                errno: 0,
                addr: Some(v4),
            },
        },
        Frame::Response {
            req: 3,
            response: Response::Status {
                errno: 111,
                addr: None,
            },
        },
        Frame::Response {
            req: 6,
            response: Response::OptValue {
                errno: 0,
                value: Bytes::from_static(b"abcd"),
            },
        },
        Frame::ConnectionAccepted {
            listener: 2,
            conn: 1,
            peer: v4,
            local: v6,
        },
        Frame::ConnectionClosed {
            conn: 1,
            errno: 104,
        },
        Frame::Close { conn: 1 },
        Frame::Accepted { conn: 3 },
        Frame::Reset { conn: 4 },
        Frame::Connecting { conn: 6, local: v4 },
        Frame::Connecting { conn: 8, local: v6 },
        Frame::Data {
            conn: 1,
            data: Bytes::from_static(b"hello"),
        },
        Frame::Fin { conn: 1 },
        Frame::Credit {
            conn: 1,
            limit: u64::MAX,
        },
        Frame::Weight { weight: 0 },
        Frame::Ping { token: 5 },
        Frame::Pong { token: 5 },
    ]
}

#[test]
fn every_frame_round_trips() {
    for f in samples() {
        let mut buf = BytesMut::new();
        encode(&f, &mut buf);
        let got = decode(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!(got, f);
        assert!(buf.is_empty());
    }
}

#[test]
fn every_truncation_asks_for_more_or_fails_cleanly() {
    for f in samples() {
        let mut full = BytesMut::new();
        encode(&f, &mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(
                decode(&mut part, DEFAULT_MAX_FRAME),
                Ok(None),
                "{f:?} cut {cut}"
            );
            assert_eq!(part.len(), cut);
        }
        // A frame whose length field lies (body shortened) is malformed.
        if full.len() > HEADER_LEN + 1 {
            let mut lying = BytesMut::from(&full[..full.len() - 1]);
            let len = (lying.len() - 4) as u32;
            lying[..4].copy_from_slice(&len.to_be_bytes());
            if !matches!(f, Frame::Data { .. }) {
                assert!(decode(&mut lying, DEFAULT_MAX_FRAME).is_err(), "{f:?}");
            }
        }
    }
}

#[test]
fn oversized_unknown_and_wrong_version_are_errors() {
    let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 0x33][..]);
    assert!(matches!(
        decode(&mut b, DEFAULT_MAX_FRAME),
        Err(DecodeError::Oversized { .. })
    ));
    let mut b = BytesMut::from(&[0, 0, 0, 2, 1, 0x99][..]);
    assert_eq!(
        decode(&mut b, DEFAULT_MAX_FRAME),
        Err(DecodeError::UnknownTag(0x99))
    );
    let mut b = BytesMut::from(&[0, 0, 0, 2, 2, tag::PING][..]);
    assert_eq!(
        decode(&mut b, DEFAULT_MAX_FRAME),
        Err(DecodeError::Version(2))
    );
    let mut b = BytesMut::from(&[0, 0, 0, 1, 1][..]);
    assert_eq!(decode(&mut b, DEFAULT_MAX_FRAME), Err(DecodeError::Runt(1)));
}

/// `Accepted` (protocol version 2) is one small frame: the framing's
/// version octet stays 1, the tag is 0x36, the body the connection.
#[test]
fn accepted_is_fourteen_octets_in_the_version_1_framing() {
    let mut b = BytesMut::new();
    encode(&Frame::Accepted { conn: 0x0102 }, &mut b);
    assert_eq!(
        &b[..],
        &[0, 0, 0, 10, WIRE_VERSION, 0x36, 0, 0, 0, 0, 0, 0, 1, 2][..]
    );
    assert_eq!(WIRE_VERSION, 1);
    // A body that is not exactly one u64 is malformed.
    let mut short = BytesMut::from(&[0, 0, 0, 9, 1, 0x36, 0, 0, 0, 0, 0, 0, 1][..]);
    assert!(matches!(
        decode(&mut short, DEFAULT_MAX_FRAME),
        Err(DecodeError::Malformed {
            frame: "Accepted",
            what: "truncated"
        })
    ));
    let mut long = BytesMut::from(&[0, 0, 0, 11, 1, 0x36, 0, 0, 0, 0, 0, 0, 0, 1, 9][..]);
    assert!(matches!(
        decode(&mut long, DEFAULT_MAX_FRAME),
        Err(DecodeError::Malformed {
            frame: "Accepted",
            what: "trailing bytes"
        })
    ));
}

#[test]
fn encode_data_matches_generic_encoding() {
    let mut a = BytesMut::new();
    let mut b = BytesMut::new();
    encode_data(42, b"xyz", &mut a);
    encode(
        &Frame::Data {
            conn: 42,
            data: Bytes::from_static(b"xyz"),
        },
        &mut b,
    );
    assert_eq!(a, b);
}

/// `Connecting` (protocol version 4): tag 0x38, the node's conn id, then
/// the local address as every address is carried.
#[test]
fn connecting_has_its_tag_and_layout() {
    let local: std::net::SocketAddr = "192.0.2.1:40000".parse().unwrap();
    let mut buf = BytesMut::new();
    encode(&Frame::Connecting { conn: 6, local }, &mut buf);
    assert_eq!(
        &buf[..],
        &[
            0, 0, 0, 17, // len: version, tag, conn 8, address 7
            1, 0x38, // framing version, tag
            0, 0, 0, 0, 0, 0, 0, 6, // conn
            4, 192, 0, 2, 1, 0x9c, 0x40, // family, ip, port 40000
        ][..]
    );
    assert_eq!(
        decode(&mut buf, DEFAULT_MAX_FRAME),
        Ok(Some(Frame::Connecting { conn: 6, local }))
    );
    // A bad family in its address is malformed, not a panic.
    let mut bad = BytesMut::from(
        &[
            0, 0, 0, 17, 1, 0x38, 0, 0, 0, 0, 0, 0, 0, 6, 5, 1, 2, 3, 4, 0, 1,
        ][..],
    );
    assert!(decode(&mut bad, DEFAULT_MAX_FRAME).is_err());
}

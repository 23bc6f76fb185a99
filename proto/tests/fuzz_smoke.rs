//! Stable "fuzz smoke" run of the cargo-fuzz targets in `fuzz/src/lib.rs`:
//! the same functions libFuzzer drives on nightly, here over proptest
//! inputs on every `cargo test`, so a panic on bad input is caught without
//! a nightly toolchain.

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use bytes::BytesMut;
use proptest::prelude::*;
use saps_proto::codec;
use saps_proto::Frame;

/// Well-formed frames to splice into the generated inputs, so that the
/// decoder and the channel get past the first length check.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let conn = 0u64..8;
    prop_oneof![
        (conn.clone(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(conn, d)| {
            Frame::Data {
                conn,
                data: d.into(),
            }
        }),
        (conn.clone(), any::<u64>()).prop_map(|(conn, limit)| Frame::Credit { conn, limit }),
        conn.clone().prop_map(|conn| Frame::Fin { conn }),
        conn.clone().prop_map(|conn| Frame::Close { conn }),
        conn.clone().prop_map(|conn| Frame::Accepted { conn }),
        (conn, any::<i32>()).prop_map(|(conn, errno)| Frame::ConnectionClosed { conn, errno }),
        any::<u64>().prop_map(|token| Frame::Ping { token }),
        any::<u32>().prop_map(|weight| Frame::Weight { weight }),
    ]
    .prop_map(|f| {
        let mut out = BytesMut::new();
        codec::encode(&f, &mut out);
        out.to_vec()
    })
}

/// Random bytes, or well-formed frames with one byte flipped.
fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (
            any::<u8>(),
            prop::collection::vec(frame(), 0..8),
            any::<usize>(),
            any::<u8>()
        )
            .prop_map(|(head, frames, at, flip)| {
                let mut v = vec![head];
                frames.iter().for_each(|f| v.extend_from_slice(f));
                let i = at % v.len();
                v[i] ^= flip;
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16_000))]

    #[test]
    fn the_decoder_never_panics_and_its_encoding_is_canonical(data in input()) {
        targets::decode(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    #[test]
    fn a_channel_of_either_role_never_panics_on_any_input(data in input()) {
        targets::channel(&data);
    }
}

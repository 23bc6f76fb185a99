//! Node authentication: a shared token proved by challenge-response.
//!
//! Both sides send a random nonce; each proves the token with an
//! HMAC-SHA256 over both nonces and its role, so the token never crosses
//! the wire and a recorded proof is useless on another channel.

use crate::frame::NONCE_LEN;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Which side is proving the token.
#[derive(Debug, Clone, Copy)]
pub enum Prover {
    Node,
    IoServer,
}

fn mac(token: &[u8], prover: Prover, node_nonce: &[u8], server_nonce: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(match prover {
        Prover::Node => b"saps-node\0",
        Prover::IoServer => b"saps-iosrv",
    });
    m.update(node_nonce);
    m.update(server_nonce);
    m
}

/// The proof `prover` sends for this pair of nonces.
pub fn prove(
    token: &[u8],
    prover: Prover,
    node_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
) -> [u8; NONCE_LEN] {
    mac(token, prover, node_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof in constant time.
pub fn verify(
    token: &[u8],
    prover: Prover,
    node_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
    proof: &[u8; NONCE_LEN],
) -> bool {
    mac(token, prover, node_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0; NONCE_LEN];
    getrandom::getrandom(&mut n).expect("the OS random source is available");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_token_role_and_nonces() {
        let (a, b) = ([1; NONCE_LEN], [2; NONCE_LEN]);
        let p = prove(b"secret", Prover::Node, &a, &b);
        assert!(verify(b"secret", Prover::Node, &a, &b, &p));
        assert!(!verify(b"wrong", Prover::Node, &a, &b, &p));
        assert!(!verify(b"secret", Prover::IoServer, &a, &b, &p));
        assert!(!verify(b"secret", Prover::Node, &b, &a, &p));
    }
}

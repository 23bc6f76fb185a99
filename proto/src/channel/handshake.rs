//! The handshake of a channel (docs/fabric.md, "Handshake and
//! authentication"): `Hello` (node), `Challenge` (io-server), `Auth`
//! (node), `Welcome` (io-server), each end proving the token, and the
//! protocol version and the peers' `B_r` agreed on the way.

use super::config::ChannelConfig;
use super::event::{ChannelError, Event};
use crate::auth::{self, Prover};
use crate::frame::{Frame, NONCE_LEN};

/// Where a channel is in its life.
#[derive(Debug)]
pub(super) enum State {
    /// io-server: waiting for the node's Hello.
    AwaitHello,
    /// Node: Hello sent with this nonce.
    AwaitChallenge {
        nonce: [u8; NONCE_LEN],
    },
    /// io-server: Challenge sent; waiting for the node's proof.
    AwaitAuth {
        node_nonce: [u8; NONCE_LEN],
        server_nonce: [u8; NONCE_LEN],
        node: String,
        weight: u32,
    },
    /// Node: proof sent; waiting for Welcome.
    AwaitWelcome,
    Open,
    Closed,
}

impl State {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            State::AwaitHello => "before Hello",
            State::AwaitChallenge { .. } => "before Challenge",
            State::AwaitAuth { .. } => "before Auth",
            State::AwaitWelcome => "before Welcome",
            State::Open => "on an open channel",
            State::Closed => "after close",
        }
    }
}

/// What one handshake frame did.
#[derive(Debug, Default)]
pub(super) struct Step {
    /// The protocol version and the peer's `B_r`, once agreed.
    pub(super) agreed: Option<(u8, u32)>,
    /// The frame to answer with.
    pub(super) reply: Option<Frame>,
    pub(super) event: Option<Event>,
}

impl Step {
    fn event(event: Event) -> Self {
        Self {
            event: Some(event),
            ..Self::default()
        }
    }
}

/// Takes one frame of a channel not open yet, in `state`.
pub(super) fn step(
    state: &mut State,
    config: &ChannelConfig,
    frame: Frame,
) -> Result<Step, ChannelError> {
    match (&*state, frame) {
        (
            State::AwaitHello,
            Frame::Hello {
                min_version,
                max_version,
                node,
                weight,
                window,
                nonce,
            },
        ) => {
            let version = max_version.min(config.max_version);
            if version < min_version.max(config.min_version) {
                return Err(ChannelError::VersionMismatch {
                    node_min: min_version,
                    node_max: max_version,
                    server_min: config.min_version,
                    server_max: config.max_version,
                });
            }
            check_window(config, window)?;
            check_weight(config, weight)?;
            let server_nonce = auth::nonce();
            let proof = auth::prove(&config.token, Prover::IoServer, &nonce, &server_nonce);
            *state = State::AwaitAuth {
                node_nonce: nonce,
                server_nonce,
                node,
                weight,
            };
            Ok(Step {
                agreed: Some((version, window)),
                reply: Some(Frame::Challenge {
                    version,
                    window: config.window,
                    nonce: server_nonce,
                    proof,
                }),
                event: None,
            })
        }
        (
            State::AwaitChallenge { nonce },
            Frame::Challenge {
                version,
                window,
                nonce: server_nonce,
                proof,
            },
        ) => {
            if version < config.min_version || version > config.max_version {
                return Err(ChannelError::VersionMismatch {
                    node_min: config.min_version,
                    node_max: config.max_version,
                    server_min: version,
                    server_max: version,
                });
            }
            let token = &config.token;
            if !auth::verify(token, Prover::IoServer, nonce, &server_nonce, &proof) {
                return Err(ChannelError::BadServerProof);
            }
            let proof = auth::prove(token, Prover::Node, nonce, &server_nonce);
            *state = State::AwaitWelcome;
            Ok(Step {
                agreed: Some((version, window)),
                reply: Some(Frame::Auth { proof }),
                event: None,
            })
        }
        (
            State::AwaitAuth {
                node_nonce,
                server_nonce,
                ..
            },
            Frame::Auth { proof },
        ) => {
            let token = &config.token;
            if !auth::verify(token, Prover::Node, node_nonce, server_nonce, &proof) {
                return Err(ChannelError::BadToken);
            }
            let State::AwaitAuth { node, weight, .. } = std::mem::replace(state, State::Open)
            else {
                unreachable!("matched above")
            };
            Ok(Step::event(Event::NodeAuthenticated { node, weight }))
        }
        (State::AwaitWelcome, Frame::Welcome { node_id }) => {
            *state = State::Open;
            Ok(Step::event(Event::Welcome { node_id }))
        }
        (_, frame) => Err(ChannelError::Unexpected {
            frame: frame.name(),
            state: state.describe(),
        }),
    }
}

/// A node's `B_r` above [`ChannelConfig::max_peer_window`] is refused.
fn check_window(config: &ChannelConfig, window: u32) -> Result<(), ChannelError> {
    if window > config.max_peer_window {
        return Err(ChannelError::AboveCap {
            what: "the node's window",
            asked: window.into(),
            cap: config.max_peer_window.into(),
            flag: "--max-window",
        });
    }
    Ok(())
}

/// A node's weight above [`ChannelConfig::max_weight`] is refused.
pub(super) fn check_weight(config: &ChannelConfig, weight: u32) -> Result<(), ChannelError> {
    if weight > config.max_weight {
        return Err(ChannelError::AboveCap {
            what: "the node's weight",
            asked: weight.into(),
            cap: config.max_weight.into(),
            flag: "--max-weight",
        });
    }
    Ok(())
}

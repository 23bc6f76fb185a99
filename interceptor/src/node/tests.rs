//! The node's decisions without a socket (backoff, hand-off side,
//! token, the first terminating signal), and its join and rejoin against
//! an in-process stand-in of the io-server over the fabric's in-memory
//! transport and a unix socket.

use super::config::{EmbeddedIoServer, IoServerLink, RemoteIoServer};
use super::error::NodeError;
use super::join::{self, Events, Identity};
use super::program::Stopping;
use super::rejoin::{stay_joined, Backoff, ChannelUser, Rejoin};
use saps_fabric::endpoint::{Endpoint, EndpointEvent};
use saps_fabric::transport::{memory_pair, FabricUrl, StreamListener, StreamReader, StreamWriter};
use saps_fabric::{Channel, ChannelConfig};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long any one step of a test may take on a loaded machine.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {LIMIT:?}"))
}

/// A path of this test process's own under the temporary directory.
fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("saps-node-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A private (mode 0600) token file holding `contents`.
fn token_file(name: &str, contents: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = scratch(name);
    std::fs::write(&p, contents).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn me() -> Identity {
    Identity {
        name: "web1".into(),
        weight: 3,
    }
}

/// The io-server's side of a handshake: checks who joined and welcomes
/// it as `node_id`.
async fn welcome(
    (r, w): (StreamReader, StreamWriter),
    token: &str,
    node_id: u32,
) -> (Endpoint, Events) {
    let (server, mut events) = Endpoint::spawn(Channel::io_server(ChannelConfig::new(token)), r, w);
    let first = within("the node's authentication", events.recv()).await;
    assert_eq!(
        first,
        Some(EndpointEvent::NodeAuthenticated {
            node: "web1".into(),
            weight: 3
        })
    );
    server.handle().with(|ch| ch.welcome(node_id));
    (server, events)
}

/// Stands in for the supervisor: says when a channel's events ended and
/// which channels it was handed.
struct Recorder {
    lost: mpsc::UnboundedSender<()>,
    rejoined: mpsc::UnboundedSender<Endpoint>,
}

impl ChannelUser for Recorder {
    async fn serve_events(&self, mut events: Events) {
        while let Some(ev) = events.recv().await {
            if let EndpointEvent::Closed { .. } = ev {
                break;
            }
        }
        let _ = self.lost.send(());
    }

    async fn rejoined(&self, endpoint: Endpoint) {
        let _ = self.rejoined.send(endpoint);
    }
}

fn recorder() -> (
    Recorder,
    mpsc::UnboundedReceiver<()>,
    mpsc::UnboundedReceiver<Endpoint>,
) {
    let (lost, lost_rx) = mpsc::unbounded_channel();
    let (rejoined, rejoined_rx) = mpsc::unbounded_channel();
    (Recorder { lost, rejoined }, lost_rx, rejoined_rx)
}

#[test]
fn backoff_doubles_from_a_tenth_of_a_second_up_to_two_seconds() {
    let mut b = Backoff::new();
    let pauses: Vec<u64> = (0..7)
        .map(|_| b.after_failure().as_millis() as u64)
        .collect();
    assert_eq!(pauses, [100, 200, 400, 800, 1600, 2000, 2000]);
}

#[test]
fn zero_relay_over_a_unix_fabric_claims_the_handoff_socket_beside_it() {
    let t = Path::new("/etc/saps/token");
    let r = RemoteIoServer::new("unix:/run/saps.sock", t, true).unwrap();
    assert_eq!(r.url, FabricUrl::Unix("/run/saps.sock".into()));
    assert_eq!(
        r.handoff_side,
        Some(PathBuf::from("/run/saps.sock.handoff"))
    );
    assert_eq!(r.url_text, "unix:/run/saps.sock");
}

#[test]
fn a_node_on_another_host_or_with_zero_relay_off_relays_every_byte() {
    let t = Path::new("/etc/saps/token");
    for (url, zero_relay) in [
        ("tcp://gw:7700", true),
        ("rdma://gw:7700", true),
        ("unix:/run/saps.sock", false),
    ] {
        let r = RemoteIoServer::new(url, t, zero_relay).unwrap();
        assert_eq!(r.handoff_side, None, "{url}, zero-relay {zero_relay}");
    }
}

#[test]
fn an_io_server_url_without_a_known_scheme_is_refused() {
    let e = RemoteIoServer::new("http://gw:80", Path::new("t"), true).unwrap_err();
    assert!(e.to_string().contains("must start with unix:"), "{e}");
}

#[test]
fn the_token_is_read_without_surrounding_white_space_each_time() {
    let path = token_file("token-ws", "  s3cret\n");
    let r = RemoteIoServer::new("tcp://gw:7700", &path, true).unwrap();
    assert_eq!(r.read_token().unwrap(), b"s3cret");
    std::fs::write(&path, "rotated\n").unwrap();
    assert_eq!(r.read_token().unwrap(), b"rotated");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_token_file_open_to_other_users_is_refused_naming_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let path = token_file("token-open", "s3cret\n");
    let r = RemoteIoServer::new("tcp://gw:7700", &path, true).unwrap();
    for mode in [0o644, 0o604, 0o601] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = r.read_token().unwrap_err();
        assert!(matches!(e, NodeError::TokenNotPrivate { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "the token file {0} is open to other users (mode {mode:04o}); make it private: chmod o-rwx {0}",
                path.display()
            )
        );
    }
    // Readable by its group (a `saps` group of operators) is private enough.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(r.read_token().unwrap(), b"s3cret");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn an_empty_or_missing_token_file_is_an_error_naming_it() {
    let path = token_file("token-empty", " \n");
    let r = RemoteIoServer::new("tcp://gw:7700", &path, true).unwrap();
    let e = r.read_token().unwrap_err();
    assert!(matches!(e, NodeError::EmptyToken { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("the token file {} is empty", path.display())
    );
    std::fs::remove_file(&path).unwrap();
    let e = r.read_token().unwrap_err();
    assert!(matches!(e, NodeError::Token { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("reading the token file {}", path.display())
    );
}

#[test]
fn the_embedded_io_server_is_labelled_embedded_in_traces() {
    let (_, node_end) = memory_pair();
    let link = IoServerLink::Embedded(EmbeddedIoServer {
        transport: node_end,
        token: b"t".to_vec(),
        handoffs: None,
        native_sockets: false,
    });
    assert_eq!(link.label(), "embedded");
}

#[test]
fn only_the_first_terminating_signal_is_recorded_for_stopping_the_rest() {
    let mut first = None;
    assert!(!Stopping::record(&mut first, libc::SIGHUP, false));
    assert!(!Stopping::record(&mut first, libc::SIGUSR1, true));
    assert_eq!(first, None, "reload signals do not stop the program");
    assert!(Stopping::record(&mut first, libc::SIGINT, false));
    assert!(!Stopping::record(&mut first, libc::SIGTERM, true));
    assert_eq!(
        first,
        Some(Stopping {
            signal: libc::SIGINT,
            to_tree: false
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_node_is_welcomed_and_does_not_rejoin_when_its_channel_closes() {
    let (server_end, node_end) = memory_pair();
    let server = tokio::spawn(async move { welcome(server_end, "tok", 7).await });
    let joined = within(
        "the join",
        join::handshake(&me(), b"tok".to_vec(), node_end),
    )
    .await
    .unwrap();
    assert_eq!(joined.node_id, 7);
    let (server, _server_events) = server.await.unwrap();
    let (user, mut lost, mut rejoined) = recorder();
    let node = tokio::spawn(stay_joined(user, joined.events, None));
    server.handle().with(|ch| ch.close("shutting down"));
    within("serving the lost channel's events to its end", lost.recv()).await;
    within("the node giving up", node).await.unwrap();
    assert!(
        rejoined.try_recv().is_err(),
        "an embedded node never rejoins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_token_is_refused_with_the_io_server_s_reason() {
    let (server_end, node_end) = memory_pair();
    let (r, w) = server_end;
    let (_server, _events) = Endpoint::spawn(Channel::io_server(ChannelConfig::new("right")), r, w);
    let e = within(
        "the refusal",
        join::handshake(&me(), b"wrong".to_vec(), node_end),
    )
    .await
    .err()
    .expect("a node with the wrong token is refused");
    assert!(matches!(e, NodeError::Refused(_)), "{e}");
    assert!(
        e.to_string()
            .starts_with("the io-server refused this node: "),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_an_io_server_that_is_not_there_names_its_url() {
    let sock = scratch("absent.sock");
    let url = format!("unix:{}", sock.display());
    let remote = RemoteIoServer::new(&url, Path::new("unused"), false).unwrap();
    let e = join::join_remote(&remote, &me(), b"t".to_vec())
        .await
        .err()
        .expect("nothing listens there");
    assert!(matches!(e, NodeError::Connect { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("connecting to the io-server at {url}")
    );
}

/// A remote io-server on a unix socket, with the node joined once.
struct Remote {
    listener: StreamListener,
    rejoin: Rejoin,
    server: Endpoint,
    events: Events,
    sock: PathBuf,
}

async fn joined_remote(name: &str) -> Remote {
    let sock = scratch(&format!("{name}.sock"));
    let url = format!("unix:{}", sock.display());
    let token = token_file(&format!("{name}.token"), "tok\n");
    let remote = RemoteIoServer::new(&url, &token, false).unwrap();
    let listener = StreamListener::bind(&remote.url).await.unwrap();
    let who = me();
    let node = join::join_remote(&remote, &who, remote.read_token().unwrap());
    let server = async {
        let (t, _) = listener.accept().await.unwrap();
        welcome(t, "tok", 1).await
    };
    let (joined, (server, _)) =
        within("the first join", async { tokio::join!(node, server) }).await;
    let joined = joined.unwrap();
    assert_eq!(joined.node_id, 1);
    Remote {
        listener,
        rejoin: Rejoin {
            remote,
            me: me(),
            handoffs: None,
        },
        server,
        events: joined.events,
        sock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_its_restarted_io_server_again_and_hands_the_new_channel_on() {
    let r = joined_remote("rejoin").await;
    let token = r.rejoin.remote.token_file.clone();
    let (user, mut lost, mut rejoined) = recorder();
    let node = tokio::spawn(stay_joined(user, r.events, Some(r.rejoin)));
    r.server.handle().with(|ch| ch.close("restarting"));
    within("losing the first channel", lost.recv()).await;
    // The io-server comes back on the same socket: the node joins again
    // by itself and is welcomed under a new id.
    let (t, _) = within("the node joining again", r.listener.accept())
        .await
        .unwrap();
    let (server2, _events2) = welcome(t, "tok", 2).await;
    let endpoint = within("the new channel being handed on", rejoined.recv())
        .await
        .unwrap();
    assert!(
        endpoint.is_open(),
        "the supervisor gets the open, new channel"
    );
    // And again: a node stays joined across any number of restarts.
    server2.handle().with(|ch| ch.close("restarting again"));
    within("losing the second channel", lost.recv()).await;
    let (t, _) = within("the node joining a third time", r.listener.accept())
        .await
        .unwrap();
    let (_server3, _events3) = welcome(t, "tok", 3).await;
    within("the third channel being handed on", rejoined.recv()).await;
    node.abort();
    let _ = std::fs::remove_file(&r.sock);
    let _ = std::fs::remove_file(&token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_token_file_is_gone_does_not_join_again() {
    let r = joined_remote("notoken").await;
    std::fs::remove_file(&r.rejoin.remote.token_file).unwrap();
    let (user, mut lost, mut rejoined) = recorder();
    let node = tokio::spawn(stay_joined(user, r.events, Some(r.rejoin)));
    r.server.handle().with(|ch| ch.close("restarting"));
    within("losing the channel", lost.recv()).await;
    within("the node giving up", node).await.unwrap();
    assert!(rejoined.try_recv().is_err());
    let _ = std::fs::remove_file(&r.sock);
}

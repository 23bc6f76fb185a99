//! The handover of `io-server upgrade` (design note §4): a new process of
//! the binary takes the running io-server's listening sockets and its
//! state over the control socket, and the old one exits.
//!
//! 1. The new process connects to `--control` and says
//!    `upgrade VERSION PID` ([`STATE_VERSION`] of its binary).
//! 2. The old one refuses at once, before anything stops, what it cannot
//!    hand over: another state version, the smoltcp stack. Otherwise it
//!    answers `ok` with one end of a `SOCK_SEQPACKET` pair, says
//!    `RELOADING=1` to systemd, pauses every listener (nothing accepts;
//!    clients wait in the kernel's queues; no socket closes) and quiesces
//!    its nodes ([`nodes::quiesce`]).
//! 3. Over the pair: the state (an [`Envelope`], in pieces), then every
//!    descriptor in batches (`saps_fabric::fdpass`).
//! 4. The new process checks that its settings name the same listeners,
//!    builds its tables and listeners from what came, and says
//!    `prepared` (or `abort: why`).
//! 5. The old one says `commit`; the new one answers `committed` before it
//!    acts on anything it was given (a new process that dies before that
//!    leaves everything to the old one, nodes included). The old one says
//!    `MAINPID=` of the new one to systemd, tells the new one it did
//!    (`main`), and from then on touches
//!    nothing: on the new process's
//!    `done` (or at the bound) it leaves with `_exit`, so that no
//!    destructor shuts a socket down or removes a path the new process
//!    serves on. Should the new process die before `done` (its end of the
//!    pair closes), the old one takes its listeners, ports and groups back
//!    and goes on, the main process again; the nodes' channels, which the
//!    new process may have moved on already, it ends (their nodes join
//!    again).
//! 6. The new process starts serving, says `done`, and once it heard
//!    `main` (or at the bound) the daemon goes on (`READY=1`, the sandbox).
//!
//! Any failure before the commit leaves the old process serving as before
//! (its listeners resume, `READY=1`), and the new one exits saying why.
//! Every wait is bounded by `--upgrade-timeout`.

use super::nodes;
use super::state::{
    Capture, Envelope, ListenerKind, ListenerSnap, ServerSnap, Source, StateSnap, TablesSnap,
    STATE_VERSION,
};
use crate::config::Config;
use crate::groups::Groups;
use crate::notify::State as Notify;
use crate::ports::{ListeningPort, Ports};
use crate::server::Listeners;
use crate::state::ServerState;
use crate::{Error, IoServer};
use nix::sys::socket::{self as so, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use saps_fabric::fdpass;
use saps_fabric::transport::{FabricUrl, StreamListener};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// Most octets of state one handover carries (sent in pieces of
/// [`PIECE`]): the buffered octets of every connection are in it, each
/// bounded by the credit windows.
const MAX_STATE: usize = 256 << 20;

/// The state travels in `SOCK_SEQPACKET` messages of at most this many
/// octets (under the kernel's default `wmem_max`).
const PIECE: usize = 64 * 1024;

/// How a message call says the other process has closed its end.
const GONE: &str = "the other process is gone";

/// The old process's word, after the commit, that it told systemd the new
/// one is the main process.
const MAIN: &[u8] = b"main";

/// Header of the descriptor transfer.
const FDS_HEADER: &[u8] = b"saps-upgrade";

/// Test hook: `SAPS_TEST_UPGRADE_FAIL_AT=request|state|fds|prepared|commit`
/// makes the new process die (exit 3, no word to the command) at that
/// point of the handover, as a crash or a kill would; `restore`, refuse
/// what it rebuilt ([`fails_at`]).
fn die_at(point: &str) {
    if fails_at(point) {
        std::process::exit(3);
    }
}

/// Whether the test hook names `point`; at `restore` the new process
/// refuses the state it has rebuilt (as a failed check would), running
/// every destructor of a refused takeover.
fn fails_at(point: &str) -> bool {
    std::env::var("SAPS_TEST_UPGRADE_FAIL_AT").is_ok_and(|p| p == point)
}

/// The version a new process announces: its binary's, unless the test
/// hook `SAPS_TEST_STATE_VERSION` says another.
fn announced_version() -> u32 {
    std::env::var("SAPS_TEST_STATE_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(STATE_VERSION)
}

// ---- the old process -------------------------------------------------------

/// Serves `upgrade VERSION PID` on the control connection `stream`: hands
/// everything over to process PID and exits, or refuses and goes on.
pub(crate) async fn give(server: Arc<ServerState>, mut stream: UnixStream, line: &str) {
    let refusal = match check_request(&server, &stream, line) {
        Ok(pid) => {
            if server.upgrading.swap(true, Ordering::AcqRel) {
                Some("another upgrade is under way".to_string())
            } else {
                let r = hand_over(&server, &mut stream, pid).await;
                // Only a failure comes back: success ends the process.
                server.upgrading.store(false, Ordering::Release);
                r.err()
            }
        }
        Err(why) => Some(why),
    };
    if let Some(why) = refusal {
        tracing::warn!(reason = %why, "upgrade refused: this io-server goes on serving");
        let _ = stream
            .write_all(format!("error: {why}; this io-server goes on serving\n").as_bytes())
            .await;
    }
}

/// The new process's pid, if the request can be served at all.
fn check_request(server: &ServerState, stream: &UnixStream, line: &str) -> Result<u32, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (version, pid) = match words.as_slice() {
        ["upgrade", v, p] => (v.parse::<u32>(), p.parse::<u32>()),
        _ => return Err(format!("malformed upgrade request `{line}`")),
    };
    let (Ok(version), Ok(pid)) = (version, pid) else {
        return Err(format!("malformed upgrade request `{line}`"));
    };
    if version != STATE_VERSION {
        return Err(format!(
            "state version {STATE_VERSION} here, the new binary reads {version}"
        ));
    }
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("no credentials on the control connection: {e}"))?;
    if cred.uid() != nix::unistd::geteuid().as_raw() || cred.pid() != Some(pid as i32) {
        return Err(format!(
            "the request names pid {pid}, the connection is pid {:?} uid {}",
            cred.pid(),
            cred.uid()
        ));
    }
    if server.stack.is_some() {
        return Err("--stack smoltcp keeps its connections in this process's memory".into());
    }
    Ok(pid)
}

/// Steps 2 to 5 on the old side. Returns only on a failure before the
/// commit, with everything resumed; after the commit the process exits.
async fn hand_over(
    server: &Arc<ServerState>,
    stream: &mut UnixStream,
    pid: u32,
) -> Result<(), String> {
    let timeout = Duration::from_secs(server.config.upgrade_timeout);
    let notify = |states: &[Notify]| {
        if let Some(n) = server.notifier.get() {
            n.notify(states);
        }
    };
    let (ours, theirs) = so::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let hello = format!("ok: handing over from pid {}\n", std::process::id());
    send_with_fd(stream, hello.as_bytes(), theirs.as_fd()).await?;
    drop(theirs);
    notify(&[
        Notify::Reloading,
        Notify::Status(format!("upgrading: handing over to pid {pid}")),
    ]);
    tracing::info!(pid, "upgrade: handing over");
    server.paused.send_replace(true);
    let paused = Instant::now();
    let captured = match nodes::quiesce(server, nodes::quiesce_bound(timeout)).await {
        Ok(()) => capture(server).inspect_err(|_| nodes::resume(server)),
        Err(why) => Err(why),
    };
    let (wire, fds) = match captured {
        Ok((state, fds)) => (state.encode(), fds),
        Err(why) => {
            server.paused.send_replace(false);
            notify_serving(server);
            return Err(why);
        }
    };
    tracing::info!(
        fds = fds.len(),
        state = wire.len(),
        quiesced_ms = paused.elapsed().as_millis() as u64,
        "upgrade: frozen and captured"
    );
    let sent = tokio::task::spawn_blocking(move || -> Result<OwnedFd, String> {
        let t = Instant::now();
        send_state(ours.as_fd(), &wire, timeout)?;
        let state_ms = t.elapsed().as_millis() as u64;
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        fdpass::send_fds(ours.as_fd(), FDS_HEADER, &borrowed, timeout)
            .map_err(|e| e.to_string())?;
        tracing::info!(
            state_ms,
            fds_ms = t.elapsed().as_millis() as u64,
            "upgrade: state and descriptors sent"
        );
        let answer = recv_message(ours.as_fd(), 256, timeout)?;
        match answer.as_slice() {
            b"prepared" => Ok(ours),
            other => Err(format!(
                "the new process did not take over: {}",
                String::from_utf8_lossy(other)
            )),
        }
    })
    .await
    .map_err(|e| format!("the handover task failed: {e}"))
    .and_then(|r| r);
    let ours = match sent {
        Ok(s) => s,
        Err(why) => {
            // Nothing was consumed: serve on as before.
            return Err(serve_on(server, why));
        }
    };
    // The commit. A new process already gone cannot be committed to; one
    // that dies before it says `committed` has touched nothing it was
    // given (it acts on nothing before), so all of it comes back.
    let committed = tokio::task::spawn_blocking(move || -> Result<OwnedFd, (bool, String)> {
        // (Whether it is late, and why.)
        let fail = |e: std::io::Error| (e.kind() == std::io::ErrorKind::TimedOut, said(&e));
        fdpass::send_message(ours.as_fd(), b"commit", timeout).map_err(fail)?;
        match fdpass::recv_message(ours.as_fd(), 64, timeout)
            .map_err(fail)?
            .as_slice()
        {
            b"committed" => Ok(ours),
            other => Err((
                false,
                format!(
                    "the new process did not commit: {}",
                    String::from_utf8_lossy(other)
                ),
            )),
        }
    })
    .await
    .unwrap_or_else(|e| Err((false, format!("the commit failed: {e}"))));
    let ours = match committed {
        Ok(s) => s,
        // Gone before it committed, or refused: it used nothing.
        Err((false, why)) => {
            return Err(serve_on(server, why));
        }
        // Late: it may still act on what it was given.
        Err((true, why)) => {
            tracing::error!(pid, reason = %why, "upgrade: the new process neither committed nor died in time; its nodes' channels end here");
            nodes::end_channels(server, "the io-server's upgrade failed at its commit");
            return Err(serve_on(server, why));
        }
    };
    notify(&[Notify::MainPid(pid)]);
    // The new process says `READY=1` only after this: systemd hears the
    // main process change before the new one is ready.
    let _ = send_message(ours.as_fd(), MAIN, timeout);
    // The ports are the new process's now: none is shut down here.
    crate::ports::disown();
    let done = tokio::task::spawn_blocking(move || recv_message(ours.as_fd(), 64, timeout))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match done {
        Ok(d) if d == b"done" => {}
        // It died before it served: nothing was taken from this process
        // but its listeners' attention, which it takes back.
        Err(why) if why.starts_with(GONE) => {
            crate::ports::own();
            // Its nodes' channels may have moved on in the new process
            // before it died: they end here (and their nodes join again)
            // rather than go on from a copy that may be stale.
            nodes::end_channels(server, "the io-server's upgrade failed after its commit");
            nodes::resume(server);
            server.paused.send_replace(false);
            notify(&[
                Notify::MainPid(std::process::id()),
                Notify::Ready,
                Notify::Status("serving (the new process died)".into()),
            ]);
            return Err(format!("the new process died after the commit ({why})"));
        }
        Ok(d) => {
            tracing::warn!(pid, answer = %String::from_utf8_lossy(&d), "upgrade: committed; exiting")
        }
        Err(e) => {
            tracing::warn!(pid, error = %e, "upgrade: committed, the new process did not confirm in time; exiting")
        }
    }
    tracing::info!(
        paused_ms = paused.elapsed().as_millis() as u64,
        "upgrade: pid {pid} serves now; this process exits"
    );
    // Scrapes and commands accepted before the pause finish here.
    if !server.answering.idle(timeout).await {
        tracing::warn!("upgrade: answers still in progress at --upgrade-timeout are cut");
    }
    // No destructor may run: they would shut shared sockets down and
    // remove the paths the new process serves on.
    crate::sys::exit_now(0)
}

/// Ends a new process whose takeover failed without running a destructor:
/// what it rebuilt holds the old process's sockets (a refused takeover's
/// endpoints are disowned, but their tasks may not have seen it yet).
pub fn leave(code: i32) -> ! {
    crate::sys::exit_now(code)
}

/// Goes back after a failure before the commit: nodes and listeners run
/// again (nothing was consumed), and systemd hears the reload is over;
/// `why`, to say.
fn serve_on(server: &Arc<ServerState>, why: String) -> String {
    nodes::resume(server);
    server.paused.send_replace(false);
    notify_serving(server);
    why
}

/// `READY=1` with the serving status, after a failed upgrade.
fn notify_serving(server: &ServerState) {
    if let Some(n) = server.notifier.get() {
        n.notify(&[
            Notify::Ready,
            Notify::Status("serving (an upgrade failed)".into()),
        ]);
    }
}

/// The state and the descriptors to hand over: the groups' (queued
/// clients) and ports' first, then the nodes', then the listeners'.
fn capture(server: &ServerState) -> Result<(Envelope, Vec<OwnedFd>), String> {
    let now = Instant::now();
    let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(|e| format!("dup: {e}"));
    let (tables, blob, mut fds) = {
        let st = server.lock();
        let mut capture = Capture::default();
        let groups = st.groups.snapshot(now, &mut capture);
        let ports = st.ports.snapshot(&mut capture);
        let mut fds = capture
            .fds
            .iter()
            .map(|&f| dup(f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut blob = std::mem::take(&mut capture.blob);
        let mut out = nodes::Gathered {
            fds: &mut fds,
            blob: &mut blob,
        };
        let (nodes, left_behind) = nodes::capture(&st, &mut out)?;
        let tables = TablesSnap {
            next_node: st.next_node,
            groups,
            ports,
            nodes,
            left_behind,
        };
        (tables, blob, fds)
    };
    let mut listeners = Vec::new();
    {
        let held = server.listening.lock().unwrap_or_else(|e| e.into_inner());
        for (kind, fd) in held.iter() {
            listeners.push(ListenerSnap {
                kind: kind.clone(),
                fd: fds.len() as u32,
            });
            fds.push(dup(fd.as_fd())?);
        }
    }
    let state = StateSnap {
        server: ServerSnap::capture(server, now),
        tables,
        listeners,
    };
    let fd_count = u32::try_from(fds.len()).map_err(|_| "too many descriptors".to_string())?;
    let envelope = Envelope::seal(&state, blob, fd_count).map_err(|e| e.to_string())?;
    Ok((envelope, fds))
}

/// `text` with `fd` attached, on the control connection.
async fn send_with_fd(
    stream: &mut UnixStream,
    text: &[u8],
    fd: BorrowedFd<'_>,
) -> Result<(), String> {
    let raw = [fd.as_raw_fd()];
    loop {
        stream
            .writable()
            .await
            .map_err(|e| format!("control connection: {e}"))?;
        let iov = [IoSlice::new(text)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
            so::sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) if n == text.len() => return Ok(()),
            Ok(_) => return Err("control connection: a short write".into()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("control connection: {e}")),
        }
    }
}

// ---- the new process -------------------------------------------------------

/// What the new process learnt taking over.
pub struct TakenOver {
    pub io_server: IoServer,
    /// The process it replaced.
    pub old_pid: u32,
    /// Upgrades so far, this one included.
    pub upgrades: u64,
}

/// Steps 1, 3, 4 and 6 on the new side: takes the io-server at
/// `config.control` over and serves in its place.
pub async fn take(config: Config) -> Result<TakenOver, Error> {
    let fail = |why: String| Error::Upgrade(why);
    let control = config
        .control
        .clone()
        .ok_or_else(|| fail("no --control: nothing to take over from".into()))?;
    let token = config.load_token()?;
    if config.stack != crate::config::Stack::Kernel {
        return Err(fail(
            "--stack smoltcp cannot take over a running io-server".into(),
        ));
    }
    let timeout = Duration::from_secs(config.upgrade_timeout);
    let began = Instant::now();
    let ms = |since: Instant| since.elapsed().as_millis() as u64;
    let (seq, old_pid) = tokio::task::spawn_blocking(move || ask(&control, timeout))
        .await
        .map_err(|e| fail(format!("the request failed: {e}")))??;
    // The state and the descriptors.
    die_at("request");
    tracing::info!(ms = ms(began), "upgrade: the old process hands over");
    let got = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let wire = recv_state(seq.as_fd(), timeout).map_err(Error::Upgrade)?;
        tracing::info!(ms = ms(began), "upgrade: state received");
        die_at("state");
        let (header, fds) = fdpass::recv_fds(seq.as_fd(), FDS_HEADER.len(), timeout)
            .map_err(|e| Error::Upgrade(e.to_string()))?;
        if header != FDS_HEADER {
            return Err(Error::Upgrade(
                "a descriptor transfer of another kind".into(),
            ));
        }
        Ok((seq, wire, fds))
    })
    .await
    .map_err(|e| fail(format!("the transfer failed: {e}")))??;
    let (seq, wire, fds) = got;
    tracing::info!(
        state = wire.len(),
        fds = fds.len(),
        ms = ms(began),
        "upgrade: state and descriptors received"
    );
    die_at("fds");
    let channel = config.node_channel(token.clone());
    // Until the commit nothing here may shut a moved socket down.
    crate::ports::disown();
    let prepared = match prepare(&config, &channel, &wire, fds) {
        Ok(p) => p,
        Err(why) => {
            let _ = send_message(seq.as_fd(), format!("abort: {why}").as_bytes(), timeout);
            return Err(fail(why));
        }
    };
    let upgrades = prepared.state.server.upgrades + 1;
    tracing::info!(
        nodes = prepared.moved.len(),
        ms = ms(began),
        "upgrade: rebuilt"
    );
    let committed = tokio::task::spawn_blocking(move || -> Result<OwnedFd, String> {
        send_message(seq.as_fd(), b"prepared", timeout)?;
        die_at("prepared");
        match recv_message(seq.as_fd(), 64, timeout)?.as_slice() {
            b"commit" => {}
            other => return Err(format!("no commit: {}", String::from_utf8_lossy(other))),
        }
        die_at("commit");
        // From here on it acts on what it was given.
        send_message(seq.as_fd(), b"committed", timeout)?;
        Ok(seq)
    })
    .await
    .map_err(|e| format!("the commit failed: {e}"))
    .and_then(|r| r);
    let seq = match committed {
        Ok(seq) => seq,
        Err(why) => {
            // Nothing of it may shut down or remove what the old process
            // serves on.
            let Prepared {
                listeners,
                ports,
                moved,
                ..
            } = prepared;
            nodes::disown(moved);
            std::mem::forget((listeners, ports));
            return Err(fail(why));
        }
    };
    crate::ports::own();
    let Prepared {
        listeners,
        state,
        groups,
        ports,
        listening,
        mut moved,
    } = prepared;
    let now = Instant::now();
    let mut barriers = Vec::new();
    let io_server = IoServer::serve_on(config, token, None, listeners, |st| {
        state
            .server
            .apply(st, now)
            .map_err(|e| Error::Upgrade(e.to_string()))?;
        st.upgrades.store(upgrades, Ordering::Relaxed);
        let freed = st.freed.clone();
        let mut tables = st.lock();
        tables.next_node = state.tables.next_node;
        tables.groups = groups;
        tables.ports = ports;
        for m in &mut moved {
            let (entry, b) = m.entry(&freed);
            tables.nodes.insert(m.id, entry);
            barriers.push(b);
        }
        Ok(())
    })?;
    let server = io_server.state();
    let mut orphans = Vec::new();
    {
        let mut st = server.lock();
        for &id in &state.tables.left_behind {
            orphans.extend(st.leave(id));
        }
    }
    crate::dispatch::close_orphans_later(server, orphans);
    for (key, l) in listening {
        let task = tokio::spawn(crate::dispatch::accept_loop(server.clone(), key, l));
        server.lock().ports.set_accept_task(key, task);
    }
    for (m, b) in moved.into_iter().zip(barriers) {
        m.start(server, b);
    }
    nodes::restart_queues(server);
    tracing::info!(ms = ms(began), "upgrade: committed and serving");
    for url in io_server
        .state()
        .config
        .fabric
        .iter()
        .filter(|u| is_rdma(u))
    {
        crate::server::bind_when_free(server.clone(), url.clone(), timeout);
    }
    let _ = send_message(seq.as_fd(), b"done", timeout);
    // systemd hears `MAINPID=` from the old process before this one says
    // `READY=1` (the daemon says it when this returns).
    let main = tokio::task::spawn_blocking(move || recv_message(seq.as_fd(), 64, timeout))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match main {
        Ok(m) if m == MAIN => {}
        Ok(m) => {
            tracing::warn!(answer = %String::from_utf8_lossy(&m), "upgrade: the old process said something else than that it named this one the main process")
        }
        Err(why) => {
            tracing::warn!(reason = %why, "upgrade: the old process did not say it named this one the main process")
        }
    }
    Ok(TakenOver {
        io_server,
        old_pid,
        upgrades,
    })
}

/// Step 1: the request, and the pair's end the old process answers with.
fn ask(control: &std::path::Path, timeout: Duration) -> Result<(OwnedFd, u32), Error> {
    let fail = |why: String| Error::Upgrade(why);
    let stream = std::os::unix::net::UnixStream::connect(control).map_err(|source| {
        Error::ControlConnect {
            path: control.into(),
            source,
        }
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| fail(format!("control connection: {e}")))?;
    let line = format!("upgrade {} {}\n", announced_version(), std::process::id());
    use std::io::Write;
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| fail(format!("control connection: {e}")))?;
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = so::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| fail(format!("no answer from the io-server: {e}")))?;
    let mut pair = None;
    for c in msg.cmsgs().map_err(|e| fail(e.to_string()))? {
        if let so::ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: SCM_RIGHTS installed it in this process just now.
                pair = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let n = msg.bytes;
    let text = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
    // (The control socket's peer credentials are those of the process
    // that first listened on it, not of the one serving it now.)
    let old_pid = text
        .strip_prefix("ok: handing over from pid ")
        .and_then(|p| p.parse::<u32>().ok());
    match (text.strip_prefix("error: "), pair, old_pid) {
        (Some(why), _, _) => Err(fail(why.to_string())),
        (None, Some(p), Some(old_pid)) => Ok((p, old_pid)),
        _ => Err(fail(format!("unexpected answer `{text}`"))),
    }
}

/// What the new process made of the state, before it serves.
struct Prepared {
    listeners: Listeners,
    state: StateSnap,
    groups: Groups<crate::state::Client>,
    ports: Ports,
    /// The ports that listen, for their accept tasks.
    listening: Vec<ListeningPort>,
    /// The nodes, their endpoints frozen.
    moved: Vec<nodes::Moved>,
}

/// Step 4: the new process's listeners and tables from what came, if its
/// settings name the same listeners. Nothing made here shuts a socket
/// down when dropped (the ports are disowned until the commit, the nodes
/// are disowned on a failure).
fn prepare(
    config: &Config,
    channel: &saps_fabric::ChannelConfig,
    wire: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Prepared, String> {
    let parsing = Instant::now();
    let envelope = Envelope::decode(wire).map_err(|e| e.to_string())?;
    if envelope.fds as usize != fds.len() {
        return Err(format!(
            "the state names {} descriptors, {} came",
            envelope.fds,
            fds.len()
        ));
    }
    let state = envelope.state().map_err(|e| e.to_string())?;
    tracing::info!(
        ms = parsing.elapsed().as_millis() as u64,
        "upgrade: state parsed"
    );
    same_listeners(config, &state.listeners)?;
    // Listener descriptors out first; the rest belong to the tables.
    let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take = |i: u32| {
        slots
            .get_mut(i as usize)
            .and_then(Option::take)
            .ok_or_else(|| format!("descriptor {i} missing or given twice"))
    };
    // Never dropped here: a listener's destructor removes its path, which
    // the running io-server serves on (a refused takeover leaks them).
    let mut listeners = std::mem::ManuallyDrop::new(Listeners {
        fabric: Vec::new(),
        sides: Vec::new(),
        control: None,
        metrics: None,
    });
    for l in &state.listeners {
        let fd = take(l.fd)?;
        match &l.kind {
            ListenerKind::Fabric { url } => {
                let parsed: FabricUrl = url.parse().map_err(|e| format!("{url}: {e}"))?;
                let listener = match parsed {
                    FabricUrl::Unix(path) => StreamListener::Unix(unix_listener(fd)?, path),
                    FabricUrl::Tcp(_) => StreamListener::Tcp(tcp_listener(fd)?),
                    #[allow(unreachable_patterns)]
                    _ => return Err(format!("{url} cannot be taken over")),
                };
                listeners.fabric.push((url.clone(), listener));
            }
            ListenerKind::Handoff { path } => {
                let l = saps_fabric::handoff::side::SideListener::from_fd(fd, path.into())
                    .map_err(|e| format!("{path}: {e}"))?;
                listeners.sides.push(l);
            }
            ListenerKind::Control { .. } => listeners.control = Some(unix_listener(fd)?),
            ListenerKind::Metrics { .. } => listeners.metrics = Some(tcp_listener(fd)?),
        }
    }
    let rest: Vec<Option<OwnedFd>> = slots.into_iter().collect();
    let mut source = Source::with_slots(rest, envelope.blob.clone());
    let now = Instant::now();
    let groups = Groups::restore(state.tables.groups.clone(), &mut source, now)
        .map_err(|e| e.to_string())?;
    let groups_ms = now.elapsed().as_millis() as u64;
    let (ports, listening) =
        Ports::restore(&state.tables.ports, &mut source).map_err(|e| e.to_string())?;
    let moved =
        nodes::restore(channel, &state.tables.nodes, &mut source).map_err(|e| e.to_string())?;
    tracing::info!(
        groups_ms,
        all_ms = now.elapsed().as_millis() as u64,
        "upgrade: tables rebuilt"
    );
    let finished = match fails_at("restore") {
        true => Err("refused by SAPS_TEST_UPGRADE_FAIL_AT=restore".to_string()),
        false => source.finish().map_err(|e| e.to_string()),
    };
    if let Err(why) = finished {
        nodes::disown(moved);
        std::mem::forget(ports);
        return Err(why);
    }
    Ok(Prepared {
        listeners: std::mem::ManuallyDrop::into_inner(listeners),
        state,
        groups,
        ports,
        listening,
        moved,
    })
}

/// Refuses a takeover whose settings would serve on other listeners than
/// the ones that move.
fn same_listeners(config: &Config, listeners: &[ListenerSnap]) -> Result<(), String> {
    let mut fabric: Vec<&str> = listeners
        .iter()
        .filter_map(|l| match &l.kind {
            ListenerKind::Fabric { url } => Some(url.as_str()),
            _ => None,
        })
        .collect();
    // An rdma:// listener does not move: the new process binds it again.
    let mut ours: Vec<&str> = config
        .fabric
        .iter()
        .map(String::as_str)
        .filter(|u| !is_rdma(u))
        .collect();
    fabric.sort_unstable();
    ours.sort_unstable();
    if fabric != ours {
        return Err(format!(
            "--fabric differs: the running io-server serves on {fabric:?}, this one would on {ours:?}"
        ));
    }
    for l in listeners {
        match &l.kind {
            ListenerKind::Control { path } if config.control.as_deref() != Some(path.as_ref()) => {
                return Err(format!(
                    "--control differs: the running io-server's is {path}"
                ))
            }
            ListenerKind::Metrics { addr }
                if config.metrics.map(|a| a.to_string()).as_deref() != Some(addr) =>
            {
                return Err(format!(
                    "--metrics differs: the running io-server's is {addr}"
                ))
            }
            _ => {}
        }
    }
    let had_metrics = listeners
        .iter()
        .any(|l| matches!(l.kind, ListenerKind::Metrics { .. }));
    if config.metrics.is_some() && !had_metrics {
        return Err("--metrics is new: the running io-server serves no metrics".into());
    }
    Ok(())
}

fn is_rdma(url: &str) -> bool {
    url.starts_with("rdma:")
}

fn unix_listener(fd: OwnedFd) -> Result<tokio::net::UnixListener, String> {
    let l = std::os::unix::net::UnixListener::from(fd);
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())
}

fn tcp_listener(fd: OwnedFd) -> Result<tokio::net::TcpListener, String> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string())
}

// ---- the pair's messages ---------------------------------------------------

/// The state: its length (8 octets), then its octets in pieces.
fn send_state(sock: BorrowedFd<'_>, wire: &[u8], timeout: Duration) -> Result<(), String> {
    if wire.len() > MAX_STATE {
        return Err(format!(
            "the state takes {} octets, more than an upgrade carries ({MAX_STATE})",
            wire.len()
        ));
    }
    send_message(sock, &(wire.len() as u64).to_be_bytes(), timeout)?;
    for piece in wire.chunks(PIECE) {
        send_message(sock, piece, timeout)?;
    }
    Ok(())
}

/// [`send_state`]'s state, at most [`MAX_STATE`] octets.
fn recv_state(sock: BorrowedFd<'_>, timeout: Duration) -> Result<Vec<u8>, String> {
    let len = recv_message(sock, 8, timeout)?;
    let len = <[u8; 8]>::try_from(len.as_slice())
        .map(u64::from_be_bytes)
        .map_err(|_| "the state's length is malformed".to_string())?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_STATE)
        .ok_or_else(|| format!("a state of {len} octets is more than an upgrade carries"))?;
    let mut wire = Vec::with_capacity(len);
    while wire.len() < len {
        let piece = recv_message(sock, PIECE, timeout)?;
        if piece.is_empty() || wire.len() + piece.len() > len {
            return Err("the state's pieces do not add up to its length".into());
        }
        wire.extend_from_slice(&piece);
    }
    Ok(wire)
}

/// `fdpass::send_message`, its error as text.
fn send_message(sock: BorrowedFd<'_>, msg: &[u8], timeout: Duration) -> Result<(), String> {
    fdpass::send_message(sock, msg, timeout).map_err(|e| said(&e))
}

/// `fdpass::recv_message`, its error as text.
fn recv_message(sock: BorrowedFd<'_>, max: usize, timeout: Duration) -> Result<Vec<u8>, String> {
    fdpass::recv_message(sock, max, timeout).map_err(|e| said(&e))
}

/// The other process closed its end or its socket failed ([`GONE`]), or
/// it did not answer in time, or it said something unexpected.
fn said(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::TimedOut => {
            "the other process did not answer within --upgrade-timeout".into()
        }
        std::io::ErrorKind::InvalidData => e.to_string(),
        _ => format!("{GONE} ({e})"),
    }
}

//! The supervisor: services the target's trapped socket syscalls with the
//! SAPS paper's Figure 3 request/wait protocol against the io-server.
//!
//! One thread receives notifications and answers what it can at once
//! (`socket`, `getsockname`, `setsockopt`, a ready `accept` …). Calls that
//! wait for the io-server (`bind`, `listen`, `connect`, a blocking `accept`)
//! become tasks on the tokio runtime that answer when done, so one process
//! waiting never holds up another. The data path never comes here: it is
//! relayed between the kernel sockets inside the target and the fabric by
//! [`Endpoint::relay`].
//!
//! * `socket.rs` — socket, bind, listen, shutdown; making a socket native.
//! * `connect.rs` — blocking and non-blocking connect.
//! * `accept.rs` — accept/accept4.
//! * `arrival.rs` — where connections wait for an accept: the listeners'
//!   ready queues and their markers on `L`, connections for a listener the
//!   program closed.
//! * `sockopt.rs` — set/getsockopt, getsockname, getpeername.

mod accept;
mod arrival;
mod connect;
mod locks;
mod restart;
mod sendto;
mod socket;
mod sockopt;

use crate::memory::TargetMemory;
use crate::notify::{AddFd, Notification, Notifier, Reply};
use crate::vsock::{Inode, VirtualSocket, VsockTable};
use crate::{fds, sockaddr};
use locks::{Guard, Rank, Ranked};
use saps_fabric::endpoint::{Endpoint, EndpointEvent};
use saps_fabric::{ConnId, Request, Response};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How loopback addresses are treated (`--loopback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Loopback {
    /// 127.0.0.0/8 and ::1 binds and connects stay on the node (default).
    #[default]
    Local,
    /// They go through the io-server like any other address.
    Cluster,
}

/// What one trapped call came to, for `--trace`.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub pid: i32,
    pub nr: i64,
    pub args: [u64; 6],
    /// Decoded argument details captured while the call was serviced
    /// (addresses, option values), for the tracer.
    pub detail: Detail,
    pub result: Reply,
    pub start: SystemTime,
    pub duration: Duration,
    /// What SAPS did: the virtual socket, the connection, the listener.
    pub note: Note,
}

/// Arguments read from target memory while servicing a call.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    /// The address argument (bind/connect) or result (accept/getsockname).
    pub addr: Option<SocketAddr>,
    /// The option value (setsockopt) or result (getsockopt).
    pub value: Option<Vec<u8>>,
    /// A value-result length as passed in (accept/getsockname/getsockopt) …
    pub len_in: Option<u32>,
    /// … and as written back.
    pub len: Option<u32>,
}

/// The SAPS annotation of a call.
#[derive(Debug, Clone, Default)]
pub struct Note {
    pub inode: Option<Inode>,
    pub conn: Option<ConnId>,
    /// What happened, e.g. "virtual", "native (loopback)".
    pub action: &'static str,
    /// The listener group (the address it listens on), for bind, listen
    /// and accept.
    pub group: Option<SocketAddr>,
    /// Which io-server and as which node.
    pub io_server: Option<Arc<str>>,
    pub node: Option<Arc<str>>,
}

/// Receives one record per serviced call (the `--trace` mode).
pub trait Tracer: Send + Sync {
    fn record(&self, call: &CallRecord);
}

/// Options of a supervisor.
#[derive(Clone, Default)]
pub struct SupervisorConfig {
    pub loopback: Loopback,
    pub tracer: Option<Arc<dyn Tracer>>,
    /// The io-server joined ("embedded" or its URL) and this node's name,
    /// for the trace annotations.
    pub io_server: Arc<str>,
    pub node: Arc<str>,
}

/// The result of servicing a call synchronously.
pub(crate) enum Outcome {
    /// Answer with this.
    Reply(Reply),
    /// Already answered (`ADDFD` with `SEND` answers the call itself).
    Answered(i64),
    /// Wait for the io-server (or a connection) in a task that answers.
    Defer(Deferred),
}

type Deferred = Box<
    dyn FnOnce(Arc<Shared>, Call) -> Pin<Box<dyn Future<Output = (Call, Outcome)> + Send>> + Send,
>;

/// Services the rest of a call in a task on the runtime.
pub(crate) fn defer<F, Fut>(f: F) -> Outcome
where
    F: FnOnce(Arc<Shared>, Call) -> Fut + Send + 'static,
    Fut: Future<Output = (Call, Outcome)> + Send + 'static,
{
    Outcome::Defer(Box::new(move |sh, call| Box::pin(f(sh, call))))
}

/// A virtual listener: where its `L` is and what it asked the io-server
/// for, to ask again after a rejoin.
#[derive(Debug, Clone)]
pub(crate) struct Listener {
    /// The supervisor's end `M` of the socket pair whose other end is
    /// `L`: markers are bytes sent on it, and it sees `L` closed (hang-up)
    /// once the program has closed it everywhere.
    pub marker: Arc<OwnedFd>,
    pub addr: SocketAddr,
    pub flags: u32,
    pub backlog: u32,
}

impl Listener {
    /// Whether the program still holds `L` somewhere: until then `M`
    /// sees no hang-up.
    pub(crate) fn alive(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut pfd = [PollFd::new(self.marker.as_fd(), PollFlags::empty())];
        match poll(&mut pfd, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => !pfd[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => true,
        }
    }
}

/// How often a call waiting in a task (a blocking accept, connect or
/// sendto) checks that its caller is still waiting and has no signal to
/// take: the longest a signal waits to interrupt it.
pub(crate) const LIVENESS_CHECK: Duration = Duration::from_millis(50);

/// `ERESTARTSYS`: the answer of a call that sleeps natively and is
/// interrupted by a signal. The kernel turns it into `EINTR`, or restarts
/// the call under `SA_RESTART`, exactly as for its own sleeping calls.
pub(crate) const ERESTARTSYS: i32 = 512;

/// pidfds kept at most (one per thread of the target seen); beyond, the
/// cache starts again.
const MAX_PIDFDS: usize = 4096;

/// How often listeners the program closed are looked for. `close` is not
/// trapped, so a closed listener is noticed by its hang-up on `M`.
const LISTENER_SWEEP: Duration = Duration::from_secs(1);

/// A connection accepted by the io-server, waiting for the program's accept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

pub(crate) struct Shared {
    pub notifier: Notifier,
    /// The channel to the io-server; replaced when the node rejoins.
    endpoint: Ranked<Endpoint>,
    /// Bumped at each rejoin: work of an older channel must not touch
    /// the state of the new one.
    pub generation: std::sync::atomic::AtomicU64,
    pub rt: tokio::runtime::Handle,
    pub config: SupervisorConfig,
    pub table: Ranked<VsockTable>,
    /// Listener connection tag → its `L`.
    pub listeners: Ranked<HashMap<ConnId, Listener>>,
    /// Connections delivered to an `L`, by tag, until accepted.
    pub arrivals: Ranked<HashMap<ConnId, Arrival>>,
    /// Sockets waiting in a listener's ready queue for the program's
    /// accept, by tag: a TCP socket handed over by a same-host io-server
    /// (zero-relay), or the program's end of a relayed connection's socket
    /// pair.
    pub waiting: Ranked<HashMap<ConnId, (OwnedFd, arrival::Kind)>>,
    /// Each listener's ready queue, by listener tag.
    pub ready: Ranked<HashMap<ConnId, arrival::Ready>>,
    /// Local tags of handed-over connections (apart from the fabric's).
    pub next_handed: std::sync::atomic::AtomicU64,
    /// Listeners the program closed, newest last, with their addresses.
    pub retired: Ranked<VecDeque<(ConnId, SocketAddr)>>,
    /// Connections waiting for a listener on the address of a closed one.
    pub orphans: Ranked<Vec<arrival::Orphan>>,
    /// pidfds of the target's threads, by thread id.
    pub pidfds: Ranked<HashMap<u32, Arc<OwnedFd>>>,
    /// Listeners whose `L` the program still holds but that are not
    /// served (listening again after a rejoin failed): their `M` is kept
    /// until `L` is closed, since `L` would poll readable (hang-up) for
    /// good once `M` was.
    pub dormant: Ranked<Vec<Listener>>,
    /// Connects in flight, by the inode of their `S`: told when the
    /// io-server answers, for a blocking `connect` waiting on it.
    pub connecting: Ranked<HashMap<Inode, tokio::sync::watch::Sender<bool>>>,
    /// `bind`/`listen` calls waiting for the io-server, by socket, so that
    /// the same call made again after a signal (the kernel restarts it with
    /// a new notification) joins the first instead of repeating it.
    pub ops: Ranked<HashMap<Inode, restart::Op>>,
    /// Asks the kernel whether a placeholder still exists (`diag`).
    diag: Ranked<Option<crate::diag::SockDiag>>,
}

fn lock<T>(m: &Ranked<T>) -> Guard<'_, T> {
    m.lock()
}

/// The node's supervisor, shared by every process of the target.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

/// The context of one notification being serviced.
pub(crate) struct Call {
    pub n: Notification,
    pub start: Instant,
    pub wall: SystemTime,
    pub detail: Detail,
    pub note: Note,
    /// The fd argument's flags (`/proc/PID/fdinfo`), read once per call.
    flags: std::sync::OnceLock<Option<i32>>,
    /// The supervisor's duplicate of the fd argument, taken by `lookup` and
    /// reused for the rest of the call (the listener of an accept, the file
    /// status flags); dropped before the call waits in a task, so a close
    /// by the program is not hidden.
    pub dup: Option<OwnedFd>,
    /// The socket whose `bind`/`listen` this call is, when it waits for
    /// the io-server (`restart.rs`): told whether the answer arrived.
    pub op: Option<Inode>,
}

impl Call {
    /// The flags of the call's fd argument (`O_NONBLOCK`, `O_CLOEXEC` …).
    pub fn fd_flags(&self) -> Option<i32> {
        *self
            .flags
            .get_or_init(|| fds::fd_flags(self.pid(), self.fd()).ok())
    }

    pub fn mem(&self) -> TargetMemory {
        TargetMemory::new(self.n.pid)
    }

    pub fn pid(&self) -> u32 {
        self.n.pid
    }

    pub fn fd(&self) -> RawFd {
        self.n.args[0] as RawFd
    }

    pub fn arg(&self, i: usize) -> u64 {
        self.n.args[i]
    }
}

impl Supervisor {
    /// A supervisor answering notifications from `notifier`, talking to the
    /// io-server through `endpoint`. The endpoint's events must be fed to
    /// [`Supervisor::serve_events`].
    pub fn new(
        notifier: Notifier,
        endpoint: Endpoint,
        rt: tokio::runtime::Handle,
        config: SupervisorConfig,
    ) -> Self {
        Supervisor {
            shared: Arc::new(Shared {
                notifier,
                endpoint: Ranked::new(Rank::Endpoint, endpoint),
                generation: std::sync::atomic::AtomicU64::new(0),
                rt,
                config,
                table: Ranked::default_with(Rank::Table),
                listeners: Ranked::default_with(Rank::Listeners),
                arrivals: Ranked::default_with(Rank::Arrivals),
                waiting: Ranked::default_with(Rank::Waiting),
                ready: Ranked::default_with(Rank::Ready),
                next_handed: std::sync::atomic::AtomicU64::new(1 << 62),
                retired: Ranked::default_with(Rank::Retired),
                orphans: Ranked::default_with(Rank::Orphans),
                pidfds: Ranked::default_with(Rank::Pidfds),
                dormant: Ranked::default_with(Rank::Dormant),
                connecting: Ranked::default_with(Rank::Connecting),
                ops: Ranked::default_with(Rank::Ops),
                diag: Ranked::new(Rank::Diag, None),
            }),
        }
    }

    /// Number of live virtual sockets (for status and tests).
    pub fn virtual_sockets(&self) -> usize {
        lock(&self.shared.table).len()
    }

    /// Services notifications until `stop` becomes readable (e.g. the
    /// target's pidfd when it exits). The thread blocks in the listener's
    /// receive ioctl (so the kernel's synchronous wake-up applies); a helper
    /// thread watching `stop` interrupts it with a signal.
    pub fn run(&self, stop: BorrowedFd<'_>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = match stop.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the program");
                return;
            }
        };
        if let Err(e) = crate::sys::install_wakeup_handler() {
            tracing::error!(error = %e, "cannot install the supervisor's wake-up signal");
            return;
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let left = Arc::new(AtomicBool::new(false));
        let me = crate::sys::current_thread();
        let waker = {
            let (stopping, left) = (stopping.clone(), left.clone());
            std::thread::spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                loop {
                    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        _ => break,
                    }
                }
                stopping.store(true, Ordering::Release);
                // The signal may land just before the ioctl is entered:
                // repeat until the supervisor thread has left (bounded).
                for _ in 0..10_000 {
                    if left.load(Ordering::Acquire) {
                        return;
                    }
                    crate::sys::wake_thread(me);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        while !stopping.load(Ordering::Acquire) {
            match self.shared.notifier.recv_interruptible() {
                Ok(n) => self.handle(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The call was interrupted or its process died.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    tracing::error!(error = %e, "receiving a seccomp notification failed");
                    break;
                }
            }
        }
        left.store(true, Ordering::Release);
        let _ = waker.join();
    }

    /// Handles the io-server's callbacks for this node: connections accepted
    /// for our listeners are delivered to the listener's `L`.
    pub async fn serve_events(
        self,
        mut events: tokio::sync::mpsc::UnboundedReceiver<EndpointEvent>,
    ) {
        let mut sweep = tokio::time::interval(LISTENER_SWEEP);
        loop {
            let ev = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = sweep.tick() => {
                    self.shared.reap_listeners(None);
                    self.shared.sweep_closed(None);
                    arrival::repair_markers(&self.shared);
                    continue;
                }
            };
            match ev {
                EndpointEvent::ConnectionAccepted {
                    listener,
                    conn,
                    peer,
                    local,
                } => arrival::deliver(&self.shared, listener, conn, peer, local),
                EndpointEvent::ConnectionClosed { conn, errno } => {
                    tracing::debug!(conn, errno, "connection closed before it was relayed");
                    lock(&self.shared.arrivals).remove(&conn);
                }
                EndpointEvent::Closed { error } => {
                    tracing::error!(%error, "the fabric channel to the io-server closed");
                    return;
                }
                other => tracing::debug!(event = ?other, "fabric event"),
            }
        }
    }

    /// The node joined the io-server again over `endpoint` (after the old
    /// channel closed): connections of the old channel are gone, and every
    /// listener the program still holds is registered again, so the
    /// program's listening sockets keep working across an io-server restart.
    pub async fn rejoin(&self, endpoint: Endpoint) {
        use std::sync::atomic::Ordering;
        let sh = &self.shared;
        *lock(&sh.endpoint) = endpoint.clone();
        sh.generation.fetch_add(1, Ordering::AcqRel);
        lock(&sh.arrivals).clear();
        // Tags of the old channel mean nothing on the new one.
        lock(&sh.retired).clear();
        let orphans = std::mem::take(&mut *lock(&sh.orphans));
        for o in orphans {
            lock(&sh.waiting).remove(&o.id);
        }
        arrival::clear_queues(sh);
        sh.table().forget_connections();
        let old: Vec<(ConnId, Listener)> = lock(&sh.listeners).drain().collect();
        let mut old = old.into_iter();
        while let Some((old_conn, l)) = old.next() {
            if !l.alive() {
                sh.table().remove_conn(old_conn);
                continue;
            }
            let Ok(conn) = endpoint.make_connection() else {
                lock(&sh.dormant).extend(std::iter::once(l).chain(old.map(|(_, l)| l)));
                return;
            };
            let bind = Request::Bind {
                conn,
                addr: l.addr,
                flags: l.flags,
            };
            let listen = Request::Listen {
                conn,
                backlog: l.backlog,
            };
            let mut errno = sh.request(bind).await.errno();
            if errno == 0 {
                errno = sh.request(listen).await.errno();
            }
            if errno != 0 {
                tracing::warn!(addr = %l.addr, errno, "could not listen again after rejoining");
                lock(&sh.dormant).push(l);
                continue;
            }
            tracing::info!(addr = %l.addr, "listening again after rejoining");
            sh.table().retag(old_conn, conn);
            let addr = l.addr;
            lock(&sh.listeners).insert(conn, l);
            arrival::adopt_orphans(sh, conn, addr);
        }
    }

    /// Takes the TCP sockets a same-host io-server hands over (zero-relay)
    /// and queues each on its listener's `L` like a relayed connection.
    pub async fn serve_handoffs(self, mut rx: saps_fabric::handoff::HandoffReceiver) {
        while let Some(h) = rx.recv().await {
            arrival::deliver_handoff(&self.shared, h);
        }
    }

    fn handle(&self, n: Notification) {
        let mut call = Call {
            n,
            start: Instant::now(),
            wall: SystemTime::now(),
            detail: Detail::default(),
            note: Note::default(),
            flags: std::sync::OnceLock::new(),
            dup: None,
            op: None,
        };
        let sh = &self.shared;
        let outcome = match call.n.nr as i64 {
            libc::SYS_socket => socket::socket(sh, &mut call),
            libc::SYS_bind => socket::bind(sh, &mut call),
            libc::SYS_listen => socket::listen(sh, &mut call),
            libc::SYS_shutdown => socket::shutdown(sh, &mut call),
            libc::SYS_connect => connect::connect(sh, &mut call),
            libc::SYS_accept => accept::accept(sh, &mut call, 0),
            libc::SYS_accept4 => {
                let flags = call.arg(3) as i32;
                accept::accept(sh, &mut call, flags)
            }
            libc::SYS_setsockopt => sockopt::setsockopt(sh, &mut call),
            libc::SYS_getsockopt => sockopt::getsockopt(sh, &mut call),
            libc::SYS_getsockname => sockopt::getname(sh, &mut call, false),
            libc::SYS_getpeername => sockopt::getname(sh, &mut call, true),
            libc::SYS_sendto => sendto::sendto(sh, &mut call),
            _ => Outcome::Reply(Reply::Continue),
        };
        sh.finish(call, outcome);
    }
}

impl Shared {
    /// Answers a call (unless a task will) and traces it.
    pub(crate) fn finish(self: &Arc<Self>, call: Call, outcome: Outcome) {
        let (result, answer) = match outcome {
            Outcome::Defer(task) => {
                let me = self.clone();
                let mut call = call;
                call.dup = None;
                self.rt.spawn(async move {
                    let (call, outcome) = task(me.clone(), call).await;
                    me.finish(call, outcome);
                });
                return;
            }
            Outcome::Answered(v) => (Reply::Value(v), None),
            Outcome::Reply(r) => (r, Some(r)),
        };
        let id = call.n.id;
        let op = call.op;
        // Trace before answering, so a process's lines are in call order.
        if let Some(t) = &self.config.tracer {
            let mut call = call;
            call.note.io_server = Some(self.config.io_server.clone());
            call.note.node = Some(self.config.node.clone());
            t.record(&CallRecord {
                pid: call.pid() as i32,
                nr: call.n.nr as i64,
                args: call.n.args,
                detail: call.detail,
                result,
                start: call.wall,
                duration: call.start.elapsed(),
                note: call.note,
            });
        }
        if let Some(r) = answer {
            let taken = op.and_then(|ino| Some((ino, restart::take(self, ino, id)?)));
            let answered = match self.notifier.respond(id, r) {
                Ok(d) => d == crate::notify::Delivery::Delivered,
                Err(e) => {
                    tracing::debug!(error = %e, "answering a call failed (target interrupted?)");
                    false
                }
            };
            if let (Some((ino, op)), false) = (taken, answered) {
                restart::put_back(self, ino, op);
            }
        }
    }

    /// The current channel to the io-server.
    pub(crate) fn ep(&self) -> Endpoint {
        lock(&self.endpoint).clone()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn table(&self) -> Guard<'_, VsockTable> {
        lock(&self.table)
    }

    /// A pidfd of thread `tid`, kept for the next calls of that thread.
    pub(crate) fn pidfd(&self, tid: u32) -> std::io::Result<Arc<OwnedFd>> {
        if let Some(p) = lock(&self.pidfds).get(&tid) {
            return Ok(p.clone());
        }
        let p = Arc::new(fds::open_pidfd(tid)?);
        let mut cache = lock(&self.pidfds);
        if cache.len() >= MAX_PIDFDS {
            cache.clear();
        }
        cache.insert(tid, p.clone());
        Ok(p)
    }

    /// A duplicate of the call's fd argument, for the time of the call.
    pub(crate) fn target_fd(&self, call: &Call) -> std::io::Result<OwnedFd> {
        self.with_pidfd(call.pid(), |p| fds::get_fd(p, call.fd()))
    }

    /// Runs `f` with a cached pidfd of `tid`; a stale one (the thread died
    /// and its id was reused) is replaced once.
    fn with_pidfd<T>(
        &self,
        tid: u32,
        f: impl Fn(BorrowedFd<'_>) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        match f(self.pidfd(tid)?.as_fd()) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                lock(&self.pidfds).remove(&tid);
                f(self.pidfd(tid)?.as_fd())
            }
            r => r,
        }
    }

    /// The virtual socket behind the call's fd argument, if it is one.
    pub(crate) fn lookup(&self, call: &mut Call) -> Option<(Inode, VirtualSocket)> {
        let (dup, ino) = self
            .with_pidfd(call.pid(), |p| fds::socket_dup_inode(p, call.fd()))
            .ok()?;
        let ino = ino?;
        let vs = self.table().get(ino)?.clone();
        call.dup = Some(dup);
        call.note.inode = Some(ino);
        call.note.conn = vs.conn;
        Some((ino, vs))
    }

    /// Sends a Figure 3 request and waits for its answer; a dead channel
    /// answers `ENETDOWN`.
    pub(crate) async fn request(&self, req: Request) -> Response {
        match self.ep().request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "io-server request failed");
                Response::Status {
                    errno: libc::ENETDOWN,
                    addr: None,
                }
            }
        }
    }

    /// The tag of `vs` (allocated on first use), noted on the call with
    /// what SAPS does with it.
    pub(crate) fn tag(
        &self,
        call: &mut Call,
        vs: &mut VirtualSocket,
        action: &'static str,
    ) -> Result<ConnId, i32> {
        let conn = self.conn_of(vs)?;
        call.note.conn = Some(conn);
        call.note.action = action;
        Ok(conn)
    }

    /// The connection tag of `vs`, allocating one on first use.
    pub(crate) fn conn_of(&self, vs: &mut VirtualSocket) -> Result<ConnId, i32> {
        if let Some(c) = vs.conn {
            return Ok(c);
        }
        let c = self.ep().make_connection().map_err(|_| libc::ENETDOWN)?;
        vs.conn = Some(c);
        Ok(c)
    }

    /// Installs `obj` over the call's fd number (`ADDFD` + `SETFD`), keeping
    /// the fd's close-on-exec flag, after checking the call is still live.
    pub(crate) fn replace_fd(&self, call: &Call, obj: BorrowedFd<'_>) -> Result<(), i32> {
        let cloexec = call.fd_flags().is_some_and(|f| f & libc::O_CLOEXEC != 0);
        if !self.notifier.id_valid(call.n.id) {
            return Err(libc::EINTR);
        }
        self.notifier
            .add_fd(
                call.n.id,
                obj,
                AddFd {
                    target_fd: Some(call.fd()),
                    cloexec,
                    send: false,
                },
            )
            .map(|_| ())
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF))
    }

    /// Whether the fd of the call is in non-blocking mode.
    pub(crate) fn nonblocking(&self, call: &Call) -> bool {
        // O_NONBLOCK belongs to the open file, which the duplicate shares:
        // one fcntl instead of reading /proc/PID/fdinfo.
        if let Some(d) = &call.dup {
            if let Ok(f) = nix::fcntl::fcntl(d.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL) {
                return f & libc::O_NONBLOCK != 0;
            }
        }
        call.fd_flags().is_some_and(|f| f & libc::O_NONBLOCK != 0)
    }

    /// Whether a loopback address stays on the node.
    pub(crate) fn stays_local(&self, addr: &SocketAddr) -> bool {
        self.config.loopback == Loopback::Local && addr.ip().is_loopback()
    }

    /// Forgets the listeners (of `port`, or all) whose `L` the program has
    /// closed, and tells the io-server, so the port can be bound again and
    /// no client is handed to a listener that is gone.
    pub(crate) fn reap_listeners(self: &Arc<Self>, port: Option<u16>) {
        let dead: Vec<ConnId> = lock(&self.listeners)
            .iter()
            .filter(|(_, l)| port.is_none_or(|p| p == l.addr.port()) && !l.alive())
            .map(|(&c, _)| c)
            .collect();
        lock(&self.dormant).retain(Listener::alive);
        for conn in dead {
            tracing::debug!(conn, "the program closed a listener");
            // Out of the map first: no guard may live on while the queue
            // is reset (that takes other locks, and once took this one).
            let removed = lock(&self.listeners).remove(&conn);
            if let Some(l) = removed {
                arrival::retire(self, conn, l.addr);
                arrival::orphan_queue(self, conn);
            }
            self.table().remove_conn(conn);
            self.ep().close_connection(conn, 0);
        }
    }

    /// Whether the caller of `call`, waiting in a task, should be answered
    /// now: `EINTR` if the call is gone (its process died, or an older
    /// kernel interrupted it), `ERESTARTSYS` if its thread has a signal to
    /// take (the filter waits killably: a signal does not end the wait by
    /// itself, see `sys::fork_filtered`).
    pub(crate) fn interrupted(&self, call: &Call) -> Option<Reply> {
        if !self.notifier.id_valid(call.n.id) {
            return Some(Reply::Errno(libc::EINTR));
        }
        signal_pending(call.pid()).then_some(Reply::Errno(ERESTARTSYS))
    }

    /// Forgets the virtual sockets the program closed while they were still
    /// placeholders (after `socket` or `bind`, bound on `port` if given),
    /// and releases what they held at the io-server, so that a port bound
    /// and closed without `listen` can be bound again, as in the kernel.
    /// `close` is not trapped: the kernel is asked whether each object
    /// still exists. Before a bind (of `port`), and on the listener sweep.
    pub(crate) fn sweep_closed(&self, port: Option<u16>) {
        /// Placeholders looked at per sweep at most.
        const MAX_SWEPT: usize = 4096;
        let candidates = self.table().placeholders(port, MAX_SWEPT);
        if candidates.is_empty() {
            return;
        }
        let gone: Vec<Inode> = {
            let mut diag = lock(&self.diag);
            if diag.is_none() {
                match crate::diag::SockDiag::new() {
                    Ok(d) => *diag = Some(d),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot ask the kernel which sockets are closed");
                        return;
                    }
                }
            }
            let Some(d) = diag.as_mut() else { return };
            candidates
                .into_iter()
                .filter(|&ino| matches!(d.unix_exists(ino), Ok(false)))
                .collect()
        };
        for ino in gone {
            let removed = self.table().remove_placeholder(ino);
            if let Some(conn) = removed.and_then(|vs| vs.conn) {
                tracing::debug!(conn, ino, "the program closed an unconnected socket");
                self.ep().close_connection(conn, 0);
            }
        }
    }

    /// Writes `addr` into the caller's (addr, addrlen) value-result pair
    /// with the kernel's truncation rules, recording both lengths.
    pub(crate) fn write_addr(
        &self,
        call: &mut Call,
        ptr: u64,
        len_ptr: u64,
        addr: &SocketAddr,
    ) -> Result<(), i32> {
        let mem = call.mem();
        call.detail.addr = Some(*addr);
        match sockaddr::write_to_target(&mem, ptr, len_ptr, addr) {
            Ok(len_in) => call.detail.len_in = Some(len_in),
            Err(e) => {
                // The trace still shows a length that was readable.
                call.detail.len_in = mem.read_u32(len_ptr).ok();
                return Err(e);
            }
        }
        call.detail.len = Some(sockaddr::encode(addr).len() as u32);
        Ok(())
    }

    /// Reads a sockaddr argument; errors are the errno to return.
    pub(crate) fn read_sockaddr(
        &self,
        call: &mut Call,
        ptr: u64,
        len: u64,
    ) -> Result<SocketAddr, i32> {
        match sockaddr::read_from_target(&call.mem(), ptr, len)? {
            sockaddr::Decoded::Inet(addr) => {
                call.detail.addr = Some(addr);
                Ok(addr)
            }
            sockaddr::Decoded::Unspec => Err(libc::EAFNOSUPPORT),
        }
    }
}

/// Sets `options` on a socket (the supervisor's or the program's): one the
/// kernel refuses there is its answer, logged, not an error.
pub(crate) fn set_options<'a>(
    fd: BorrowedFd<'_>,
    options: impl Iterator<Item = (i32, i32, &'a [u8])>,
) {
    for (level, name, value) in options {
        if let Err(e) = crate::sys::setsockopt_raw(fd, level, name, value) {
            tracing::debug!(level, name, error = %e, "an option not taken");
        }
    }
}

/// Whether thread `tid` has a signal pending that it does not block
/// (`/proc/TID/status`: `SigPnd` and `ShdPnd` against `SigBlk`).
fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

/// Owned fd helpers shared by the handlers.
pub(crate) fn inode_of(fd: impl AsFd) -> Result<Inode, i32> {
    nix::sys::stat::fstat(fd.as_fd().as_raw_fd())
        .map(|st| st.st_ino)
        .map_err(|e| e as i32)
}

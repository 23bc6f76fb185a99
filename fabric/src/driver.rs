//! The async shell around a [`Channel`]: a reader, a writer and a timer
//! task per channel, over any [`TransportRead`]/[`TransportWrite`] pair.
//! The channel decides everything (it is sans-IO, `saps-proto`); the tasks
//! move its bytes, splice its payloads and tell it the time.
//!
//! The channel sits behind a mutex in a [`FabricHandle`]; callers make the
//! Forwarding Protocol calls with [`FabricHandle::with`], which wakes the
//! writer when bytes are queued. Callbacks arrive on an unbounded event
//! receiver; its size is bounded by the credits the channel grants.
//!
//! For the io-server's upgrade in place (bench/notes/2026-12-03-upgrade-design.md,
//! §2 "Quiesce"), the tasks can be paused at clean points and resumed
//! ([`Phase`]): the reader at its read await (what it has not fed stays
//! in the socket, what it fed is in the channel), the writer at its next
//! write, in the middle of a piece of output if need be (the rest goes back
//! to the front of the channel's output, its spliced octets in the pipe), the
//! timer at its sleep (liveness does not fire while paused). Nothing is
//! closed or dropped: after a pause the tasks go on, or, once the channel
//! has moved ([`spawn_resumed`] elsewhere), they end without their
//! transport's destructors ([`Phase::Disowned`]).

pub use crate::channel::HANDSHAKE_TIMEOUT;
use crate::channel::{Channel, Event, Transmit, HANDSHAKE_MAX_FRAME, STREAM_MIN};
use crate::frame::ConnId;
use crate::splice::{Pipe, ReceivePipe};
use crate::transport::{TransportRead, TransportWrite};
use bytes::BytesMut;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

/// What the tasks of one channel and its [`FabricHandle`]s share: the
/// channel under its lock, the writer's wake-ups, the event sender and
/// the pipe of spliced payloads.
struct DriverState {
    channel: Mutex<Channel>,
    wake_writer: Notify,
    /// A window of [`COALESCE`] opened by [`FabricHandle::with_coalesced`],
    /// for the flusher.
    coalesced: Notify,
    /// Set while such a window is open.
    window: std::sync::atomic::AtomicBool,
    events: mpsc::UnboundedSender<Event>,
    /// Signalled by the writer after each write, and when it ends: a
    /// reader waiting for the channel's output to drain
    /// ([`Channel::output_full`]) looks again.
    drained: Notify,
    /// Set while the reader waits on `drained`: a call that answers a
    /// request ([`FabricHandle::with`]) wakes it too.
    reader_waiting: std::sync::atomic::AtomicBool,
    /// Where spliced payloads wait for the writer (a socket transport).
    /// Made at the first use, after the handshake: a stranger's
    /// connection costs the io-server one descriptor, not three.
    pipe: std::sync::OnceLock<Option<Pipe>>,
    /// Whether the transport takes spliced payloads.
    can_splice: bool,
    /// Set once the channel is closed: the reader stops reading at once
    /// (a peer that sends nothing more cannot keep the socket), the writer
    /// has [`CLOSE_LINGER`] to flush.
    closed: watch::Sender<bool>,
    /// Wakes the timer when the channel opens or closes (its
    /// [`Channel::poll_timeout`] changes).
    timer: Notify,
    /// Whether the tasks run, pause, or have let go of the channel, and
    /// which are at a clean point: one value, so that a task leaving its
    /// rest and a freeze looking at the tasks cannot pass each other.
    tasks: watch::Sender<Tasks>,
    /// The channel's clock, which stands still while the tasks are paused.
    clock: Mutex<Clock>,
    /// The transport's socket ([`TransportWrite::raw_fd`]).
    transport_fd: Option<RawFd>,
}

/// Where the tasks of a channel stand in an upgrade in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Paused at clean points until [`FabricHandle::set_phase`] says
    /// `Running` again.
    Frozen,
    /// The channel and its transport have moved to another endpoint: the
    /// tasks end, forgetting the transport's halves (whose destructors
    /// would shut the socket's write side down), and never touch it again.
    Disowned,
}

/// The time the driver tells its channel: the runtime's, less the time
/// its tasks spent paused. A pause thus never counts as the peer's
/// silence: input that came meanwhile is read before the channel's
/// liveness looks at the clock again.
#[derive(Debug, Default)]
struct Clock {
    /// Paused time before the current pause.
    paused: Duration,
    /// Since when the tasks are paused.
    since: Option<tokio::time::Instant>,
}

impl Clock {
    fn pause(&mut self, now: tokio::time::Instant) {
        self.since.get_or_insert(now);
    }

    fn go_on(&mut self, now: tokio::time::Instant) {
        if let Some(since) = self.since.take() {
            self.paused += now.saturating_duration_since(since);
        }
    }

    /// The channel's time at the runtime's `now`.
    fn channel_time(&self, now: tokio::time::Instant) -> std::time::Instant {
        let now = self.since.unwrap_or(now);
        now.checked_sub(self.paused).unwrap_or(now).into_std()
    }

    /// The runtime's time at the channel's `at` (while running).
    fn runtime_time(&self, at: std::time::Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(at) + self.paused
    }
}

/// The phase the tasks are told, and which of them are at rest in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tasks {
    phase: Phase,
    rest: AtRest,
}

/// Which tasks are paused at a clean point, or ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AtRest {
    reader: bool,
    writer: bool,
    timer: bool,
}

/// One of the tasks [`AtRest`] counts.
#[derive(Debug, Clone, Copy)]
enum Task {
    Reader,
    Writer,
    Timer,
}

impl AtRest {
    /// Sets `task`'s flag; whether it changed.
    fn set(&mut self, task: Task, yes: bool) -> bool {
        let flag = match task {
            Task::Reader => &mut self.reader,
            Task::Writer => &mut self.writer,
            Task::Timer => &mut self.timer,
        };
        std::mem::replace(flag, yes) != yes
    }

    fn get(&self, task: Task) -> bool {
        match task {
            Task::Reader => self.reader,
            Task::Writer => self.writer,
            Task::Timer => self.timer,
        }
    }

    fn all(&self) -> bool {
        self.reader && self.writer && self.timer
    }
}

/// A cloneable handle to a running channel.
#[derive(Clone)]
pub struct FabricHandle {
    shared: Arc<DriverState>,
}

impl FabricHandle {
    /// The channel's pipe, when its transport takes spliced payloads
    /// (a relay splices into it, then says so with
    /// [`Channel::commit_spliced`]).
    pub fn pipe(&self) -> Option<&Pipe> {
        let shared = &self.shared;
        shared
            .pipe
            .get_or_init(|| {
                shared.can_splice.then(|| {
                    Pipe::new()
                        .inspect_err(
                            |e| tracing::debug!(error = %e, "no pipe: relays copy every read"),
                        )
                        .ok()
                })?
            })
            .as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, Channel> {
        // A panic while holding the lock cannot leave the channel half
        // updated in a way later calls rely on; keep serving.
        self.shared
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the channel, delivers the events it raised and flushes
    /// whatever it queued.
    pub fn with<T>(&self, f: impl FnOnce(&mut Channel) -> T) -> T {
        let events = &self.shared.events;
        self.run(f, |e| {
            let _ = events.send(e);
        })
    }

    /// [`FabricHandle::with`] for output that may wait up to
    /// [`COALESCE`] to go out with more (a notification nothing waits
    /// for). The first such output in a while goes at once and opens a
    /// window of [`COALESCE`]; what comes within it waits for the window's
    /// end, when the flusher task wakes the writer for all of it. A burst
    /// of such calls from outside the runtime thus costs about two
    /// wake-ups of it and two writes per window, not one each.
    pub fn with_coalesced<T>(&self, f: impl FnOnce(&mut Channel) -> T) -> T {
        let mut ch = self.lock();
        let r = f(&mut ch);
        while let Some(e) = ch.poll_event() {
            let _ = self.shared.events.send(e);
        }
        let pending = ch.pending_transmit() > 0;
        let closed = ch.is_closed();
        drop(ch);
        self.wake_waiting_reader();
        use std::sync::atomic::Ordering;
        if closed {
            self.closed();
            self.shared.wake_writer.notify_one();
        } else if pending && !self.shared.window.swap(true, Ordering::AcqRel) {
            self.shared.wake_writer.notify_one();
            self.shared.coalesced.notify_one();
        }
        r
    }

    /// [`FabricHandle::with`], keeping the events raised in `raised`.
    fn with_raised<T>(&self, raised: &mut Vec<Event>, f: impl FnOnce(&mut Channel) -> T) -> T {
        self.run(f, |e| raised.push(e))
    }

    fn run<T>(&self, f: impl FnOnce(&mut Channel) -> T, mut raised: impl FnMut(Event)) -> T {
        let mut ch = self.lock();
        // Output queued earlier has woken the writer already, but for
        // that of `with_coalesced`, which waits for the flusher or for
        // more: only a call that queues more wakes the writer.
        let before = ch.pending_transmit();
        let was = (ch.is_open(), ch.is_closed());
        let r = f(&mut ch);
        while let Some(e) = ch.poll_event() {
            raised(e);
        }
        let closed = ch.is_closed();
        let wake = ch.pending_transmit() > before || closed;
        let changed = (ch.is_open(), closed) != was;
        drop(ch);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        if changed {
            self.shared.timer.notify_one();
        }
        if closed {
            self.closed();
        }
        self.wake_waiting_reader();
        r
    }

    /// Wakes the reader if it waits for room ([`Channel::input_paused`]):
    /// the call just made may have answered a request or closed the
    /// channel.
    fn wake_waiting_reader(&self) {
        use std::sync::atomic::Ordering;
        if self.shared.reader_waiting.load(Ordering::SeqCst) {
            self.shared.drained.notify_one();
        }
    }

    /// The channel is closed: tells the reader and the writer (once).
    fn closed(&self) {
        self.shared
            .closed
            .send_if_modified(|c| !std::mem::replace(c, true));
    }

    /// Pauses, resumes or disowns the tasks ([`Phase`]). Back to
    /// `Running`, the writer and the timer look at the channel again (it
    /// may have queued output, or changed its deadline, meanwhile).
    /// `Disowned` is for good: later calls change nothing.
    pub fn set_phase(&self, phase: Phase) {
        if self.phase() == Phase::Disowned {
            return;
        }
        let now = tokio::time::Instant::now();
        {
            let mut clock = self.clock();
            match phase {
                Phase::Running => clock.go_on(now),
                Phase::Frozen | Phase::Disowned => clock.pause(now),
            }
        }
        let changed = self
            .shared
            .tasks
            .send_if_modified(|t| std::mem::replace(&mut t.phase, phase) != phase);
        if changed && phase == Phase::Running {
            self.shared.wake_writer.notify_one();
            self.shared.timer.notify_one();
        }
    }

    pub fn phase(&self) -> Phase {
        self.shared.tasks.borrow().phase
    }

    /// Follows the phase ([`PhaseWatch`]).
    pub fn phase_watch(&self) -> PhaseWatch {
        PhaseWatch(self.shared.tasks.subscribe())
    }

    /// Waits until the reader, the writer and the timer are all paused at
    /// a clean point (or ended) after [`Phase::Frozen`]: the writer stops
    /// in the middle of a write that waits for its peer (where its
    /// transport can, [`TransportWrite::stops_anywhere`]).
    pub async fn at_rest(&self) {
        let mut tasks = self.shared.tasks.subscribe();
        let _ = tasks.wait_for(Tasks::frozen_at_rest).await;
    }

    /// Whether the tasks are all paused ([`FabricHandle::at_rest`]), now.
    pub fn is_at_rest(&self) -> bool {
        self.shared.tasks.borrow().frozen_at_rest()
    }

    /// The transport's socket, where it has one ([`TransportWrite::raw_fd`]).
    pub fn transport_fd(&self) -> Option<RawFd> {
        self.shared.transport_fd
    }

    /// The channel's pipe, if it was made ([`FabricHandle::pipe`] makes it).
    pub fn pipe_made(&self) -> Option<&Pipe> {
        self.shared.pipe.get().and_then(Option::as_ref)
    }

    fn clock(&self) -> MutexGuard<'_, Clock> {
        self.shared.clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The time as the channel knows it ([`Clock`]): what a snapshot of
    /// it is taken at.
    pub fn channel_time(&self) -> std::time::Instant {
        let now = tokio::time::Instant::now();
        self.clock().channel_time(now)
    }

    /// `task` ended: at rest for good.
    fn ended(&self, task: Task) {
        self.shared
            .tasks
            .send_if_modified(|t| t.rest.set(task, true));
    }

    /// A task's clean point: returns at once while running; while frozen,
    /// marks `task` at rest and waits. `false`: disowned, the task ends.
    /// The phase is read and the flag set in one step, so a freeze never
    /// counts a task at rest that has seen `Running` and goes on.
    async fn rest(&self, tasks: &mut watch::Receiver<Tasks>, task: Task) -> bool {
        // Running and not marked: nothing to write (the common case, once
        // per read or write, takes only the read side of the lock).
        let running = {
            let t = tasks.borrow();
            t.phase == Phase::Running && !t.rest.get(task)
        };
        if running {
            return true;
        }
        loop {
            let mut go_on = None;
            self.shared.tasks.send_if_modified(|t| match t.phase {
                Phase::Running => {
                    go_on = Some(true);
                    t.rest.set(task, false)
                }
                Phase::Frozen => t.rest.set(task, true),
                Phase::Disowned => {
                    go_on = Some(false);
                    t.rest.set(task, true)
                }
            });
            if let Some(go_on) = go_on {
                return go_on;
            }
            if tasks.changed().await.is_err() {
                return false;
            }
        }
    }
}

/// How a relay of the channel's endpoint follows its [`Phase`]
/// ([`FabricHandle::phase_watch`]): it stops at a clean point while the
/// tasks are not running.
pub struct PhaseWatch(watch::Receiver<Tasks>);

impl PhaseWatch {
    pub fn is_running(&self) -> bool {
        self.0.borrow().phase == Phase::Running
    }

    /// Returns once the tasks are told to pause (at once if they are).
    pub async fn paused(&mut self) {
        told_to_pause(&mut self.0).await;
    }

    /// Returns once the tasks run again: never, once disowned.
    pub async fn running(&mut self) {
        if self
            .0
            .wait_for(|t| t.phase == Phase::Running)
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }
}

impl Tasks {
    fn frozen_at_rest(&self) -> bool {
        self.phase == Phase::Frozen && self.rest.all()
    }
}

/// Where the reader task delivers what the peer sends.
pub trait Sink: Send + 'static {
    fn event(&mut self, e: Event);
    /// The pipe into which the rest of `conn`'s Data payload may be
    /// spliced (see [`crate::splice`]); `None` (the default): read it.
    fn receive_pipe(&mut self, _conn: ConnId) -> Option<Arc<ReceivePipe>> {
        None
    }
}

impl<F: FnMut(Event) + Send + 'static> Sink for F {
    fn event(&mut self, e: Event) {
        self(e)
    }
}

/// After a splice, the next read asks for this much: the next frame's
/// header, and not much of its payload, which is better spliced too.
const SHORT_READ: usize = 4096;

/// Starts the reader and writer tasks of `channel` on the current tokio
/// runtime and returns the handle and the event stream.
pub fn spawn<R: TransportRead, W: TransportWrite>(
    channel: Channel,
    reader: R,
    writer: W,
) -> (FabricHandle, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = tx.clone();
    let handle = spawn_inner(channel, reader, writer, tx, move |e| {
        let _ = sink.send(e);
    });
    (handle, rx)
}

/// [`spawn`], but the events raised by input from the peer (all of them
/// but a `Closed` that a local call causes) go to `sink`, called by the
/// reader task itself in channel order, rather than through the returned
/// stream: a receiver that routes them at once saves a task wake-up per
/// frame.
pub fn spawn_with_sink<R: TransportRead, W: TransportWrite>(
    channel: Channel,
    reader: R,
    writer: W,
    sink: impl Sink,
) -> (FabricHandle, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (spawn_inner(channel, reader, writer, tx, sink), rx)
}

fn spawn_inner<R: TransportRead, W: TransportWrite>(
    mut channel: Channel,
    reader: R,
    writer: W,
    events: mpsc::UnboundedSender<Event>,
    sink: impl Sink,
) -> FabricHandle {
    // Its clock is the runtime's until a pause.
    channel.start(tokio::time::Instant::now().into_std());
    // The node's Hello is already queued: the writer is woken for it.
    start_tasks(channel, reader, writer, events, sink, None, Phase::Running)
}

/// [`spawn_with_sink`] for a channel restored from a snapshot
/// ([`Channel::restore`]) over a transport and a pipe that moved from
/// another endpoint: no handshake, the channel goes on where it was. The
/// tasks start `Frozen` (attach what must be attached, then
/// [`FabricHandle::set_phase`] `Running`); the writer then first writes
/// the output the channel carried, the spliced payloads from `pipe`.
pub fn spawn_resumed<R: TransportRead, W: TransportWrite>(
    channel: Channel,
    reader: R,
    writer: W,
    sink: impl Sink,
    pipe: Option<Pipe>,
) -> (FabricHandle, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = start_tasks(channel, reader, writer, tx, sink, pipe, Phase::Frozen);
    (handle, rx)
}

fn start_tasks<R: TransportRead, W: TransportWrite>(
    mut channel: Channel,
    reader: R,
    writer: W,
    events: mpsc::UnboundedSender<Event>,
    sink: impl Sink,
    pipe: Option<Pipe>,
    phase: Phase,
) -> FabricHandle {
    let can_splice = writer.can_splice();
    // A transport that hands chunks on as they are (in memory) gets whole
    // buffers, which its reader decodes in place.
    channel.hand_off_buffers(writer.hands_chunks_on());
    let made = std::sync::OnceLock::new();
    if let Some(pipe) = pipe {
        let _ = made.set(Some(pipe));
    }
    let handle = FabricHandle {
        shared: Arc::new(DriverState {
            channel: Mutex::new(channel),
            wake_writer: Notify::new(),
            coalesced: Notify::new(),
            window: std::sync::atomic::AtomicBool::new(false),
            events,
            pipe: made,
            can_splice,
            closed: watch::Sender::new(false),
            timer: Notify::new(),
            drained: Notify::new(),
            reader_waiting: std::sync::atomic::AtomicBool::new(false),
            tasks: watch::Sender::new(Tasks {
                phase,
                rest: AtRest::default(),
            }),
            clock: Mutex::new(Clock {
                paused: Duration::ZERO,
                since: (phase != Phase::Running).then(tokio::time::Instant::now),
            }),
            transport_fd: writer.raw_fd(),
        }),
    };
    handle.shared.wake_writer.notify_one();
    tokio::spawn(read_loop(handle.clone(), reader, sink));
    let h = handle.clone();
    tokio::spawn(async move {
        write_loop(h.clone(), writer).await;
        // The channel is closed: the flusher ends too, and a reader
        // waiting for room.
        h.shared.coalesced.notify_one();
        h.shared.drained.notify_one();
    });
    tokio::spawn(flush_loop(handle.clone()));
    tokio::spawn(timer_loop(handle.clone()));
    handle
}

/// Runs `f` until the channel is closed; `None` if it was first.
async fn or_closed<T>(
    closed: &mut watch::Receiver<bool>,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        r = f => Some(r),
        _ = closed.wait_for(|c| *c) => None,
    }
}

/// Runs `f` until the channel is closed or the tasks are paused
/// ([`Phase`]); `f` must lose nothing when dropped unfinished (a read of
/// tokio's, a splice).
async fn or_stopped<T>(
    closed: &mut watch::Receiver<bool>,
    tasks: &mut watch::Receiver<Tasks>,
    f: impl std::future::Future<Output = T>,
) -> Stopped<T> {
    tokio::select! {
        r = or_closed(closed, f) => r.map_or(Stopped::Closed, Stopped::Done),
        _ = told_to_pause(tasks) => Stopped::Paused,
    }
}

/// Returns once the tasks are told to stop running.
async fn told_to_pause(tasks: &mut watch::Receiver<Tasks>) {
    let _ = tasks.wait_for(|t| t.phase != Phase::Running).await;
}

enum Stopped<T> {
    Done(T),
    Closed,
    Paused,
}

async fn read_loop<R: TransportRead>(handle: FabricHandle, mut reader: R, mut sink: impl Sink) {
    read_until_stopped(&handle, &mut reader, &mut sink).await;
    if handle.phase() == Phase::Disowned {
        // The socket is another endpoint's now: not closed here.
        std::mem::forget(reader);
    }
    handle.ended(Task::Reader);
}

async fn read_until_stopped<R: TransportRead>(
    handle: &FabricHandle,
    reader: &mut R,
    sink: &mut impl Sink,
) {
    let mut buf = BytesMut::new();
    let mut raised = Vec::new();
    let splices = reader.can_splice();
    let mut closed = handle.shared.closed.subscribe();
    let mut phase = handle.shared.tasks.subscribe();
    // How much the next read may take, when it should stop short: before
    // the channel is open, no more than a handshake frame (a stranger's
    // connection holds no Data-sized buffer).
    let mut limit = Some(HANDSHAKE_MAX_FRAME);
    loop {
        // A clean point: what was read is fed, what was not is in the socket.
        if !handle.rest(&mut phase, Task::Reader).await {
            return;
        }
        let max = limit;
        let read = async {
            match max {
                Some(max) => reader.read_at_most(&mut buf, max).await,
                None => reader.read(&mut buf).await,
            }
        };
        // Once the channel is closed the socket goes (with the writer's
        // half), whether the peer sends more or not.
        let r = match or_stopped(&mut closed, &mut phase, read).await {
            Stopped::Done(r) => r,
            Stopped::Closed => return,
            Stopped::Paused => continue,
        };
        limit = None;
        let mut open = false;
        let (mut done, mut pending, mut paused) = feed(handle, &mut raised, sink, |ch| {
            match r {
                Ok(0) => ch.transport_closed("the peer closed the fabric connection"),
                Ok(_) => {
                    // The owner hears the reason in its `Closed` event and
                    // logs it (the io-server rate-limited): once is enough.
                    if let Err(e) = ch.handle_input_buf(&mut buf) {
                        tracing::debug!(reason = %e, "closing fabric channel");
                    }
                }
                Err(e) => ch.transport_closed(&format!("fabric read failed: {e}")),
            }
            buf.clear();
            open = ch.is_open();
        });
        if !open {
            limit = Some(HANDSHAKE_MAX_FRAME);
        }
        // The input stopped inside a large Data payload: splice the rest
        // into its connection's pipe, where it has one.
        while splices && !done {
            let Some((conn, left)) = pending else {
                break;
            };
            let Some(pipe) = sink.receive_pipe(conn).filter(|p| p.room() > 0) else {
                break;
            };
            if left < STREAM_MIN {
                // Not worth two splices: read it, and the next header.
                limit = Some(left + SHORT_READ);
                break;
            }
            let splice = reader.splice_into(&pipe, left.min(pipe.room()));
            let r = match or_stopped(&mut closed, &mut phase, splice).await {
                Stopped::Done(r) => r,
                Stopped::Closed => return,
                // The rest of the payload is read (or spliced) after the pause.
                Stopped::Paused => break,
            };
            let mut read_instead = false;
            (done, pending, paused) = feed(handle, &mut raised, sink, |ch| match r {
                Ok(Some(0)) => ch.transport_closed("the peer closed the fabric connection"),
                Ok(Some(n)) => {
                    ch.payload_spliced(n);
                    limit = Some(SHORT_READ);
                }
                Ok(None) => read_instead = true,
                Err(e) => ch.transport_closed(&format!("fabric read failed: {e}")),
            });
            if read_instead {
                break;
            }
        }
        if done || (paused && !wait_for_room(handle, &mut phase).await) {
            return;
        }
    }
}

/// Waits while the channel says so ([`Channel::input_paused`]: its
/// output is over its limit, or too many requests wait for answers): a
/// peer that does not read what its frames ask for (a Pong per Ping, an
/// answer per request) is not read either, so what is queued for and
/// from it stays bounded. False once the channel is closed (or the
/// channel was disowned while paused).
async fn wait_for_room(handle: &FabricHandle, phase: &mut watch::Receiver<Tasks>) -> bool {
    use std::sync::atomic::Ordering;
    let waiting = &handle.shared.reader_waiting;
    tracing::debug!(
        "output to the peer or its unanswered requests over their limit: reading paused"
    );
    loop {
        // Raised before looking: a call that answers in between wakes us.
        waiting.store(true, Ordering::SeqCst);
        let (paused, closed) = {
            let ch = handle.lock();
            (ch.input_paused(), ch.is_closed())
        };
        if closed || !paused {
            waiting.store(false, Ordering::SeqCst);
            return !closed;
        }
        // A permit stored by a write or an answer in between is not lost.
        // Waiting here is a clean point too.
        let paused = tokio::select! {
            _ = handle.shared.drained.notified() => false,
            _ = told_to_pause(phase) => true,
        };
        if paused && !handle.rest(phase, Task::Reader).await {
            return false;
        }
    }
}

/// Runs `f` on the channel and hands the events it raised to `sink`,
/// outside the channel's lock (the sink may call into the channel).
/// Returns whether the channel is closed and, asked under the same lock,
/// the Data payload the input stopped inside ([`Channel::payload_pending`])
/// and whether reading should pause ([`Channel::input_paused`]).
fn feed(
    handle: &FabricHandle,
    raised: &mut Vec<Event>,
    sink: &mut impl Sink,
    f: impl FnOnce(&mut Channel),
) -> (bool, Option<(ConnId, usize)>, bool) {
    let r = handle.with_raised(raised, |ch| {
        f(ch);
        (ch.is_closed(), ch.payload_pending(), ch.input_paused())
    });
    for e in raised.drain(..) {
        sink.event(e);
    }
    r
}

/// How long the writer may still take, once the channel is closed, to
/// flush what is queued (its `GoAway`) to a peer that does not read.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

async fn write_loop<W: TransportWrite>(handle: FabricHandle, mut writer: W) {
    let mut closed = handle.shared.closed.subscribe();
    let linger = async {
        let _ = closed.wait_for(|c| *c).await;
        tokio::time::sleep(CLOSE_LINGER).await;
    };
    tokio::select! {
        _ = write_all(&handle, &mut writer) => {}
        _ = linger => tracing::debug!("fabric peer does not read: output of a closed channel dropped"),
    }
    if handle.phase() == Phase::Disowned {
        // tokio's write halves shut the socket's write side on drop: the
        // endpoint it moved to would lose its stream.
        std::mem::forget(writer);
    }
    handle.ended(Task::Writer);
}

async fn write_all<W: TransportWrite>(handle: &FabricHandle, writer: &mut W) {
    let mut phase = handle.shared.tasks.subscribe();
    loop {
        // A clean point: what is not written is the channel's (the rest
        // of a piece stopped halfway given back to it).
        if !handle.rest(&mut phase, Task::Writer).await {
            return;
        }
        tokio::select! {
            _ = handle.shared.wake_writer.notified() => {}
            _ = told_to_pause(&mut phase) => continue,
        }
        // Let every task already woken in this pass of the event loop add
        // its frames first (tokio runs a task woken by a running task next,
        // so without this each relay's frame would go out in a write of its
        // own): one write, and one wake-up of the peer, per batch.
        to_the_back_of_the_run_queue().await;
        loop {
            if handle.phase() != Phase::Running {
                break;
            }
            let (next, closed) = handle.with(|ch| (ch.poll_transmit(), ch.is_closed()));
            let written = match next {
                Some(t) => Some(write_transmit(handle, writer, t, &mut phase).await),
                None => None,
            };
            if written.is_some() {
                handle.shared.drained.notify_one();
            }
            match written {
                Some(Ok(None)) => {}
                // Paused in the middle of it: the rest is the channel's
                // again, first in its output.
                Some(Ok(Some(rest))) => {
                    handle.with(|ch| ch.unpoll_transmit(rest));
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "fabric write failed");
                    handle.with(|ch| ch.transport_closed(&format!("fabric write failed: {e}")));
                    return;
                }
                None if closed => {
                    let _ = writer.shutdown().await;
                    return;
                }
                None => break,
            }
        }
    }
}

/// Writes one piece of the channel's output: its bytes, then the payload
/// it says is waiting in the channel's pipe. Where the transport can stop
/// between any two of its writes ([`TransportWrite::stops_anywhere`]),
/// the tasks told to pause stop it at once: `Some` of what it has not
/// written (the rest of its bytes, then the spliced octets still in the
/// pipe), which the caller gives back to the channel. A node that does not
/// read thus never holds a freeze up.
async fn write_transmit<W: TransportWrite>(
    handle: &FabricHandle,
    writer: &mut W,
    mut t: Transmit,
    phase: &mut watch::Receiver<Tasks>,
) -> io::Result<Option<Transmit>> {
    let stops = writer.stops_anywhere();
    while !t.bytes.is_empty() || t.spliced > 0 {
        if stops && handle.phase() != Phase::Running {
            return Ok(Some(t));
        }
        let wrote = {
            let step = async {
                if !t.bytes.is_empty() {
                    writer.write_some(&mut t.bytes).await
                } else {
                    let pipe = handle.pipe().ok_or(io::ErrorKind::Unsupported)?;
                    writer.splice_some(pipe, &mut t.spliced).await
                }
            };
            match stops {
                // Biased: a write that does not wait never registers with
                // the phase's watch (the loop's top looks at the phase).
                true => tokio::select! {
                    biased;
                    r = step => Some(r),
                    _ = told_to_pause(phase) => None,
                },
                false => Some(step.await),
            }
        };
        match wrote {
            Some(r) => r?,
            // What each step wrote is stepped past in `t`.
            None => return Ok(Some(t)),
        }
    }
    Ok(None)
}

/// How long output queued with [`FabricHandle::with_coalesced`] may wait
/// for more before the writer is woken for it.
pub const COALESCE: Duration = Duration::from_millis(1);

/// Closes each window [`FabricHandle::with_coalesced`] opens after
/// [`COALESCE`], waking the writer for what was queued in it (which may
/// have gone out with other output meanwhile); ends once the channel is
/// closed.
async fn flush_loop(handle: FabricHandle) {
    loop {
        handle.shared.coalesced.notified().await;
        if handle.lock().is_closed() {
            return;
        }
        tokio::time::sleep(COALESCE).await;
        // Cleared before the wake: output queued after the wake opens a
        // window of its own (and goes at once).
        handle
            .shared
            .window
            .store(false, std::sync::atomic::Ordering::Release);
        handle.shared.wake_writer.notify_one();
    }
}

/// Returns after the tasks already runnable have run. A task that wakes
/// itself goes to the back of tokio's run queue, with no poll of the I/O
/// driver in between (`tokio::task::yield_now` defers until after one,
/// an `epoll_wait` per batch).
async fn to_the_back_of_the_run_queue() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Tells the channel the time whenever it asks to be told
/// ([`Channel::poll_timeout`]: the handshake's deadline, then its
/// liveness checks), asking again when it opens or closes; ends once it
/// asks no more (it is closed, or open without liveness).
/// Paused, it tells the channel nothing, and the channel's clock stands
/// still ([`Clock`]): a channel that heard nothing for the pause is not
/// found dead for it.
async fn timer_loop(handle: FabricHandle) {
    let mut phase = handle.shared.tasks.subscribe();
    while handle.rest(&mut phase, Task::Timer).await {
        let Some(deadline) = handle.with(|ch| ch.poll_timeout()) else {
            break;
        };
        let deadline = handle.clock().runtime_time(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if handle.phase() == Phase::Running {
                    let now = handle.channel_time();
                    handle.with(|ch| ch.handle_timeout(now));
                }
            }
            _ = handle.shared.timer.notified() => {}
            _ = told_to_pause(&mut phase) => {}
        }
    }
    handle.ended(Task::Timer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelConfig;
    use crate::frame::ConnId;
    use crate::transport::{memory_pair, StreamWriter};
    use bytes::Bytes;
    use std::io;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A transport writer that counts its writes.
    struct Counting {
        inner: StreamWriter,
        writes: Arc<AtomicUsize>,
    }

    impl TransportWrite for Counting {
        async fn write(&mut self, bytes: Bytes) -> io::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.inner.write(bytes).await
        }
        async fn shutdown(&mut self) -> io::Result<()> {
            self.inner.shutdown().await
        }
        fn hands_chunks_on(&self) -> bool {
            self.inner.hands_chunks_on()
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event in time")
            .expect("the driver runs")
    }

    // One worker: tokio runs a task woken by a running task next (its LIFO
    // slot), which is what would give each sender's frame a write of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn frames_queued_in_one_pass_go_out_in_one_write() {
        const SENDERS: usize = 20;
        let ((sr, sw), (nr, nw)) = memory_pair();
        let writes = Arc::new(AtomicUsize::new(0));
        let sw = Counting {
            inner: sw,
            writes: writes.clone(),
        };
        let (server, mut server_ev) = spawn(Channel::io_server(ChannelConfig::new("t")), sr, sw);
        let node_ch = Channel::node(ChannelConfig::new("t").node("n1", 1));
        let (_node, mut node_ev) = spawn(node_ch, nr, nw);
        assert!(matches!(
            next(&mut server_ev).await,
            Event::NodeAuthenticated { .. }
        ));
        server.with(|ch| ch.welcome(1));
        assert!(matches!(next(&mut node_ev).await, Event::Welcome { .. }));
        let addr = SocketAddr::from(([127, 0, 0, 1], 80));
        let conns: Vec<ConnId> = (0..SENDERS)
            .map(|_| {
                server
                    .with(|ch| ch.accept_connection(2, addr, addr))
                    .unwrap()
            })
            .collect();
        for _ in 0..SENDERS {
            assert!(matches!(
                next(&mut node_ev).await,
                Event::ConnectionAccepted { .. }
            ));
        }
        let before = writes.load(Ordering::SeqCst);
        // All senders become runnable in the same pass of the worker.
        let s = server.clone();
        tokio::spawn(async move {
            for conn in conns {
                let s = s.clone();
                tokio::spawn(async move { s.with(|ch| ch.send_message(conn, b"x")).unwrap() });
            }
        })
        .await
        .unwrap();
        for _ in 0..SENDERS {
            assert!(matches!(
                next(&mut node_ev).await,
                Event::MessageReceived { .. }
            ));
        }
        let batches = writes.load(Ordering::SeqCst) - before;
        assert!(
            batches <= 2,
            "{SENDERS} frames queued together took {batches} writes"
        );
    }

    /// The driver sleeps until the channel's deadline and tells it the
    /// time: an io-server channel whose node never speaks is closed then,
    /// with the channel's reason (time is paused: no real wait).
    #[tokio::test(start_paused = true)]
    async fn a_channel_not_open_by_its_deadline_is_closed_by_the_timer() {
        let ((sr, sw), (_nr, _nw)) = memory_pair();
        let start = tokio::time::Instant::now();
        let (server, mut events) = spawn(Channel::io_server(ChannelConfig::new("t")), sr, sw);
        match events.recv().await.expect("the driver runs") {
            Event::Closed { error } => assert_eq!(
                error.to_string(),
                "closed locally: authentication did not complete within 10 s"
            ),
            other => panic!("expected Closed, got {other:?}"),
        }
        assert_eq!(
            start.elapsed(),
            HANDSHAKE_TIMEOUT,
            "at the deadline, not before"
        );
        assert!(server.with(|ch| ch.is_closed()));
    }

    /// Paused for ten times its peer timeout, an io-server channel is not
    /// found dead: the timer does not run, and its clock stands still.
    /// Running again, it pings the node as before and stays open.
    #[tokio::test(start_paused = true)]
    async fn a_paused_channel_does_not_find_its_peer_silent() {
        let ((sr, sw), (nr, nw)) = memory_pair();
        let timeout = Duration::from_secs(3);
        let config = ChannelConfig::new("t").liveness(Duration::from_secs(1), timeout);
        let (server, mut server_ev) = spawn(Channel::io_server(config), sr, sw);
        let node_ch = Channel::node(ChannelConfig::new("t").node("n1", 1));
        let (node, mut node_ev) = spawn(node_ch, nr, nw);
        assert!(matches!(
            next(&mut server_ev).await,
            Event::NodeAuthenticated { .. }
        ));
        server.with(|ch| ch.welcome(1));
        assert!(matches!(next(&mut node_ev).await, Event::Welcome { .. }));

        // Past a check that saw the node's last input (a Pong): the
        // channel heard nothing since that check when it is paused.
        tokio::time::sleep(Duration::from_millis(4500)).await;
        server.set_phase(Phase::Frozen);
        tokio::time::timeout(Duration::from_secs(1), server.at_rest())
            .await
            .expect("paused at once");
        let before = server.channel_time();
        // Paused time: the runtime's clock jumps, the channel's does not.
        tokio::time::sleep(timeout * 10).await;
        assert_eq!(server.channel_time(), before);
        assert!(
            server.with(|ch| ch.is_open()),
            "not found dead while paused"
        );

        server.set_phase(Phase::Running);
        let pings = node.with(|ch| ch.stats().pings_received);
        tokio::time::sleep(timeout * 3).await;
        assert!(server.with(|ch| ch.is_open()), "not found dead after");
        assert!(
            node.with(|ch| ch.stats().pings_received) > pings,
            "the liveness pings go on"
        );
        assert!(server_ev.try_recv().is_err(), "no Closed");
    }

    /// A stranger that connects and sends nothing loses the connection at
    /// the deadline: the reader stops reading (the peer's writes fail)
    /// and the writer ends the stream after the `GoAway`.
    #[tokio::test(start_paused = true)]
    async fn at_the_deadline_both_halves_of_the_transport_are_dropped() {
        let ((sr, sw), (mut nr, mut nw)) = memory_pair();
        let (_server, mut events) = spawn(Channel::io_server(ChannelConfig::new("t")), sr, sw);
        assert!(matches!(
            events.recv().await.expect("the driver runs"),
            Event::Closed { .. }
        ));
        let mut got = BytesMut::new();
        loop {
            got.clear();
            let n = tokio::time::timeout(Duration::from_secs(1), nr.read(&mut got))
                .await
                .expect("the server's half ends at once")
                .unwrap();
            if n == 0 {
                break;
            }
        }
        let write =
            tokio::time::timeout(Duration::from_secs(1), nw.write(Bytes::from_static(b"x")))
                .await
                .expect("no wait");
        assert!(write.is_err(), "the server's reader is gone");
    }
}

//! `--metrics`: the io-server's figures over HTTP, served as haproxy's
//! Prometheus exporter and Envoy's admin endpoint serve theirs — from a
//! snapshot, off the paths that relay and dispatch.
//!
//! A scrape takes the latest [`Snapshot`] if it is younger than
//! `--metrics-interval`; otherwise one scraper takes a new one (the
//! status collection: the tables' lock held only to copy counters) while
//! concurrent scrapers wait for it, and the new one is published as an
//! `Arc` in a `watch` cell. No lock is held while a scraper reads or
//! writes its socket. Each connection is served in its own task, with
//! `--metrics-timeout` on reading the request and again on writing the
//! answer, a request of at most `--metrics-max-request` bytes, and at most
//! `--metrics-max-connections` at once (further ones wait, unaccepted, in
//! the kernel's queue): a scraper that stalls costs one bounded task.
//!
//! `GET /metrics` is the text exposition format (`prom.rs`), `GET /` the
//! `io-server status` report; `http.rs` reads the request, sans-IO.

mod http;
mod prom;
#[cfg(test)]
mod tests;

use crate::state::ServerState;
use crate::status::Status;
use http::{Request, Verdict};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// The figures of one moment, and their two renderings, made on first
/// use and shared by every scrape of this snapshot.
pub(crate) struct Snapshot {
    taken: Instant,
    status: Status,
    prometheus: OnceLock<String>,
    report: OnceLock<String>,
}

impl Snapshot {
    fn take(server: &ServerState) -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            status: Status::collect(server),
            prometheus: OnceLock::new(),
            report: OnceLock::new(),
        }
    }

    fn prometheus(&self) -> &str {
        self.prometheus.get_or_init(|| prom::render(&self.status))
    }

    fn report(&self) -> &str {
        self.report.get_or_init(|| self.status.to_string())
    }
}

/// The published snapshot and who is taking the next one.
pub(crate) struct Snapshots {
    cell: watch::Sender<Option<Arc<Snapshot>>>,
    /// A scraper is taking a snapshot; the others wait for it.
    taking: AtomicBool,
    max_age: Duration,
}

/// Clears [`Snapshots::taking`] however the taker ends.
struct Taking<'a>(&'a AtomicBool);

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Snapshots {
    pub fn new(max_age: Duration) -> Snapshots {
        Snapshots {
            cell: watch::Sender::new(None),
            taking: AtomicBool::new(false),
            max_age,
        }
    }

    /// A snapshot no older than `max_age`: the published one, or a new
    /// one this caller takes, or the one another caller is taking (waited
    /// for until `patience` runs out, then whatever is published, else
    /// one of its own).
    pub async fn current(&self, server: &ServerState, patience: Duration) -> Arc<Snapshot> {
        let mut rx = self.cell.subscribe();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let published = rx.borrow_and_update().clone();
            if let Some(s) = &published {
                if s.taken.elapsed() < self.max_age {
                    return s.clone();
                }
            }
            let waited = tokio::time::Instant::now() >= deadline;
            if waited || !self.taking.swap(true, Ordering::AcqRel) {
                let _taking = (!waited).then(|| Taking(&self.taking));
                let fresh = Arc::new(Snapshot::take(server));
                self.cell.send_replace(Some(fresh.clone()));
                return fresh;
            }
            // Another scraper is taking it: wait for its publication.
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }
}

/// Serves `--metrics` on `listener` until shutdown.
pub(crate) async fn serve(server: Arc<ServerState>, listener: TcpListener) {
    let c = &server.config;
    let slots = Arc::new(Semaphore::new(c.metrics_max_connections as usize));
    let snapshots = Arc::new(Snapshots::new(Duration::from_millis(c.metrics_interval)));
    let accept = || {
        let slots = slots.clone();
        let listener = &listener;
        async move {
            // A free slot first: beyond the bound, scrapers wait unaccepted.
            let slot = slots
                .acquire_owned()
                .await
                .map_err(|_| std::io::Error::other("metrics slots closed"))?;
            let (s, peer) = listener.accept().await?;
            Ok((s, peer, slot))
        }
    };
    server
        .accept_until_shutdown("metrics", accept, |(s, peer, slot)| {
            let (server, snapshots) = (server.clone(), snapshots.clone());
            tokio::spawn(async move {
                let answer = server.answering.begin();
                if let Err(reason) = scrape(&server, &snapshots, s).await {
                    tracing::warn!(%peer, reason, "metrics connection closed");
                }
                drop(answer);
                drop(slot);
            });
        })
        .await
}

/// Answers one metrics connection; why it was cut short, if it was.
async fn scrape(
    server: &ServerState,
    snapshots: &Snapshots,
    mut s: TcpStream,
) -> Result<(), &'static str> {
    let c = &server.config;
    let timeout = Duration::from_secs(c.metrics_timeout);
    let read = read_request(&mut s, c.metrics_max_request as usize);
    let verdict = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| "no complete request within --metrics-timeout")?;
    let answer = match verdict {
        Verdict::Request(Request::Metrics) => {
            let snap = snapshots.current(server, timeout).await;
            http::response(200, prom::CONTENT_TYPE, snap.prometheus())
        }
        Verdict::Request(Request::Report) => {
            let snap = snapshots.current(server, timeout).await;
            http::response(200, "text/plain; charset=utf-8", snap.report())
        }
        Verdict::Request(Request::NotFound) => http::error(404),
        Verdict::Request(Request::NotGet) => http::error(405),
        Verdict::Closed => return Ok(()),
        Verdict::Malformed => http::error(400),
        Verdict::TooLarge => http::error(431),
    };
    let write = async {
        s.write_all(&answer).await?;
        s.shutdown().await
    };
    match tokio::time::timeout(timeout, write).await {
        Err(_) => Err("the answer was not taken within --metrics-timeout"),
        Ok(Err(_)) => Err("the scraper went away before taking the answer"),
        Ok(Ok(())) => match verdict {
            Verdict::TooLarge => Err("request larger than --metrics-max-request"),
            Verdict::Malformed => Err("not an HTTP request"),
            _ => Ok(()),
        },
    }
}

/// Reads a request's head, at most `max` bytes of it.
async fn read_request(s: &mut TcpStream, max: usize) -> Verdict {
    let mut head = Vec::with_capacity(512.min(max));
    let mut buf = [0u8; 1024];
    loop {
        let eof = match s.read(&mut buf).await {
            Ok(0) | Err(_) => true,
            Ok(n) => {
                head.extend_from_slice(&buf[..n]);
                false
            }
        };
        if let Some(v) = http::parse(&head, max, eof) {
            return v;
        }
    }
}

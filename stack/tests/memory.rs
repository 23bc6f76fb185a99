//! What a backlog pool costs in memory: a listener's idle listening
//! sockets hold their buffers' address space but not its pages (the
//! buffers are mapped lazily, `sys::Mapped`). Its own process, so the
//! resident set is not shared with other tests. Also an idle connection's
//! cost after a small request.

mod net;

use net::*;
use std::time::{Duration, Instant};

/// The two tests measure the one process's resident set: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_backlog_pool_of_2000_idle_sockets_costs_pages_not_buffers() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = Net::new(|_| {}) else { return };
    const N: usize = 2000;
    let before = rss_kib();
    let _l = net.stack().listen(80, N as u32).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.stack().stats().unwrap().sockets < N {
        assert!(Instant::now() < deadline, "pool not filled");
        std::thread::sleep(Duration::from_millis(10));
    }
    let grown = rss_kib().saturating_sub(before);
    let each = grown * 1024 / N as u64;
    eprintln!("{N} listening sockets (64 KiB + 64 KiB buffers each): {grown} KiB resident, {each} bytes each");
    // The buffers alone would be 128 KiB a socket.
    assert!(each < 16 * 1024, "{each} bytes resident per idle socket");
}

#[test]
fn an_idle_connection_after_a_small_request_costs_a_few_pages() {
    use std::io::{Read, Write};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = Net::new(|_| {}) else { return };
    const N: usize = 500;
    let l = net.stack().listen(8080, N as u32).unwrap();
    let before = rss_kib();
    let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    // N clients each send a 200-byte request and wait.
    let clients = net.client(|| {
        (0..N)
            .map(|_| {
                let mut s = std::net::TcpStream::connect((SINGLE, 8080)).unwrap();
                s.write_all(&[b'x'; 200]).unwrap();
                s
            })
            .collect::<Vec<_>>()
    });
    let mut conns = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while conns.len() < N {
        assert!(Instant::now() < deadline, "{} of {N} accepted", conns.len());
        match l.try_accept() {
            Some(c) => {
                let mut s = std::os::unix::net::UnixStream::from(c.fd);
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut req = [0; 200];
                s.read_exact(&mut req).unwrap();
                conns.push(s);
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    let clients = clients.join().unwrap();
    let grown = rss_kib().saturating_sub(before);
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count() - fds_before;
    eprintln!(
        "{N} idle connections after a 200-byte request: {grown} KiB resident ({} bytes each), {fds} fds (with the clients')",
        grown * 1024 / N as u64,
    );
    // Two ends of a pair per connection (the stack's and the user's), and
    // the client's socket, in this process too.
    assert_eq!(fds, 3 * N);
    assert!(grown * 1024 / (N as u64) < 64 * 1024, "{grown} KiB for {N}");
    drop(clients);
}

//! What a backlog pool costs in memory: a listener's idle listening
//! sockets hold their buffers' address space but not its pages (the
//! buffers are mapped lazily, `sys::Mapped`). Its own process, so the
//! resident set is not shared with other tests.

mod net;

use net::*;
use std::time::{Duration, Instant};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_backlog_pool_of_2000_idle_sockets_costs_pages_not_buffers() {
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

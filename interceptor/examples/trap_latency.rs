//! Measures the round trip of one trapped syscall answered with CONTINUE,
//! with and without `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, against the same
//! syscall run natively (DESIGN.md "Dependencies": the trap cost is the
//! budget of the connection rate).
//!
//! `cargo run --release -p saps-interceptor --example trap_latency [CALLS]`
//!
//! The example re-executes itself under the filter as the target: the
//! target times `CALLS` `getsockopt(SO_TYPE)` calls (trapped for every fd)
//! and reports the mean through one more trapped call,
//! `setsockopt(SO_PRIORITY, &nanoseconds)`, which the supervisor reads from
//! the target's memory and answers itself.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::time::Instant;

use anyhow::{bail, Context};
use nix::sys::socket::{
    getsockopt, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
};
use saps_interceptor::{Notifier, Reply, Target, TargetMemory};

const WARMUP: u32 = 1_000;

fn udp_socket() -> anyhow::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Mean µs of one `getsockopt(SO_TYPE)` over `calls` calls.
fn time_calls(calls: u32) -> anyhow::Result<f64> {
    let fd = udp_socket()?;
    for _ in 0..WARMUP {
        getsockopt(&fd, sockopt::SockType)?;
    }
    let start = Instant::now();
    for _ in 0..calls {
        getsockopt(&fd, sockopt::SockType)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(calls))
}

/// Answers every trapped syscall with CONTINUE until the target reports its
/// mean (in ns) with `setsockopt(SO_PRIORITY)`; returns that mean in µs.
fn serve(notifier: &Notifier) -> anyhow::Result<f64> {
    loop {
        let n = match notifier.recv() {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            other => other.context("recv")?,
        };
        if i64::from(n.nr) == libc::SYS_setsockopt && n.args[2] == libc::SO_PRIORITY as u64 {
            let nanos = TargetMemory::new(n.pid).read_u32(n.args[3])?;
            notifier.respond(n.id, Reply::Value(0)).context("respond")?;
            return Ok(f64::from(nanos) / 1e3);
        }
        notifier.respond(n.id, Reply::Continue).context("respond")?;
    }
}

/// Runs this program as a filtered target; returns its measured mean.
fn trapped(calls: u32, sync_wake_up: bool) -> anyhow::Result<f64> {
    let me = std::env::current_exe()?;
    let args = [
        OsString::from("--target"),
        OsString::from(calls.to_string()),
    ];
    let (target, notifier) = Target::spawn(me.as_os_str(), &args)?;
    notifier
        .set_sync_wake_up(sync_wake_up)
        .context("SECCOMP_IOCTL_NOTIF_SET_FLAGS")?;
    let mean = serve(&notifier)?;
    let status = target.wait()?;
    if status.exit_code() != 0 {
        bail!("target failed: {status:?}");
    }
    Ok(mean)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, calls] = args.as_slice() {
        if flag == "--target" {
            let nanos = (time_calls(calls.parse()?)? * 1e3) as i32;
            setsockopt(&udp_socket()?, sockopt::Priority, &nanos)?;
            return Ok(());
        }
    }
    let calls: u32 = args
        .first()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    println!("one getsockopt(SO_TYPE), mean of {calls} calls:");
    println!(
        "  native:                               {:7.2} µs",
        time_calls(calls)?
    );
    println!(
        "  trapped + CONTINUE, SYNC_WAKE_UP on:  {:7.2} µs",
        trapped(calls, true)?
    );
    println!(
        "  trapped + CONTINUE, SYNC_WAKE_UP off: {:7.2} µs",
        trapped(calls, false)?
    );
    Ok(())
}

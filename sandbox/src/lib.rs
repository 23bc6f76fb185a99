//! `saps-sandbox`: confines a SAPS daemon's own threads (the io-server,
//! saps-run's node) to an allow-list of system calls once it has started,
//! the way firecracker confines its threads with seccompiler.
//!
//! [`confine`] compiles the list with seccompiler and loads it on every
//! thread of the process at once (`SECCOMP_FILTER_FLAG_TSYNC`); threads
//! made later inherit it. A call outside the list does not kill the
//! process: the filter traps it (`SECCOMP_RET_TRAP`), and a `SIGSYS`
//! handler makes it fail with `EPERM`, counts it ([`denied_calls`]) and
//! writes one line to standard error (and, when `SAPS_SANDBOX_LOG` names a
//! file at [`confine`] time, to that file too), so a missing entry shows up
//! as a logged error, not as a dead gateway. Only async-signal-safe work
//! happens in the handler: an atomic add and `write(2)` of a line built on
//! the stack.
//!
//! The program saps-run supervises is another process and never inherits
//! the filter: it is started before [`confine`] is called, and saps-run
//! starts no other process afterwards.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

mod calls;

pub use calls::{IO_SERVER, NODE, RUNTIME};

/// The environment variable naming a file that also receives every denial.
pub const LOG_ENV: &str = "SAPS_SANDBOX_LOG";

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot compile the system-call allow-list: {0}")]
    Compile(#[from] seccompiler::BackendError),
    #[error("cannot load the system-call allow-list: {0}")]
    Load(#[from] seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("this architecture has no allow-list")]
    Architecture,
}

static DENIED: AtomicU64 = AtomicU64::new(0);
static LOG_FD: AtomicI32 = AtomicI32::new(-1);
static PROCESS: OnceLock<&'static str> = OnceLock::new();

/// How many calls the sandbox refused since it was set up.
pub fn denied_calls() -> u64 {
    DENIED.load(Ordering::Relaxed)
}

/// Confines every thread of this process to `allowed` (system call
/// numbers, e.g. [`RUNTIME`] with [`IO_SERVER`]); `process` names it in
/// the denial lines.
pub fn confine(process: &'static str, allowed: &[&[i64]]) -> Result<(), SandboxError> {
    let arch = if cfg!(target_arch = "x86_64") {
        seccompiler::TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        seccompiler::TargetArch::aarch64
    } else {
        return Err(SandboxError::Architecture);
    };
    let _ = PROCESS.set(process);
    if let Some(path) = std::env::var_os(LOG_ENV) {
        use std::os::fd::IntoRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => LOG_FD.store(f.into_raw_fd(), Ordering::Relaxed),
            Err(e) => tracing::warn!("{LOG_ENV}={}: {e}", path.to_string_lossy()),
        }
    }
    install_handler()?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed
        .iter()
        .flat_map(|list| list.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Trap,
        seccompiler::SeccompAction::Allow,
        arch,
    )?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    seccompiler::apply_filter_all_threads(&program)?;
    tracing::info!(
        calls = allowed.iter().map(|l| l.len()).sum::<usize>(),
        "{process}: system calls confined to the allow-list"
    );
    Ok(())
}

fn install_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed `sigaction` is a valid value to fill in; the
    // handler is an `extern "C"` function of the right signature for
    // `SA_SIGINFO`, and it only does async-signal-safe work.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The `SIGSYS` of a trapped call: the call fails with `EPERM`, and the
/// denial is counted and logged.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid `siginfo_t` and `ucontext_t` to an
    // `SA_SIGINFO` handler; for a seccomp `SIGSYS` the siginfo's union is
    // `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`, whose
    // `_syscall` lies 24 bytes in on 64-bit Linux. The return register is
    // written in the saved context, which the kernel restores on return.
    let nr = unsafe {
        let nr = *(info as *const u8).add(24).cast::<i32>();
        set_return(context.cast(), -i64::from(libc::EPERM));
        nr
    };
    DENIED.fetch_add(1, Ordering::Relaxed);
    let mut line = Line::default();
    line.push(PROCESS.get().copied().unwrap_or("saps").as_bytes());
    line.push(b": sandbox: refused system call ");
    line.number(i64::from(nr));
    line.push(b" with EPERM (not in the allow-list; --no-sandbox turns it off)\n");
    line.write_to(libc::STDERR_FILENO);
    let log = LOG_FD.load(Ordering::Relaxed);
    if log >= 0 {
        line.write_to(log);
    }
}

/// Sets the value the trapped call returns.
///
/// # Safety
/// `context` is the `ucontext_t` of a signal being handled on this thread.
#[cfg(target_arch = "x86_64")]
unsafe fn set_return(context: *mut libc::ucontext_t, value: i64) {
    (*context).uc_mcontext.gregs[libc::REG_RAX as usize] = value;
}

/// Sets the value the trapped call returns.
///
/// # Safety
/// `context` is the `ucontext_t` of a signal being handled on this thread.
#[cfg(target_arch = "aarch64")]
unsafe fn set_return(context: *mut libc::ucontext_t, value: i64) {
    (*context).uc_mcontext.regs[0] = value as u64;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn set_return(_context: *mut libc::ucontext_t, _value: i64) {}

/// A line built without allocating (inside a signal handler).
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }

    fn write_to(&self, fd: libc::c_int) {
        // SAFETY: `buf[..len]` is initialised; write(2) is
        // async-signal-safe. A short or failed write loses the line only.
        let _ = unsafe { libc::write(fd, self.buf.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests;

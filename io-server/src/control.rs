//! The control socket (`--control PATH`, mode 0600): one command per
//! connection, one line each way and then the report.
//!
//! * `status` — the [`Status`] report;
//! * `weight NODE N` — sets node `NODE`'s weight (name or id) to `N`; 0 drains;
//! * `upgrade VERSION PID` — hand this io-server over to process PID (the
//!   new process of `io-server upgrade`; `upgrade/handover.rs`);
//! * `sandbox` — whether the system-call sandbox is on and how many calls it
//!   refused; `sandbox probe` makes one call outside the allow-list
//!   (`mkdir`) and reports what it returned, for tests and operators who
//!   want to see the sandbox answer.
//!
//! Answers start with `ok` / `error:` on failures so scripts can check.

use crate::cluster;
use crate::state::ServerState;
use crate::status::Status;
use crate::Error;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest command line accepted.
const MAX_LINE: u64 = 4096;

/// Binds the control socket, replacing a stale one.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, Error> {
    let err = |source| Error::ControlBind {
        path: path.into(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another io-server is answering on it",
        )));
    }
    let _ = std::fs::remove_file(path);
    // Created 0600 (under a private umask); the chmod below only keeps
    // it so on a filesystem that ignores the umask for sockets.
    let l = saps_fabric::private::bind_private(|| UnixListener::bind(path)).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

pub(crate) async fn serve(server: Arc<ServerState>, listener: UnixListener) {
    server
        .accept_until_shutdown(
            "control",
            || listener.accept(),
            |(s, _)| {
                tokio::spawn(answer(server.clone(), s));
            },
        )
        .await;
    // Shut down: leave no stale socket file behind.
    if let Some(path) = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
    {
        let _ = std::fs::remove_file(path);
    }
}

async fn answer(server: Arc<ServerState>, s: UnixStream) {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_LINE));
    let read = reader.read_line(&mut line);
    if tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return;
    }
    let line = line.trim();
    if line.starts_with("upgrade ") {
        // The connection carries the handover: both halves again.
        if let Ok(s) = reader.into_inner().into_inner().reunite(w) {
            crate::upgrade::handover::give(server, s, line).await;
        }
        return;
    }
    let answer = server.answering.begin();
    let reply = execute(&server, line);
    let _ = w.write_all(reply.as_bytes()).await;
    drop(answer);
}

/// Runs one control command and returns the text to send back.
fn execute(server: &Arc<ServerState>, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["status"] => Status::collect(server).to_string(),
        ["weight", node, n] => match n.parse::<u32>() {
            Ok(w) if cluster::set_weight_by_name(server, node, w) => {
                format!("ok: weight of {node} is now {w}\n")
            }
            Ok(_) => format!("error: no node named {node} (see `io-server status`)\n"),
            Err(_) => format!(
                "error: weight must be a number from 0 to {}, not `{n}`\n",
                u32::MAX
            ),
        },
        ["sandbox"] => format!(
            "ok: {} system calls refused\n",
            saps_sandbox::denied_calls()
        ),
        ["sandbox", "probe"] => {
            // A call no io-server needs: refused (EPERM) under the sandbox,
            // ENOENT without it.
            let r = std::fs::create_dir("/nonexistent/saps-sandbox-probe");
            format!(
                "ok: mkdir returned {}\n",
                r.err()
                    .and_then(|e| e.raw_os_error())
                    .map_or("success".into(), |e| nix::errno::Errno::from_raw(e)
                        .to_string())
            )
        }
        _ => format!("error: unknown command `{line}` (try `status` or `weight NODE N`)\n"),
    }
}

/// Client side: sends `command` to the io-server at `path` and returns its answer.
pub async fn request(path: &Path, command: &str) -> Result<String, Error> {
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| Error::ControlConnect {
            path: path.into(),
            source,
        })?;
    let io = |source| Error::ControlConnect {
        path: path.into(),
        source,
    };
    s.write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.map_err(io)?;
    if let Some(msg) = reply.strip_prefix("error: ") {
        return Err(Error::Command(msg.trim_end().to_string()));
    }
    Ok(reply)
}

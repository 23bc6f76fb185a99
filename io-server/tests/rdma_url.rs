//! Issue 8: `io-server --fabric rdma://…` either serves RDMA or refuses to
//! start with one clear line. In a build with `--features rdma` on a host
//! without an RDMA device (this one) the line says "no RDMA device found";
//! in a build without the feature it says which build is needed. Never a
//! panic, and never a daemon that starts without its fabric.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the binary may take to refuse.
const LIMIT: Duration = Duration::from_secs(10);

/// Whether this host has an RDMA device (then the refusal cannot happen).
fn rdma_device_present() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// Runs `io-server ARGS` until it exits (killed after [`LIMIT`]); returns
/// its exit code (`None`: it did not exit by itself) and its stderr.
fn io_server(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_io-server"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&stderr).unwrap())
}

#[test]
fn rdma_fabric_url_refuses_to_start_with_one_clear_line() {
    if cfg!(feature = "rdma") && rdma_device_present() {
        eprintln!("SKIPPED: this host has an RDMA device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let control = dir.path().join("ctl");
    let (code, stderr) = io_server(&[
        "--fabric",
        "rdma://127.0.0.1:7711",
        "--token-file",
        token.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "exits with failure by itself: {stderr}");
    let reason = if cfg!(feature = "rdma") {
        "no RDMA device found ("
    } else {
        "rdma:// needs a build with --features rdma"
    };
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(
        errors[0]
            .starts_with("io-server: error: cannot listen for nodes on rdma://127.0.0.1:7711: ")
            && errors[0].contains(reason),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!control.exists(), "nothing was started: {stderr}");
}

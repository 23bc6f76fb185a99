//! Issue 8, from the node's side: `saps-run --io-server rdma://…` refuses
//! with one clear line and exit status 125 before the program runs. The
//! workspace's binaries are built without the `rdma` feature, so the line
//! names the build that is needed (`io-server/tests/rdma_url.rs` covers the
//! io-server in both builds).

use saps_tests::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn rdma_io_server_url_is_refused_before_the_program_runs() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write_token(&token, "s3cret\n");
    let ran = dir.path().join("ran");
    let mut p = Proc::spawn(Command::new(bin("saps-run")).args([
        "--io-server".as_ref(),
        "rdma://127.0.0.1:7711".as_ref(),
        "--token-file".as_ref(),
        token.as_os_str(),
        "--".as_ref(),
        "touch".as_ref(),
        ran.as_os_str(),
    ]));
    let code = p.wait_timeout(Duration::from_secs(10));
    let stderr = p.stderr();
    assert_eq!(code, Some(125), "saps-run's own failure status: {stderr}");
    assert_eq!(
        stderr.trim(),
        "saps-run: connecting to the io-server at rdma://127.0.0.1:7711: \
         rdma:// needs a build with --features rdma (this binary was built without it)"
    );
    assert!(!ran.exists(), "the program did not run");
}

//! A node that cannot join its io-server says why in one line, prefixed
//! `saps-run:`, and exits with saps-run's own failure status (125) before
//! the program starts: the user's mistakes the command line and the
//! application node report.

use std::path::PathBuf;
use std::process::Command;

/// saps-run's status when it fails itself (not its program).
const OWN_FAILURE: i32 = 125;

/// A scratch path of this test process's own.
fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("saps-run-join-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A private (mode 0600) token file at scratch path `name`.
fn token_file(name: &str, contents: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = scratch(name);
    std::fs::write(&p, contents).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Runs saps-run with `args` before `-- true`; its status and standard
/// error. `true` would exit 0: any other status is saps-run's.
fn saps_run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_saps-run"))
        .args(args)
        .args(["--", "true"])
        .env_remove("SAPS_IO_SERVER")
        .env_remove("SAPS_TOKEN_FILE")
        .output()
        .expect("running saps-run");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_remote_io_server_without_a_token_file_is_refused_in_one_line() {
    let (code, stderr) = saps_run(&["--io-server", "unix:/nonexistent/saps.sock"]);
    assert_eq!(code, Some(OWN_FAILURE), "{stderr}");
    assert_eq!(
        stderr,
        "saps-run: --io-server needs --token-file (the fabric's shared token)\n"
    );
}

#[test]
fn an_io_server_url_without_a_known_scheme_names_the_option() {
    let token = token_file("scheme.token", "t\n");
    let (code, stderr) = saps_run(&[
        "--io-server",
        "http://gw:80",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    std::fs::remove_file(&token).unwrap();
    assert_eq!(code, Some(OWN_FAILURE), "{stderr}");
    assert_eq!(
        stderr,
        "saps-run: --io-server http://gw:80: fabric URL `http://gw:80` must start with unix:, tcp:// or rdma://\n"
    );
}

#[test]
fn an_empty_token_file_is_refused_before_connecting() {
    let token = token_file("empty.token", "\n");
    let (code, stderr) = saps_run(&[
        "--io-server",
        "unix:/nonexistent/saps.sock",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    std::fs::remove_file(&token).unwrap();
    assert_eq!(code, Some(OWN_FAILURE), "{stderr}");
    assert_eq!(
        stderr,
        format!("saps-run: the token file {} is empty\n", token.display())
    );
}

#[test]
fn an_io_server_that_is_not_there_is_named_with_the_reason() {
    let token = token_file("absent.token", "t\n");
    let sock = scratch("absent.sock");
    let url = format!("unix:{}", sock.display());
    let (code, stderr) = saps_run(&["--io-server", &url, "--token-file", token.to_str().unwrap()]);
    std::fs::remove_file(&token).unwrap();
    assert_eq!(code, Some(OWN_FAILURE), "{stderr}");
    assert_eq!(
        stderr,
        format!("saps-run: connecting to the io-server at {url}: No such file or directory (os error 2)\n")
    );
}

#[test]
fn a_token_file_other_users_may_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let token = token_file("open.token", "t\n");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = saps_run(&[
        "--io-server",
        "unix:/nonexistent/saps.sock",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    std::fs::remove_file(&token).unwrap();
    assert_eq!(code, Some(OWN_FAILURE), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "saps-run: the token file {0} is open to other users (mode 0644); make it private: chmod o-rwx {0}\n",
            token.display()
        )
    );
}

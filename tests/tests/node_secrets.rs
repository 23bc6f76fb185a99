//! What the program under saps-run may not learn of its node: where the
//! fabric's token lives (the `SAPS_TOKEN_FILE` variable saps-run reads) and
//! the node's memory (the token itself), which a process of the same user
//! could otherwise read through `/proc/PID/mem` or `environ`.

use saps_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

#[test]
fn the_program_does_not_inherit_the_token_file_variable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _io = unix_io_server(d);
    let mut program = Proc::spawn(
        Command::new(bin("saps-run"))
            .env("SAPS_TOKEN_FILE", d.join("token"))
            .args([
                "--io-server",
                &format!("unix:{}", d.join("saps.sock").display()),
                "--node",
                "a",
                "--",
                PYTHON,
                "-c",
                "import os; print(os.environ.get('SAPS_TOKEN_FILE'))",
            ]),
    );
    assert_eq!(
        program.wait_timeout(Duration::from_secs(60)),
        Some(0),
        "{}",
        program.stderr()
    );
    // The node read its token through the variable (it joined), and the
    // program never saw it.
    assert_eq!(program.stdout().trim(), "None");
}

#[test]
fn an_unprivileged_program_cannot_read_its_nodes_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `nobody` must reach the binary.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let saps_run = d.join("saps-run");
    std::fs::copy(bin("saps-run"), &saps_run).unwrap();
    let mut program = Proc::spawn(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&saps_run)
            .args([
                "--",
                PYTHON,
                "-c",
                "import os\n\
                 print('own', len(open('/proc/self/environ', 'rb').read()) > 0)\n\
                 for f in ('environ', 'mem'):\n\
                 \x20   try:\n\
                 \x20       open('/proc/%d/%s' % (os.getppid(), f), 'rb').read(1)\n\
                 \x20       print(f, 'readable')\n\
                 \x20   except PermissionError:\n\
                 \x20       print(f, 'denied')",
            ])
            .current_dir(d),
    );
    assert_eq!(
        program.wait_timeout(Duration::from_secs(60)),
        Some(0),
        "{}",
        program.stderr()
    );
    assert_eq!(
        program.stdout().lines().collect::<Vec<_>>(),
        ["own True", "environ denied", "mem denied"],
        "{}",
        program.stderr()
    );
}

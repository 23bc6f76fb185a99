//! Launching real programs: exit statuses, signals and exec errors.

mod common;

use std::ffi::OsString;

use saps_interceptor::{Error, ExitStatus, Target};

fn sh(script: &str) -> Target {
    let (target, _notifier) = Target::spawn(
        "sh".as_ref(),
        &[OsString::from("-c"), OsString::from(script)],
    )
    .unwrap();
    target
}

#[test]
fn exit_code_of_the_target_is_propagated() {
    assert_eq!(
        common::wait_within_limit(&sh("exit 7")),
        ExitStatus::Code(7)
    );
}

#[test]
fn death_by_signal_is_reported_as_such() {
    let status = common::wait_within_limit(&sh("kill -9 $$"));
    assert_eq!(
        status,
        ExitStatus::Signal {
            signal: libc::SIGKILL,
            core_dumped: false
        }
    );
}

#[test]
fn signal_reaches_the_target() {
    let target = sh("exec sleep 30");
    target.signal(libc::SIGTERM).unwrap();
    assert_eq!(
        common::wait_within_limit(&target).exit_code(),
        128 + libc::SIGTERM
    );
}

#[test]
fn missing_program_is_a_clear_error() {
    for program in ["/nonexistent/saps-no-such-program", "saps-no-such-program"] {
        match Target::spawn(program.as_ref(), &[]) {
            Err(e @ Error::Exec { .. }) => assert_eq!(
                e.to_string(),
                format!("{program}: No such file or directory")
            ),
            other => panic!("{program}: {other:?}"),
        }
    }
}

#[test]
fn non_executable_program_is_permission_denied() {
    let err = Target::spawn("/etc/passwd".as_ref(), &[]).unwrap_err();
    assert_eq!(err.to_string(), "/etc/passwd: Permission denied");
}

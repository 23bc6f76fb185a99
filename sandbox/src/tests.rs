use super::*;

/// Set in the child process the test runs: it confines itself, which would
/// confine the whole test harness if done in the parent.
const CHILD: &str = "SAPS_SANDBOX_TEST_CHILD";

/// The confined child: an allowed call works, a call outside the list
/// fails with EPERM and is counted, and the process carries on.
fn child() {
    confine("sandbox-test", &[RUNTIME]).expect("confine");
    assert_eq!(denied_calls(), 0);
    // SAFETY: plain syscalls without pointers.
    let (pid, denied) = unsafe {
        (
            libc::syscall(libc::SYS_getpid),
            libc::syscall(
                libc::SYS_mkdirat,
                libc::AT_FDCWD,
                c"/nonexistent".as_ptr(),
                0o700,
            ),
        )
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!(pid, i64::from(std::process::id() as i32));
    assert_eq!((denied, errno), (-1, Some(libc::EPERM)));
    assert_eq!(denied_calls(), 1);
    // Threads made after confining inherit it.
    let in_thread = std::thread::spawn(|| {
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, c"/x".as_ptr(), 0o700) }
    })
    .join()
    .unwrap();
    assert_eq!(in_thread, -1);
    assert_eq!(denied_calls(), 2);
    println!("child done");
}

#[test]
fn a_call_outside_the_list_fails_with_eperm_is_logged_and_the_process_goes_on() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let log = std::env::temp_dir().join(format!("saps-sandbox-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::a_call_outside_the_list_fails_with_eperm_is_logged_and_the_process_goes_on",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env(LOG_ENV, &log)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("child done"),
        "{stdout}\n{stderr}"
    );
    let line = format!(
        "sandbox-test: sandbox: refused system call {} with EPERM (not in the allow-list; --no-sandbox turns it off)\n",
        libc::SYS_mkdirat
    );
    assert_eq!(stderr.matches(&line).count(), 2, "{stderr}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), line.repeat(2));
    std::fs::remove_file(&log).unwrap();
}

#[test]
fn the_lists_name_each_call_once() {
    for list in [RUNTIME, IO_SERVER, NODE] {
        let mut sorted = list.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), list.len());
    }
    for nr in IO_SERVER.iter().chain(NODE) {
        assert!(!RUNTIME.contains(nr), "{nr} is in RUNTIME already");
    }
}

#[test]
fn the_line_writer_formats_numbers_without_allocating() {
    let mut l = Line::default();
    l.number(0);
    l.push(b" ");
    l.number(-4095);
    l.push(b" ");
    l.number(i64::MAX);
    assert_eq!(&l.buf[..l.len], b"0 -4095 9223372036854775807");
}

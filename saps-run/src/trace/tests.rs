//! The formatter against lines captured from strace 6.1 (`strace -f -T -e
//! trace=network python3 …` on this machine), built from hand-made records.

use super::*;
use saps_interceptor::notify::Reply;
use saps_interceptor::supervisor::{Detail, Note};
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

const CLOEXEC: u64 = libc::SOCK_CLOEXEC as u64;
/// 2026-11-25T08:26:13.405804Z.
const START: Duration = Duration::new(1_795_595_173, 405_804_000);

/// A call that returned `value`, with nothing decoded beyond its arguments.
fn ok(pid: i32, nr: i64, args: &[u64], value: i64, us: u64) -> CallRecord {
    rec(pid, nr, args, Reply::Value(value), Detail::default(), us)
}

fn rec(pid: i32, nr: i64, args: &[u64], result: Reply, detail: Detail, us: u64) -> CallRecord {
    let mut a = [0u64; 6];
    a[..args.len()].copy_from_slice(args);
    CallRecord {
        pid,
        nr,
        args: a,
        detail,
        result,
        start: UNIX_EPOCH + START,
        duration: Duration::from_micros(us),
        note: Note::default(),
    }
}

fn addr(s: &str) -> Detail {
    Detail {
        addr: Some(s.parse::<SocketAddr>().unwrap()),
        ..Detail::default()
    }
}

fn with_lens(mut d: Detail, len_in: u32, len: u32) -> Detail {
    d.len_in = Some(len_in);
    d.len = Some(len);
    d
}

fn int_value(v: i32, len_in: Option<u32>) -> Detail {
    Detail {
        value: Some(v.to_ne_bytes().to_vec()),
        len_in,
        len: len_in,
        ..Detail::default()
    }
}

const PURE: Style = Style {
    timestamps: false,
    annotate: false,
};

fn line(call: &CallRecord, prefix: Prefix, style: Style) -> String {
    text::format(call, &decode::decode(call), prefix, style)
}

/// Each record, formatted with no prefix, equals the strace line.
#[test]
fn lines_match_strace_argument_for_argument() {
    use libc::*;
    let lo = "127.0.0.1:34497";
    let cases = [
        (
            rec(1, SYS_socket, &[2, 1 | CLOEXEC, 0], Reply::Value(3), Detail::default(), 53),
            "socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 3 <0.000053>",
        ),
        (
            rec(1, SYS_socket, &[2, 1 | CLOEXEC | SOCK_NONBLOCK as u64, 0], Reply::Value(4), Detail::default(), 27),
            "socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC|SOCK_NONBLOCK, IPPROTO_IP) = 4 <0.000027>",
        ),
        (
            rec(1, SYS_setsockopt, &[3, 1, 2, 0x7ffd_0000, 4], Reply::Value(0), int_value(1, None), 21),
            "setsockopt(3, SOL_SOCKET, SO_REUSEADDR, [1], 4) = 0 <0.000021>",
        ),
        (
            rec(1, SYS_setsockopt, &[5, 6, 1, 0x7ffd_0000, 4], Reply::Value(0), int_value(1, None), 21),
            "setsockopt(5, SOL_TCP, TCP_NODELAY, [1], 4) = 0 <0.000021>",
        ),
        (
            rec(
                1,
                SYS_setsockopt,
                &[5, 1, SO_LINGER as u64, 0x7ffd_0000, 8],
                Reply::Value(0),
                Detail {
                    value: Some([1i32.to_ne_bytes(), 5i32.to_ne_bytes()].concat()),
                    ..Detail::default()
                },
                16,
            ),
            "setsockopt(5, SOL_SOCKET, SO_LINGER, {l_onoff=1, l_linger=5}, 8) = 0 <0.000016>",
        ),
        (
            rec(1, SYS_bind, &[3, 0x7ffd_0000, 16], Reply::Value(0), addr("127.0.0.1:0"), 56),
            "bind(3, {sa_family=AF_INET, sin_port=htons(0), sin_addr=inet_addr(\"127.0.0.1\")}, 16) = 0 <0.000056>",
        ),
        (
            rec(1, SYS_bind, &[3, 0x7ffd_0000, 28], Reply::Value(0), addr("[::]:0"), 85),
            "bind(3, {sa_family=AF_INET6, sin6_port=htons(0), sin6_flowinfo=htonl(0), \
             inet_pton(AF_INET6, \"::\", &sin6_addr), sin6_scope_id=0}, 28) = 0 <0.000085>",
        ),
        (
            rec(1, SYS_listen, &[3, 5], Reply::Value(0), Detail::default(), 14),
            "listen(3, 5)                            = 0 <0.000014>",
        ),
        (
            rec(1, SYS_getsockname, &[5, 0x7ffd_0000, 0x7ffd_0100], Reply::Value(0), with_lens(addr(lo), 128, 16), 12),
            "getsockname(5, {sa_family=AF_INET, sin_port=htons(34497), sin_addr=inet_addr(\"127.0.0.1\")}, [128 => 16]) = 0 <0.000012>",
        ),
        (
            rec(
                1,
                SYS_accept4,
                &[3, 0x7ffd_0000, 0x7ffd_0100, CLOEXEC],
                Reply::Value(5),
                with_lens(addr("127.0.0.1:34252"), 16, 16),
                26,
            ),
            "accept4(3, {sa_family=AF_INET, sin_port=htons(34252), sin_addr=inet_addr(\"127.0.0.1\")}, [16], SOCK_CLOEXEC) = 5 <0.000026>",
        ),
        (
            rec(1, SYS_accept4, &[3, 0, 0, SOCK_NONBLOCK as u64], Reply::Value(5), Detail::default(), 0),
            "accept4(3, NULL, NULL, SOCK_NONBLOCK)   = 5 <0.000000>",
        ),
        (
            rec(1, SYS_accept, &[3, 0, 0], Reply::Errno(EAGAIN), Detail::default(), 0),
            "accept(3, NULL, NULL)                   = -1 EAGAIN (Resource temporarily unavailable) <0.000000>",
        ),
        (
            rec(1, SYS_getsockopt, &[4, 1, 4, 0x7ffd_0000, 0x7ffd_0100], Reply::Value(0), int_value(0, Some(4)), 11),
            "getsockopt(4, SOL_SOCKET, SO_ERROR, [0], [4]) = 0 <0.000011>",
        ),
        (
            rec(1, SYS_shutdown, &[4, 1], Reply::Value(0), Detail::default(), 33),
            "shutdown(4, SHUT_WR)                    = 0 <0.000033>",
        ),
        (
            rec(1, SYS_connect, &[4, 1, 16], Reply::Errno(EFAULT), Detail::default(), 14),
            "connect(4, 0x1, 16)                     = -1 EFAULT (Bad address) <0.000014>",
        ),
        (
            rec(1, SYS_getsockname, &[4, 1, 1], Reply::Errno(EFAULT), Detail::default(), 18),
            "getsockname(4, 0x1, 0x1)                = -1 EFAULT (Bad address) <0.000018>",
        ),
        (
            rec(
                1,
                SYS_getpeername,
                &[3, 0x7fff_e51e_fae0, 0x7fff_e51e_fb00],
                Reply::Errno(ENOTCONN),
                Detail {
                    len_in: Some(28),
                    ..Detail::default()
                },
                22,
            ),
            "getpeername(3, 0x7fffe51efae0, [28])    = -1 ENOTCONN (Transport endpoint is not connected) <0.000022>",
        ),
        (
            rec(1, SYS_setsockopt, &[3, 41, 26, 0x7ffd_0000, 4], Reply::Errno(EINVAL), int_value(0, None), 27),
            "setsockopt(3, SOL_IPV6, IPV6_V6ONLY, [0], 4) = -1 EINVAL (Invalid argument) <0.000027>",
        ),
    ];
    for (call, want) in cases {
        assert_eq!(line(&call, Prefix::None, PURE), format!("{want}\n"));
    }
}

#[test]
fn pid_prefixes_and_clock_match_strace() {
    let connect = rec(
        20036,
        libc::SYS_connect,
        &[4, 0x7ffd_0000, 16],
        Reply::Errno(libc::EINPROGRESS),
        addr("127.0.0.1:1"),
        146,
    );
    assert_eq!(
        line(&connect, Prefix::Bracketed, PURE),
        "[pid 20036] connect(4, {sa_family=AF_INET, sin_port=htons(1), sin_addr=inet_addr(\"127.0.0.1\")}, 16) \
         = -1 EINPROGRESS (Operation now in progress) <0.000146>\n"
    );
    // strace -f -o FILE: "%-5d " on every line; the padding counts it.
    let bad = rec(
        20785,
        libc::SYS_connect,
        &[4, 1, 16],
        Reply::Errno(libc::EFAULT),
        Detail::default(),
        14,
    );
    assert_eq!(
        line(&bad, Prefix::Plain, PURE),
        "20785 connect(4, 0x1, 16)               = -1 EFAULT (Bad address) <0.000014>\n"
    );
    let socket = ok(20041, libc::SYS_socket, &[10, 1 | CLOEXEC, 0], 3, 57);
    let tt = Style {
        timestamps: true,
        annotate: false,
    };
    assert_eq!(
        line(&socket, Prefix::Plain, tt),
        "20041 08:26:13.405804 socket(AF_INET6, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 3 <0.000057>\n"
    );
}

#[test]
fn pid_prefix_follows_the_destination_like_strace_f() {
    assert_eq!(Sink::Stderr.prefix(10, 10), Prefix::None);
    assert_eq!(Sink::Stderr.prefix(11, 10), Prefix::Bracketed);
    let path = scratch("prefix");
    let file = Sink::File(File::create(&path).unwrap());
    assert_eq!(file.prefix(10, 10), Prefix::Plain);
    let per_pid = Sink::PerPid {
        base: path,
        files: HashMap::new(),
    };
    assert_eq!(per_pid.prefix(11, 10), Prefix::None);
}

#[test]
fn native_calls_print_unknown_result_and_annotations_follow_their_line() {
    let mut call = rec(
        7,
        libc::SYS_connect,
        &[4, 0x7ffd_0000, 16],
        Reply::Continue,
        addr("127.0.0.1:80"),
        5,
    );
    let annotated = Style {
        timestamps: false,
        annotate: true,
    };
    let text = line(&call, Prefix::None, annotated);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].ends_with("16) = ? (native) <0.000005>"), "{text}");
    assert_eq!(lines[1], "  # saps: native");
    assert!(line(&call, Prefix::None, PURE).ends_with("16) = ? <0.000005>\n"));

    call.result = Reply::Value(0);
    call.note = Note {
        inode: Some(123_456),
        conn: Some(7),
        action: "virtual",
        ..Note::default()
    };
    let text = line(&call, Prefix::None, annotated);
    assert_eq!(
        text.lines().nth(1),
        Some("  # saps: inode=123456 conn=7 virtual")
    );
}

/// The counts of the golden program, with strace's own -c output for them
/// (strace reported 0 µs for every call, so only the layout is compared).
#[test]
fn summary_matches_strace_c_layout() {
    use libc::*;
    let mut s = summary::Summary::default();
    for (nr, n) in [
        (SYS_socket, 2),
        (SYS_connect, 1),
        (SYS_shutdown, 1),
        (SYS_bind, 1),
        (SYS_listen, 1),
        (SYS_getsockname, 3),
        (SYS_getpeername, 1),
        (SYS_setsockopt, 1),
        (SYS_getsockopt, 1),
        (SYS_accept4, 1),
    ] {
        for _ in 0..n {
            let call = rec(1, nr, &[], Reply::Value(0), Detail::default(), 0);
            s.add(&call, &decode::decode(&call).outcome);
        }
    }
    let strace = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
  0.00    0.000000           0         2           socket
  0.00    0.000000           0         1           connect
  0.00    0.000000           0         1           shutdown
  0.00    0.000000           0         1           bind
  0.00    0.000000           0         1           listen
  0.00    0.000000           0         3           getsockname
  0.00    0.000000           0         1           getpeername
  0.00    0.000000           0         1           setsockopt
  0.00    0.000000           0         1           getsockopt
  0.00    0.000000           0         1           accept4
------ ----------- ----------- --------- --------- ----------------
100.00    0.000000           0        13           total
";
    assert_eq!(s.render(false), strace);
}

#[test]
fn summary_sorts_by_time_and_counts_errors() {
    let mut s = summary::Summary::default();
    for (nr, result, us) in [
        (libc::SYS_connect, Reply::Errno(libc::ECONNREFUSED), 300),
        (libc::SYS_connect, Reply::Value(0), 500),
        (libc::SYS_socket, Reply::Value(3), 200),
    ] {
        let call = rec(1, nr, &[], result, Detail::default(), us);
        s.add(&call, &decode::decode(&call).outcome);
    }
    let table = s.render(true);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(
        rows[2],
        " 80.00    0.000800         400         2         1 connect"
    );
    assert_eq!(
        rows[3],
        " 20.00    0.000200         200         1           socket"
    );
    assert_eq!(
        rows[5],
        "100.00    0.001000         333         3         1 total"
    );
    assert_eq!(
        rows[6],
        "# saps: 0 SAPS connections, 3 calls served, 0 ran natively"
    );
}

#[test]
fn json_lines_parse_and_carry_the_documented_fields() {
    let mut call = rec(
        42,
        libc::SYS_connect,
        &[4, 0x7ffd_0000, 16],
        Reply::Errno(libc::ECONNREFUSED),
        addr("10.0.0.1:80"),
        146,
    );
    call.note = Note {
        inode: Some(99),
        conn: Some(7),
        action: "virtual",
        group: Some("0.0.0.0:80".parse().unwrap()),
        io_server: Some("embedded".into()),
        node: Some("web1".into()),
    };
    let text = format!("{}", json::record(&call, &decode::decode(&call)));
    assert!(!text.contains('\n'));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ts"], "2026-11-25T08:26:13.405804Z");
    assert_eq!(v["pid"], 42);
    assert_eq!(v["syscall"], "connect");
    assert_eq!(
        v["args"],
        serde_json::json!([
            "4",
            "{sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr(\"10.0.0.1\")}",
            "16"
        ])
    );
    assert_eq!(v["retval"], -1);
    assert_eq!(v["errno"], libc::ECONNREFUSED);
    assert_eq!(v["errno_name"], "ECONNREFUSED");
    assert_eq!(v["duration_us"], 146);
    assert_eq!(
        v["saps"],
        serde_json::json!({"inode": 99, "conn": 7, "action": "virtual",
            "group": "0.0.0.0:80", "io_server": "embedded", "node": "web1"})
    );

    call.result = Reply::Continue;
    let v = json::record(&call, &decode::decode(&call));
    assert!(v["retval"].is_null() && v["errno"].is_null());
}

/// A fresh path under the temp dir for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("saps-trace-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("trace")
}

fn options(output: PathBuf, per_pid: bool, filter: Option<&str>) -> TraceOptions {
    TraceOptions {
        format: TraceFormat::Text,
        output: Some(output),
        per_pid,
        filter: filter.map(|f| f.parse().unwrap()),
        timestamps: false,
        annotate: false,
        summary: true,
    }
}

#[test]
fn output_file_gets_pid_prefixes_filter_and_summary() {
    let path = scratch("one");
    let w = TraceWriter::new(options(path.clone(), false, Some("trace=listen,shutdown"))).unwrap();
    w.record(&ok(100, libc::SYS_listen, &[3, 5], 0, 14));
    w.record(&ok(100, libc::SYS_socket, &[2, 1, 0], 4, 1));
    w.record(&ok(101, libc::SYS_shutdown, &[4, 1], 0, 33));
    w.finish();
    let out = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "100   listen(3, 5)                      = 0 <0.000014>"
    );
    assert_eq!(
        lines[1],
        "101   shutdown(4, SHUT_WR)              = 0 <0.000033>"
    );
    assert!(lines[2].starts_with("% time"), "{out}");
    assert!(
        !out.contains("socket("),
        "the filter let socket through: {out}"
    );
    assert!(out.ends_with("2           total\n"), "{out}");
}

#[test]
fn per_pid_files_hold_each_process_unprefixed() {
    let path = scratch("ff");
    let mut opts = options(path.clone(), true, None);
    opts.summary = false;
    let w = TraceWriter::new(opts).unwrap();
    w.record(&ok(200, libc::SYS_listen, &[3, 5], 0, 14));
    w.record(&ok(201, libc::SYS_listen, &[6, 1], 0, 14));
    w.finish();
    let read = |pid: i32| std::fs::read_to_string(format!("{}.{pid}", path.display())).unwrap();
    assert_eq!(
        read(200),
        "listen(3, 5)                            = 0 <0.000014>\n"
    );
    assert_eq!(
        read(201),
        "listen(6, 1)                            = 0 <0.000014>\n"
    );
}

#[test]
fn an_unwritable_output_is_an_error_at_start() {
    let bad = PathBuf::from("/nonexistent-dir/trace");
    let err = TraceWriter::new(options(bad, false, None))
        .err()
        .expect("no error");
    assert!(err.to_string().contains("/nonexistent-dir/trace"), "{err}");
}

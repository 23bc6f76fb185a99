//! nginx and Apache httpd (prefork and event MPMs), unmodified, serving a
//! 1 KiB and a 10 MiB file through SAPS; wrk runs with zero errors. With
//! saps-run's defaults (native sockets), `--trace -c` shows that nothing
//! traps per connection or per request.

use saps_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// One server under load at a time: three at once on two cores would
/// measure the machine, not SAPS.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long wrk loads each server.
const WRK_SECONDS: &str = "10s";

/// `www/1k.bin` and `www/10m.bin` with known contents; returns their bytes.
fn site(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let small: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let big: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i * 13 % 253) as u8)
        .collect();
    std::fs::write(www.join("1k.bin"), &small).unwrap();
    std::fs::write(www.join("10m.bin"), &big).unwrap();
    // Apache's children run as www-data.
    for p in [dir, &www] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (small, big)
}

fn fetch(url: &str, out: &Path) -> Vec<u8> {
    let (code, _, err) = curl(&["-o", out.to_str().unwrap(), url]);
    assert_eq!(code, 0, "curl {url}: {err}");
    std::fs::read(out).unwrap()
}

/// Serves both files through `server` (started with its port) and loads it
/// with wrk.
fn check_server(name: &str, dir: &Path, port: u16, server: &Proc) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (small, big) = (
        std::fs::read(dir.join("www/1k.bin")).unwrap(),
        std::fs::read(dir.join("www/10m.bin")).unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        wait_http(&format!("{base}/1k.bin"), Duration::from_secs(30)),
        "{name} never answered; saps-run stderr:\n{}",
        server.stderr()
    );
    let out = dir.join("fetched");
    assert!(
        fetch(&format!("{base}/1k.bin"), &out) == small,
        "{name}: 1 KiB file differs"
    );
    assert!(
        fetch(&format!("{base}/10m.bin"), &out) == big,
        "{name}: 10 MiB file differs"
    );
    if !have("wrk") {
        return;
    }
    let o = run(Command::new("wrk").args([
        "-t2",
        "-c50",
        "-d",
        WRK_SECONDS,
        "--timeout",
        "5s",
        &format!("{base}/1k.bin"),
    ]));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{name}: wrk failed: {report}");
    assert!(
        !report.contains("Socket errors") && !report.contains("Non-2xx"),
        "{name}: wrk saw errors:\n{report}"
    );
    assert!(report.contains("Requests/sec"), "{report}");
    eprintln!("{name} through SAPS:\n{report}");
}

/// How saps-run serves the program's sockets.
#[derive(Clone, Copy)]
enum Sockets {
    /// Embedded io-server, virtual sockets, every byte relayed.
    Relayed,
    /// Embedded io-server, virtual sockets, accepted clients handed over.
    ZeroRelay,
    /// saps-run's defaults: the kernel's own sockets, under `--trace -c`.
    Native,
}

impl Sockets {
    fn label(self) -> &'static str {
        match self {
            Sockets::Relayed => "zero-relay off",
            Sockets::ZeroRelay => "zero-relay on",
            Sockets::Native => "native sockets",
        }
    }

    /// saps-run serving `program` this way; `summary` is where `--trace
    /// -c` writes its table (native sockets only).
    fn command(self, summary: &Path, program: &[&str]) -> Command {
        match self {
            Sockets::Relayed => saps_run_local("off", program),
            Sockets::ZeroRelay => saps_run_local("on", program),
            Sockets::Native => {
                let mut c = Command::new(bin("saps-run"));
                c.args(["--trace", "-c", "-o"])
                    .arg(summary)
                    .arg("--")
                    .args(program);
                c
            }
        }
    }
}

/// Serves through `server` (see [`check_server`]); with native sockets,
/// then stops saps-run and checks its `--trace -c` table: the program's
/// listeners are all that trapped, however many requests wrk made.
fn serve_and_check(name: &str, dir: &Path, port: u16, mut server: Proc, sockets: Sockets) {
    check_server(name, dir, port, &server);
    let Sockets::Native = sockets else { return };
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_timeout(Duration::from_secs(20)).is_some(),
        "{name}: saps-run did not exit on SIGTERM"
    );
    let table = std::fs::read_to_string(dir.join("summary")).unwrap();
    let calls: Vec<(&str, u64)> = table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (name, calls) = (*f.last()?, f.get(3)?.parse().ok()?);
            (name != "total" && f[0].ends_with(|c: char| c.is_ascii_digit()))
                .then_some((name, calls))
        })
        .collect();
    assert!(
        !calls.is_empty() && calls.iter().all(|&(n, c)| n == "listen" && c <= 8),
        "{name}: trapped calls other than a few listens:\n{table}"
    );
    eprintln!("{name}: trapped under load: {calls:?}");
}

fn nginx(sockets: Sockets) {
    if !have("nginx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    site(d);
    let port = free_port();
    let conf = format!(
        "daemon off; master_process on; worker_processes 2; user root;\n\
         pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 1024; use epoll; }}\n\
         http {{ access_log {d}/access.log; sendfile on; keepalive_requests 100000;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
           uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{ listen {port}; root {d}/www; }} }}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let server = Proc::spawn(&mut sockets.command(
        &d.join("summary"),
        &[
            "nginx",
            "-c",
            d.join("nginx.conf").to_str().unwrap(),
            "-e",
            d.join("error.log").to_str().unwrap(),
        ],
    ));
    let name = format!("nginx ({})", sockets.label());
    serve_and_check(&name, d, port, server, sockets);
}

#[test]
fn nginx_serves_through_saps_relayed() {
    nginx(Sockets::Relayed);
}

#[test]
fn nginx_serves_through_saps_zero_relay() {
    nginx(Sockets::ZeroRelay);
}

#[test]
fn nginx_serves_through_saps_native_sockets() {
    nginx(Sockets::Native);
}

fn apache(mpm: &str, sockets: Sockets) {
    if !have("apache2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    site(d);
    let port = free_port();
    let m = "/usr/lib/apache2/modules";
    let conf = format!(
        "ServerRoot {d}\nServerName localhost\nListen {port}\nPidFile {d}/httpd.pid\n\
         LoadModule mpm_{mpm}_module {m}/mod_mpm_{mpm}.so\n\
         LoadModule authz_core_module {m}/mod_authz_core.so\n\
         LoadModule mime_module {m}/mod_mime.so\n\
         User www-data\nGroup www-data\nErrorLog {d}/error.log\n\
         Mutex file:{d} default\nTypesConfig /etc/mime.types\n\
         EnableSendfile On\nMaxKeepAliveRequests 0\n\
         DocumentRoot {d}/www\n<Directory {d}/www>\n Require all granted\n</Directory>\n{pool}",
        d = d.display(),
        pool = if mpm == "prefork" {
            // One process per keep-alive connection: start enough for wrk's
            // 50, or new ones are forked at 1, 2, 4 … per second and the
            // first requests time out — without SAPS as well.
            "StartServers 64\nMinSpareServers 64\nMaxSpareServers 128\n"
        } else {
            // Threads for all of wrk's connections from the start: a child
            // stopped for spare threads closes its keep-alive connections,
            // which wrk counts as read errors (directly as well, at this
            // rate).
            "StartServers 2\nServerLimit 4\nThreadsPerChild 64\nMaxRequestWorkers 256\n\
             MinSpareThreads 32\nMaxSpareThreads 256\n"
        },
    );
    std::fs::write(d.join("httpd.conf"), conf).unwrap();
    let server = Proc::spawn(&mut sockets.command(
        &d.join("summary"),
        &[
            "apache2",
            "-f",
            d.join("httpd.conf").to_str().unwrap(),
            "-DFOREGROUND",
        ],
    ));
    let name = format!("apache2 ({mpm}, {})", sockets.label());
    serve_and_check(&name, d, port, server, sockets);
}

#[test]
fn apache_prefork_serves_through_saps_relayed() {
    apache("prefork", Sockets::Relayed);
}

#[test]
fn apache_event_serves_through_saps_zero_relay() {
    apache("event", Sockets::ZeroRelay);
}

/// apache2 sets `TCP_CORK` on and off around every response: with virtual
/// sockets both calls trap (docs/interceptor.md, "Native sockets").
#[test]
fn apache_event_serves_through_saps_native_sockets() {
    apache("event", Sockets::Native);
}

//! A cluster as an operator deploys it, on the SAPS paper's testbed made of
//! network namespaces (`scripts/netns-cluster`): the io-server in the
//! gateway's namespace owns the single address 203.0.113.10 and takes its
//! nodes over `tcp://` on the LAN; three application nodes join from
//! namespaces of their own, each `saps-run` running as the unprivileged
//! user `nobody`; clients sit behind the router. The nodes have no route
//! beyond the LAN: they reach clients only through the io-server.

use saps_tests::*;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const ADDRESS: &str = "203.0.113.10";
const FABRIC: &str = "tcp://192.0.2.2:7100";
const NOBODY: u32 = 65534;

/// One testbed, its io-server and a directory `nobody` can read; torn down
/// when dropped.
struct Cluster {
    name: String,
    dir: tempfile::TempDir,
    io: Option<Proc>,
}

impl Cluster {
    /// Makes the namespaces (three nodes, two clients) and starts the
    /// io-server in the gateway's; `None` (with a printed reason, or a
    /// failure under CI) where namespaces cannot be made.
    fn up() -> Option<Cluster> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "k{:x}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let o = run(Command::new(script()).args([
            "up",
            &name,
            "--nodes",
            "3",
            "--clients",
            "2",
            "--rate",
            "1gbit",
        ]));
        if !o.status.success() {
            cannot_run(&format!(
                "cannot make the namespace cluster: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            name,
            dir,
            io: None,
        };
        // `nobody` must reach the binaries, the token and the served files.
        chmod(c.d(), 0o755);
        std::fs::create_dir(c.d().join("bin")).unwrap();
        std::fs::copy(bin("saps-run"), c.saps_run()).unwrap();
        chmod(&c.saps_run(), 0o755);
        write_token(&c.d().join("token"), "cluster secret\n");
        write_token(&c.d().join("node-token"), "cluster secret\n");
        std::os::unix::fs::chown(c.d().join("node-token"), Some(NOBODY), Some(NOBODY)).unwrap();

        let d = c.d().to_path_buf();
        c.io = Some(start_io_server(
            c.exec("gw", &bin("io-server")),
            &d,
            FABRIC,
            ADDRESS,
        ));
        Some(c)
    }

    fn d(&self) -> &Path {
        self.dir.path()
    }

    fn saps_run(&self) -> PathBuf {
        self.d().join("bin/saps-run")
    }

    fn io_stderr(&self) -> String {
        self.io.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// `PROGRAM` run in host namespace `host` (gw, rt, n1…, c1…) as root.
    fn exec(&self, host: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-{host}", self.name)])
            .arg(program);
        c
    }

    /// `saps-run --io-server FABRIC --node HOST -- PROGRAM…` in node
    /// namespace `host`, as `nobody`, in `cwd`.
    fn node(&self, host: &str, cwd: &Path, program: &[&str]) -> Proc {
        let mut c = self.exec(host, Path::new("setpriv"));
        c.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(self.saps_run())
        .args([
            "--io-server",
            FABRIC,
            "--token-file",
            self.d().join("node-token").to_str().unwrap(),
            "--node",
            host,
            "--",
        ])
        .args(program)
        .current_dir(cwd);
        Proc::spawn(&mut c)
    }

    /// A directory of node `host`'s own, owned by `nobody`, holding `who`
    /// = "node HOST".
    fn www(&self, host: &str) -> PathBuf {
        let www = self.d().join(format!("www-{host}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("who"), format!("node {host}\n")).unwrap();
        std::os::unix::fs::chown(&www, Some(NOBODY), Some(NOBODY)).unwrap();
        www
    }

    /// `python3 -m http.server PORT` on node `host`.
    fn python_node(&self, host: &str, port: u16) -> Proc {
        let www = self.www(host);
        self.node(
            host,
            &www,
            &[PYTHON, "-m", "http.server", &port.to_string()],
        )
    }

    /// GET `path` on the single address from client namespace `client`:
    /// the body, or `None` when the request failed.
    fn get(&self, client: &str, port: u16, path: &str) -> Option<String> {
        let o = run(self.exec(client, Path::new("curl")).args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://{ADDRESS}:{port}{path}"),
        ]));
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    fn status(&self) -> String {
        io_server_status(self.d())
            .unwrap_or_else(|| panic!("io-server status failed: {}", self.io_stderr()))
    }

    /// Waits until every node of `hosts` has answered `/who` on `port`.
    fn wait_served_by(&self, port: u16, hosts: &[&str]) {
        let mut seen = std::collections::HashSet::new();
        let all = wait_for(Duration::from_secs(60), || {
            if let Some(who) = self.get("c1", port, "/who") {
                seen.insert(who);
            }
            hosts
                .iter()
                .all(|h| seen.contains(&format!("node {h}")))
                .then_some(())
        });
        assert!(
            all.is_some(),
            "not every node of {hosts:?} served port {port} (saw {seen:?}):\n{}\n{}",
            self.status(),
            self.io_stderr()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The processes first (their namespaces go with them), then the
        // namespaces.
        drop(self.io.take());
        let _ = run(Command::new(script()).args(["down", &self.name]));
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns-cluster")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// How many of `bodies` each node served.
fn tally(bodies: &[String]) -> HashMap<String, usize> {
    let mut t = HashMap::new();
    for b in bodies {
        *t.entry(b.clone()).or_default() += 1;
    }
    t
}

#[test]
fn unprivileged_python_nodes_share_the_single_address_and_see_real_clients() {
    let Some(c) = Cluster::up() else { return };
    let port = 8080;
    let nodes: Vec<Proc> = ["n1", "n2", "n3"]
        .iter()
        .map(|h| c.python_node(h, port))
        .collect();
    c.wait_served_by(port, &["n1", "n2", "n3"]);

    // Round robin over three members: nine clients, three each.
    let bodies: Vec<String> = (0..9)
        .map(|i| {
            c.get(if i % 2 == 0 { "c1" } else { "c2" }, port, "/who")
                .expect("a request through the single address failed")
        })
        .collect();
    let t = tally(&bodies);
    for h in ["n1", "n2", "n3"] {
        assert_eq!(t.get(&format!("node {h}")), Some(&3), "{t:?}");
    }

    // Each program logged its clients' real addresses, not the gateway's.
    for (h, p) in ["n1", "n2", "n3"].iter().zip(&nodes) {
        let log = p.stderr();
        assert!(
            log.contains("198.51.100.11 - -") && log.contains("198.51.100.12 - -"),
            "node {h} did not see both clients' addresses:\n{log}"
        );
        assert!(
            !log.contains("192.0.2."),
            "node {h} saw a LAN address:\n{log}"
        );
    }
}

#[test]
fn unprivileged_nginx_nodes_serve_clients_behind_the_router() {
    if !have("nginx") {
        return;
    }
    let Some(c) = Cluster::up() else { return };
    let port = 8081;
    let mut nodes = Vec::new();
    for h in ["n1", "n2", "n3"] {
        let www = c.www(h);
        let w = www.display();
        let conf = format!(
            "daemon off; master_process on; worker_processes 1;\n\
             pid {w}/nginx.pid; error_log {w}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{ log_format peer '$remote_addr $request'; access_log {w}/access.log peer;\n\
               client_body_temp_path {w}/body; proxy_temp_path {w}/proxy;\n\
               fastcgi_temp_path {w}/fastcgi; uwsgi_temp_path {w}/uwsgi; scgi_temp_path {w}/scgi;\n\
               server {{ listen {port}; root {w}; }} }}\n"
        );
        std::fs::write(www.join("nginx.conf"), conf).unwrap();
        let conf = www.join("nginx.conf");
        nodes.push(c.node(
            h,
            &www,
            &[
                "nginx",
                "-p",
                &w.to_string(),
                "-c",
                conf.to_str().unwrap(),
                "-e",
                "stderr",
            ],
        ));
    }
    c.wait_served_by(port, &["n1", "n2", "n3"]);
    let bodies: Vec<String> = (0..6)
        .map(|_| c.get("c2", port, "/who").expect("a request failed"))
        .collect();
    let t = tally(&bodies);
    for h in ["n1", "n2", "n3"] {
        assert_eq!(t.get(&format!("node {h}")), Some(&2), "{t:?}");
        let log = std::fs::read_to_string(c.d().join(format!("www-{h}/access.log"))).unwrap();
        assert!(
            log.lines().any(|l| l.starts_with("198.51.100.12 GET /who")),
            "nginx on {h} did not log the client's address:\n{log}"
        );
    }
}

#[test]
fn a_nodes_outbound_connect_reaches_the_client_network_from_the_single_address() {
    let Some(c) = Cluster::up() else { return };
    // A server on client c1 that prints its first peer's address.
    let server = Proc::spawn(c.exec("c1", Path::new(PYTHON)).args([
        "-c",
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('198.51.100.11', 9100)); s.listen(); s.settimeout(60)\n\
         print('listening', flush=True)\n\
         c, a = s.accept(); c.sendall(b'seen ' + a[0].encode()); c.close()\n\
         print('peer', a[0], flush=True)",
    ]));
    assert!(
        wait_for(Duration::from_secs(20), || server
            .stdout()
            .contains("listening")
            .then_some(()))
        .is_some(),
        "the client-side server did not start: {}",
        server.stderr()
    );
    // The node itself has no route there.
    let direct = run(c.exec("n1", Path::new(PYTHON)).args([
        "-c",
        "import socket; socket.create_connection(('198.51.100.11', 9100), timeout=3)",
    ]));
    assert!(
        String::from_utf8_lossy(&direct.stderr).contains("Network is unreachable"),
        "node n1 reached the client network without SAPS: {direct:?}"
    );
    let www = c.www("n1");
    let mut client = c.node(
        "n1",
        &www,
        &[
            PYTHON,
            "-c",
            "import socket\n\
             s = socket.create_connection(('198.51.100.11', 9100), timeout=20)\n\
             print(s.recv(100).decode(), flush=True)",
        ],
    );
    let code = client.wait_timeout(Duration::from_secs(60));
    assert_eq!(code, Some(0), "outbound client failed: {}", client.stderr());
    assert_eq!(client.stdout().trim(), format!("seen {ADDRESS}"));
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || server
            .stdout()
            .contains("peer")
            .then_some(()))
        .is_some(),
        "server did not report its peer after {:?}",
        started.elapsed()
    );
    assert!(
        server.stdout().contains(&format!("peer {ADDRESS}")),
        "{}",
        server.stdout()
    );
}

#[test]
fn a_node_killed_under_load_leaves_its_clients_to_the_others() {
    let Some(c) = Cluster::up() else { return };
    let port = 8082;
    let nodes: Vec<Proc> = ["n1", "n2", "n3"]
        .iter()
        .map(|h| c.python_node(h, port))
        .collect();
    c.wait_served_by(port, &["n1", "n2", "n3"]);

    std::thread::scope(|s| {
        // Load from both clients while n2 is killed: bounded in count and
        // time.
        let load = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut served = 0;
            for i in 0..200 {
                if Instant::now() > deadline {
                    break;
                }
                served += usize::from(
                    c.get(if i % 2 == 0 { "c1" } else { "c2" }, port, "/who")
                        .is_some(),
                );
            }
            served
        });
        nodes[1].signal(libc::SIGKILL);
        let gone = wait_for(Duration::from_secs(20), || {
            (!c.status()
                .lines()
                .any(|l| l.split_whitespace().next() == Some("n2")))
            .then_some(())
        });
        assert!(gone.is_some(), "n2 still listed:\n{}", c.status());
        assert!(load.join().unwrap() > 0, "the load served nothing");
    });

    // Every later client is served, by n1 and n3 only.
    let bodies: Vec<String> = (0..10)
        .map(|_| {
            c.get("c1", port, "/who")
                .expect("a client after the kill failed")
        })
        .collect();
    let t = tally(&bodies);
    assert_eq!(t.get("node n1"), Some(&5), "{t:?}");
    assert_eq!(t.get("node n3"), Some(&5), "{t:?}");
}

"""Issue 19's rows: `io-server upgrade` under load, for bench/run's
"upgrade" section (the scenario of tests/tests/upgrade_load.rs, shorter,
on the release binaries).

One io-server daemon (a `unix:` and a `tcp://` fabric, control socket,
metrics) serves two nodes: `r`, joined over `tcp://` and relayed, and `z`,
joined over `unix:` and zero-relay (it takes its clients' sockets through
the `.handoff` socket). Each node runs nginx (the bench's 1 KiB file), two
`iperf3 -s` (one for each direction) and an echo server. Idle connections
(10 000 in all, half to each node's echo server, fewer where the
descriptor limit leaves less room) are opened first and echo once.

Then, in the same run, phases of equal length, each with the same load on
both nodes at once: wrk c8 keep-alive on the 1 KiB file, an iperf3 stream
each way, a verified stream (a seeded pseudo-random sequence sent to the
echo server and checked octet by octet as it comes back) and a 1-byte
ping-pong recording the longest time between two answers. Phases without
upgrades ("steady") and with `UPGRADES` runs of `io-server upgrade` spread
over the phase alternate (steady, upgrades, upgrades, steady; `--quick`:
one of each). After the last every idle connection echoes once more. Only
the ratios of the two kinds of phase mean anything (the machine is
shared).

An upgrade refused is reported with its reason and the phase goes on
without further upgrades.

Run as a program: `upgrade.py probe PORT SECS` is the ping-pong, `upgrade.py verify PORT SECS
SEED` the verified stream; each prints one JSON object. The echo
server is `echo_server.py PORT`.
"""

import json
import os
import random
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

from fmt import num, spread

UPGRADES = 10
IDLE = 10000
# The verified stream's pace: it shares the echo server with the
# ping-pong and the idle connections, and the CPUs with everything else.
VERIFIED_BYTES_PER_SECOND = 16 << 20
NODES = [("r", False), ("z", True)]
BEGIN = "<!-- bench/run upgrade:begin -->"
END = "<!-- bench/run upgrade:end -->"


# ---------------------------------------------------------------- programs

def _connect(port):
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _why(e):
    if isinstance(e, ConnectionResetError):
        return f"reset ({e})"
    return str(e) or type(e).__name__


def probe(port, secs):
    """One byte back and forth for `secs`: the longest gap between answers."""
    longest, n, err = 0.0, 0, None
    try:
        with _connect(port) as c:
            end = time.monotonic() + secs
            last = time.monotonic()
            while time.monotonic() < end:
                c.sendall(bytes([n % 256]))
                got = c.recv(1)
                if not got:
                    raise EOFError(f"early EOF after {n} answers")
                if got[0] != n % 256:
                    raise ValueError(f"answer {n} was {got[0]}")
                now = time.monotonic()
                longest = max(longest, now - last)
                last = now
                n += 1
    except (OSError, EOFError, ValueError) as e:
        err = _why(e)
    return {"longest_ms": longest * 1e3, "round_trips": n, "error": err}


def verify(port, secs, seed):
    """Sends the sequence seeded with `seed` for `secs`, then ends its
    side; checks every octet that comes back: the octets checked."""
    out = {"octets": 0, "sent": 0, "error": None}
    try:
        c = _connect(port)
    except OSError as e:
        out["error"] = _why(e)
        return out

    def send():
        rng = random.Random(seed)
        start = time.monotonic()
        try:
            while time.monotonic() - start < secs:
                c.sendall(rng.randbytes(1 << 16))
                out["sent"] += 1 << 16
                ahead = out["sent"] / VERIFIED_BYTES_PER_SECOND - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)  # the pace
            c.shutdown(socket.SHUT_WR)
        except OSError as e:
            out["error"] = f"sending: {_why(e)}"

    t = threading.Thread(target=send)
    t.start()
    rng = random.Random(seed)
    want = bytearray()
    try:
        while True:
            got = c.recv(1 << 16)
            if not got:
                break
            while len(want) < len(got):
                want += rng.randbytes(1 << 16)
            if got != want[:len(got)]:
                at = next(i for i in range(len(got)) if got[i] != want[i])
                raise ValueError(f"octet {out['octets'] + at} differs")
            del want[:len(got)]
            out["octets"] += len(got)
    except (OSError, ValueError) as e:
        out["error"] = out["error"] or _why(e)
    t.join()
    c.close()
    if not out["error"] and out["octets"] != out["sent"]:
        out["error"] = f"early EOF: {out['octets']} of {out['sent']} octets came back"
    return out


# ---------------------------------------------------------------- the setup

class Gateway:
    """The io-server daemon and what `io-server upgrade` needs: its
    settings (the same for every upgrade) and the pid serving now."""

    def __init__(self, r, d):
        import bench
        self.r, self.d = r, d
        tcp, self.metrics = bench.free_ports(2)
        self.unix = f"unix:{d}/fabric.sock"
        self.tcp = f"tcp://127.0.0.1:{tcp}"
        self.control = os.path.join(d, "control.sock")
        self.args = ["--fabric", self.unix, "--fabric", self.tcp, "--address", "127.0.0.1",
                     "--token-file", r.b.token, "--control", self.control,
                     "--metrics", f"127.0.0.1:{self.metrics}", "--scheduler", "rr"]
        self.pid = None
        self.logs = []

    def upgrade(self, k):
        """`io-server upgrade` (its standard error, and the new process's
        log, in a file of its own): (new pid, None) or (None, why not)."""
        log = os.path.join(self.d, f"upgrade-{k}.log")
        self.logs.append(log)
        with open(log, "wb") as err:
            try:
                p = subprocess.run([self.r.b.io_server, *self.args, "upgrade"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=err, timeout=90, start_new_session=True)
            except subprocess.TimeoutExpired:
                return None, "`io-server upgrade` did not end within 90 s"
        out = p.stdout.decode(errors="replace")
        m = re.search(r"pid (\d+) took over from pid (\d+) \(upgrade (\d+)\)", out)
        if p.returncode != 0 or not m:
            with open(log, errors="replace") as f:
                lines = [ln for ln in f.read().splitlines() if "error" in ln] or [out]
            return None, lines[-1].strip()[:300]
        self.pid = int(m.group(1))
        return self.pid, None

    def metric(self, name):
        import bench
        text = bench.http_get(f"http://127.0.0.1:{self.metrics}/metrics") or b""
        m = re.search(rf"^{name} (\d+)$", text.decode(errors="replace"), re.M)
        return int(m.group(1)) if m else None

    def nodes(self):
        """The nodes `io-server status` lists, as "name (id)"."""
        out = subprocess.run([self.r.b.io_server, "status", "--control", self.control],
                             capture_output=True, text=True, timeout=30).stdout
        listed = out.split("\nNodes\n", 1)[1] if "\nNodes\n" in out else ""
        found = []
        for line in listed.splitlines():
            if not line.strip():
                break
            m = re.match(r"\s*(\S+) \((\d+)\)", line)
            if m:
                found.append(f"{m.group(1)} ({m.group(2)})")
        return found

    def stop(self):
        """The daemon an upgrade started is no child of the bench's: end it
        and what it started."""
        import bench
        if self.pid is None:
            return
        victims = {self.pid} | bench.descendants(self.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in victims:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(bench.alive(p) for p in victims):
                time.sleep(0.05)


def start(r):
    """The daemon and both nodes, once every port of both answers."""
    import bench
    b = r.b
    s = bench.Setup({})
    d = b.dir("upgrade")
    gw = Gateway(r, d)
    s.gw = gw
    s.nodes_ports = {}
    try:
        io = b.spawn(s, "io-server", [b.io_server, *gw.args])
        gw.io_log = os.path.join(b.work, f"{b.n:02}-io-server.log")
        s.gateway.append(io.pid)
        bench.wait_until("io-server control socket", 30,
                         lambda: os.path.exists(gw.control), b.procs, io)
        here = os.path.abspath(__file__)
        for name, zero_relay in NODES:
            ports = dict(zip(("http", "fwd", "rev", "echo"), bench.free_ports(4)))
            nd = os.path.join(d, name)
            os.makedirs(nd)
            www = bench.make_site(nd, name)
            cmds = [bench.nginx_argv(nd, ports["http"], 1),
                    ["iperf3", "-s", "-p", str(ports["fwd"])],
                    ["iperf3", "-s", "-p", str(ports["rev"])],
                    [sys.executable, os.path.join(os.path.dirname(here), "echo_server.py"),
                     str(ports["echo"])]]
            script = " & ".join(shlex.join(c) for c in cmds) + " & wait"
            node = b.spawn(s, f"node-{name}", [
                b.saps_run, "--io-server", gw.unix if zero_relay else gw.tcp,
                "--token-file", b.token, "--node", name,
                "--zero-relay", "on" if zero_relay else "off", "--", "sh", "-c", script],
                cwd=www)
            s.nodes.append(node.pid)
            bench.wait_until(f"node {name}: nginx", 30,
                             lambda p=ports: bench.http_get(
                                 f"http://127.0.0.1:{p['http']}/1k.bin"), b.procs, node)
            for k in ("fwd", "rev", "echo"):
                bench.wait_until(f"node {name}: port {k}", 30,
                                 lambda k=k, p=ports: bench.listening(p[k]), b.procs, node)
            s.nodes_ports[name] = ports
    except BaseException:
        gw.stop()
        b.procs.stop(s.procs)
        raise
    return s


# ---------------------------------------------------------------- the load

def echo_round(conns, rnd):
    """Each connection sends its message of round `rnd`, then reads it
    back, 250 at a time: the errors."""
    import bench
    errors = []
    for b in range(0, len(conns), 250):
        batch = conns[b:b + 250]
        msgs = [(b + j).to_bytes(4, "big") + rnd.to_bytes(4, "big") for j in range(len(batch))]
        for c, m in zip(batch, msgs):
            try:
                c.sendall(m)
            except OSError as e:
                errors.append(_why(e))
        for c, m in zip(batch, msgs):
            try:
                got = bench.recv_exact(c, 8)
                if got != m:
                    errors.append(f"echoed {got!r}")
            except (OSError, EOFError) as e:
                errors.append(_why(e))
    return errors


def open_idle(port, n):
    conns = []
    for _ in range(n):
        conns.append(_connect(port))
    errors = echo_round(conns, 0)
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} idle connections did not echo: {errors[0]}")
    return conns


def phase(r, s, secs, upgrades, label):
    """Both nodes' load for `secs`, with `upgrades` upgrades spread over
    it: per node its figures; the upgrades done and the first refusal."""
    import bench
    here = os.path.abspath(__file__)
    results = {name: {} for name, _ in NODES}
    threads = []

    def keep(name, key, f):
        def body():
            results[name][key] = r.attempt(f"upgrade, node {name}", key, f)
        t = threading.Thread(target=body)
        t.start()
        threads.append(t)

    def iperf(port, reverse):
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(secs), "-J"]
        out = subprocess.run(argv + (["-R"] if reverse else []), capture_output=True,
                             text=True, timeout=secs + 60).stdout
        rep = json.loads(out)
        if "error" in rep:
            raise RuntimeError(f"iperf3: {rep['error']}")
        end = rep["end"]
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "sent": end["sum_sent"]["bytes"], "received": end["sum_received"]["bytes"]}

    def program(*args):
        out = subprocess.run([sys.executable, here, *map(str, args)], capture_output=True,
                             text=True, timeout=secs + 90).stdout
        return json.loads(out)

    for i, (name, _) in enumerate(NODES):
        p = s.nodes_ports[name]
        keep(name, "wrk", lambda p=p: bench.wrk(f"http://127.0.0.1:{p['http']}/1k.bin", 8, secs))
        keep(name, "fwd", lambda p=p: iperf(p["fwd"], False))
        keep(name, "rev", lambda p=p: iperf(p["rev"], True))
        keep(name, "probe", lambda p=p: program("probe", p["echo"], secs))
        keep(name, "verify", lambda p=p, i=i: program("verify", p["echo"], secs, 0x5eed + i))
    started = time.monotonic()
    done, refused, times = 0, None, []
    for k in range(1, upgrades + 1):
        due = started + secs * k / (upgrades + 2)
        time.sleep(max(0, due - time.monotonic()))  # the schedule
        t0 = time.monotonic()
        pid, why = s.gw.upgrade(f"{label}-{k}")
        if pid is None:
            refused = why
            bench.log(f"  upgrade {k} refused: {why}")
            break
        times.append(time.monotonic() - t0)
        done += 1
    for t in threads:
        t.join()
    return {"nodes": results, "done": done, "refused": refused, "command_s": times}


AUTOGROUP = "/proc/sys/kernel/sched_autogroup_enabled"


def autogroups_off():
    """Turns the kernel's session autogroups off where they are on and
    this may (root): under this load, on one host, they left the
    io-server runnable and not run for seconds (the notes of
    2026-12-03-upgrade-load.md). The value to put back, or None."""
    try:
        with open(AUTOGROUP) as f:
            was = f.read().strip()
        if was != "1":
            return None
        with open(AUTOGROUP, "w") as f:
            f.write("0")
        return was
    except OSError:
        return None


def autogroups_back(was):
    if was is not None:
        try:
            with open(AUTOGROUP, "w") as f:
                f.write(was)
        except OSError:
            pass


def run(r, quick):
    """The phases in one setup, alternated (steady, with upgrades, with
    upgrades, steady; `quick`: one of each): {"steady": [...],
    "upgraded": [...], ...}, or a reason the section could not run."""
    import bench
    missing = [p for p in ("nginx", "wrk", "iperf3") if not bench.have(p)]
    if missing:
        return {"skipped": f"missing {' '.join(missing)}"}
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle = min(IDLE, (soft - 1024) // 1000 * 1000)
    secs = 10 if quick else 20
    order = ["steady", "upgraded"] if quick else ["steady", "upgraded", "upgraded", "steady"]
    label = "upgrade"
    was = autogroups_off()
    s = r.attempt(label, "start", lambda: start(r))
    if s is None:
        autogroups_back(was)
        return {"skipped": "the setup did not start (see the errors)"}
    out = {"skipped": None, "secs": secs, "idle": idle, "upgrades": UPGRADES,
           "steady": [], "upgraded": [], "autogroups_off": was is not None}
    held = {}
    try:
        for name, _ in NODES:
            held[name] = r.attempt(label, f"node {name}: {idle // 2} idle connections",
                                   lambda n=name: open_idle(s.nodes_ports[n]["echo"],
                                                            idle // 2), [])
        out["io_fds"] = len(os.listdir(f"/proc/{s.gateway[0]}/fd"))
        out["nodes_before"] = s.gw.nodes()
        for i, kind in enumerate(order):
            n = UPGRADES if kind == "upgraded" else 0
            bench.log(f"upgrade: phase {i + 1} of {len(order)}, {secs} s, {n} upgrades ...")
            out[kind].append(phase(r, s, secs, n, f"{i + 1}"))
        out["idle_echoed"] = {n: (len(c) - len(echo_round(c, 1)), len(c))
                              for n, c in held.items()}
        out["counted"] = s.gw.metric("saps_upgrades_total")
        out["nodes_after"] = s.gw.nodes()
        pauses = []
        for path in [s.gw.io_log, *s.gw.logs]:
            try:
                with open(path, errors="replace") as f:
                    pauses += [int(x) for x in re.findall(r"paused_ms=(\d+)", f.read())]
            except OSError:
                pass
        out["logged_pauses_ms"] = pauses
    finally:
        for conns in held.values():
            for c in conns:
                c.close()
        s.gw.stop()
        r.b.procs.stop(s.procs)
        autogroups_back(was)
    return out


# ---------------------------------------------------------------- report

def table(out, result, load):
    out.append("\n#### Upgrade in place under load (issue 19)\n")
    if result.get("skipped"):
        out.append(f"Skipped: {result['skipped']}.\n")
        return
    steady, upgraded = result["steady"], result["upgraded"]
    if not steady or not upgraded:
        out.append("Not measured (see the errors).\n")
        return
    rounds = len(steady)
    out.append(
        "io-server (a `unix:` and a `tcp://` fabric) with node `r` joined over "
        "`tcp://`, relayed, and node `z` joined over `unix:`, zero-relay; each runs "
        "nginx (1 KiB file), two `iperf3 -s` and an echo server; "
        f"{num(result['idle'], 0)} idle connections held, half to each node. Phases of "
        f"{result['secs']} s in one run, the same load on both nodes at once: wrk -t2 "
        "-c8 keep-alive, an iperf3 stream each way (unpaced), a verified stream (a seeded "
        "sequence through the echo server and back, checked octet by octet), a 1-byte "
        "ping-pong (the longest gap between two answers). Phases without upgrades "
        f"(steady) and with {result['upgrades']} `io-server upgrade` spread over the "
        f"phase, {rounds} of each"
        + (", alternated (steady, upgrades, upgrades, steady); cells give the median "
           "and the range" if rounds > 1 else "")
        + f". Load average {load} at the end.\n")

    def values(phases, name, get):
        v = []
        for ph in phases:
            try:
                v.append(get(ph["nodes"][name]))
            except (KeyError, TypeError):
                pass
        return v

    # (row, figure, decimals, whether a ratio means something)
    rows = [("wrk c8 keep-alive req/s", lambda n: n["wrk"]["rps"], 0, True),
            ("wrk p99 ms", lambda n: n["wrk"]["p99"], 2, True),
            ("wrk socket errors and non-2xx", lambda n: n["wrk"]["errors"], 0, False),
            ("longest pause, ping-pong ms", lambda n: n["probe"]["longest_ms"], 1, True),
            ("iperf3 forward Gbit/s", lambda n: n["fwd"]["gbps"], 2, True),
            ("iperf3 reverse Gbit/s", lambda n: n["rev"]["gbps"], 2, True),
            ("MiB verified, each way", lambda n: n["verify"]["octets"] / 2**20, 1, False)]
    head = "| row |"
    for name, zr in NODES:
        kind = "zero-relay" if zr else "relayed"
        head += f" `{name}` ({kind}) steady | with upgrades | ratio |"
    text = head + "\n|---|" + "---:|" * 3 * len(NODES) + "\n"
    for what, get, dec, ratios in rows:
        text += f"| {what} |"
        for name, _ in NODES:
            a = [x for x in values(steady, name, get) if x is not None]
            b = [x for x in values(upgraded, name, get) if x is not None]
            ratio = (f"{statistics.median(b) / statistics.median(a):.2f}×"
                     if ratios and a and b and statistics.median(a) else "–")
            text += f" {spread(a, dec)} | {spread(b, dec)} | {ratio} |"
        text += "\n"
    out.append(text)
    done = sum(ph["done"] for ph in upgraded)
    refused = sorted({ph["refused"] for ph in upgraded if ph["refused"]})
    notes = [f"Upgrades done: {done} of {result['upgrades'] * len(upgraded)}"
             + (f" (refused: {'; '.join(refused)})" if refused else "")
             + f"; `saps_upgrades_total` {result.get('counted')}."]
    took = [t for ph in upgraded for t in ph["command_s"]]
    if took:
        notes.append(f"`io-server upgrade` took {num(min(took), 2)}–{num(max(took), 2)} s.")
    pauses = result.get("logged_pauses_ms") or []
    if pauses:
        notes.append(f"The io-server's own pauses as it logs them (`paused_ms`): "
                     f"{num(min(pauses), 0)}–{num(max(pauses), 0)} ms.")
    for name, (ok, n) in result.get("idle_echoed", {}).items():
        notes.append(f"Node `{name}`: {num(ok, 0)} of {num(n, 0)} idle connections "
                     "echoed after the last phase.")
    before, after = result.get("nodes_before"), result.get("nodes_after")
    if before is not None:
        kept = "the same" if before == after else f"now {', '.join(after or []) or 'none'}"
        notes.append(f"Nodes (id) before the first phase: {', '.join(before)}; after the "
                     f"last: {kept}.")
    if result.get("autogroups_off"):
        notes.append("The kernel's session autogroups were off for the run "
                     "(`kernel.sched_autogroup_enabled` 0, put back after): on one host "
                     "with all the load they starve the io-server for seconds "
                     "(docs/io-server.md, Known limits).")
    if result.get("io_fds"):
        notes.append(f"The io-server held {num(result['io_fds'], 0)} descriptors with the "
                     "idle connections open.")
    bad, short = [], []
    for label, phases in (("steady", steady), ("with upgrades", upgraded)):
        for ph in phases:
            for name, _ in NODES:
                n = ph["nodes"][name]
                for way in ("fwd", "rev"):
                    ip = n.get(way)
                    if ip and ip["sent"]:
                        short.append(1 - ip["received"] / ip["sent"])
                for key in ("probe", "verify"):
                    if n.get(key) and n[key].get("error"):
                        bad.append(f"{label}, `{name}`, {key}: {n[key]['error']}")
    if short:
        notes.append(f"iperf3's receiver counted {min(short):.2%}–{max(short):.2%} fewer octets "
                     "than its sender: unpaced, it stops counting with octets still in "
                     "flight, without SAPS too (the test paces its streams and requires the "
                     "counts equal to within one iperf3 block); the verified stream is the "
                     "check of every octet.")
    out.append(" ".join(notes) + "\n")
    if bad:
        out.append("Seen by the clients:\n")
        out.append("".join(f"* {b}\n" for b in bad))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        print(json.dumps(probe(int(sys.argv[2]), float(sys.argv[3]))))
    elif len(sys.argv) == 5 and sys.argv[1] == "verify":
        print(json.dumps(verify(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))
    else:
        print("usage: upgrade.py probe PORT SECS | verify PORT SECS SEED",
              file=sys.stderr)
        sys.exit(2)

#!/usr/bin/env python3
"""Trapped calls per request (issue 23): a server under
`saps-run --trace -c` (embedded io-server, saps-run's defaults: native
sockets; with --virtual, `--address 127.0.0.1`: virtual sockets) and a
short wrk load, then the summary's counts divided by the requests served.

usage: bench/traps.py [--bin-dir DIR] [--secs N] [--close] [--virtual] apache|python|nginx
(docs/benchmarks.md, "Trapped calls per request"). Needs wrk and the server.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402 - the bench's own helpers and server configurations


def program(app, d, www, port):
    if app == "apache":
        return bench.apache_argv(d, port)
    if app == "python":
        return [sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
                "--directory", www, str(port)]
    return bench.nginx_argv(d, port, 2)


def counts(summary):
    """`{syscall: calls}` from saps-run's strace -c table."""
    rows = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", summary, re.M)
    return {name: int(calls) for calls, name in rows if name != "total"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("app", choices=("apache", "python", "nginx"))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "target"))
    ap.add_argument("--bin-dir", default=os.path.join(target, "release"))
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--close", action="store_true", help="wrk sends Connection: close")
    ap.add_argument("--virtual", action="store_true",
                    help="virtual sockets (an --address makes them so in every build)")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix=f"saps-traps-{args.app}-")
    os.chmod(d, 0o755)
    www = bench.make_site(d, "a")
    port = bench.free_ports(1)[0]
    out = os.path.join(d, "summary")
    virtual = ["--address", "127.0.0.1"] if args.virtual else []
    argv = [os.path.join(args.bin_dir, "saps-run"), *virtual,
            "--trace", "-c", "-o", out, "--", *program(args.app, d, www, port)]
    p = subprocess.Popen(argv, cwd=www, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/1k.bin"
        bench.wait_until("the server", 30, lambda: bench.http_get(url) is not None)
        # python's http.server listens with a backlog of 5 (bench.py's c10).
        conns = 10 if args.app == "python" else 50
        r = bench.wrk(url, conns, args.secs, args.close)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    with open(out) as f:
        text = f.read()
    shutil.rmtree(d, ignore_errors=True)
    calls = counts(text)
    n = r["requests"]
    load = "Connection: close" if args.close else "keep-alive"
    print(f"{args.app}, wrk c{conns} {load} {args.secs} s: {n} requests "
          f"(and the warm-up's one)")
    for name, c in sorted(calls.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12} {c:8}  {c / max(n, 1):6.2f} per request")
    print(f"  {'all':12} {sum(calls.values()):8}  {sum(calls.values()) / max(n, 1):6.2f} per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())

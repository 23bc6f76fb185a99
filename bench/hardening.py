"""The cost of issue 24's bookkeeping, for bench/run's "hardening" row.

The io-server + 1 node (unix fabric, relayed, nginx) with its bounds and
timeouts at their defaults against the same binary with them off
(`OFF_FLAGS`), each started afresh, in alternating pairs (on then off,
then off then on, ...): whatever the machine does meanwhile (builds, the
other tenant of the vCPUs) weighs on both arms alike. Per start one wrk
c50 keep-alive run (requests/s) and one wrk c50 `Connection: close` run
(connections/s) on the 1 KiB file. The figure is the ratio of each pair,
then the median of the pairs' ratios.
"""

import statistics

# io-server flags that turn the per-connection bookkeeping off: the idle
# and half-closed sweeps, the connect timeout. (The admission bounds,
# once merged, add theirs here.)
OFF_FLAGS = ("--client-idle-timeout", "0", "--half-closed-timeout", "0",
             "--connect-timeout", "0")

ON, OFF = "unix-1", "unix-1-off"
KINDS = [(ON, "io-server + 1 node, bounds and timeouts at their defaults"),
         (OFF, "io-server + 1 node, bounds and timeouts off")]


def run(r, wrk, quick):
    """Alternating pairs; `r` is bench.py's Run, `wrk` its wrk()."""
    pairs = []
    for n in range(2 if quick else 6):
        order = KINDS if n % 2 == 0 else KINDS[::-1]
        got = {}
        for kind, label in order:
            def body(s, row, label=label):
                url = f"http://127.0.0.1:{s.ports['http']}/1k.bin"
                for key, close in (("ka", False), ("close", True)):
                    what = f"wrk -c50{' close' if close else ''}"
                    m, cpu, _, calls, _ = r.measured(s, lambda c=close, w=what: r.attempt(
                        label, w, lambda: wrk(url, 50, r.secs, c), {}), syscalls=True)
                    row[key] = m.get("rps")
                    if m.get("requests"):
                        # The io-server's own work per request, which the
                        # scheduling of a shared machine disturbs less.
                        row[f"{key}_cpu"] = cpu / m["requests"] * 1e4
                        if calls is not None:
                            row[f"{key}_sys"] = calls / m["requests"]
            got[kind] = r.served(kind, label, body, app="nginx")
        pairs.append(got)
    return pairs


def ratio(on, off):
    return on / off if on and off else None


def table(out, pairs, load):
    """The pairs, their ratios (on / off) and the medians."""
    out.append("\n#### Hardening cost (issue 24): bounds and timeouts on against off\n")
    out.append("io-server + 1 node over unix, relayed, nginx, 1 KiB file, wrk c50; the "
               "same binary with its bounds and timeouts at their defaults (on) and "
               f"with `{' '.join(OFF_FLAGS)}` (off), started afresh in alternating "
               "pairs. Ratios are on / off within a pair (1.00× is no cost; the "
               f"budget is 0.98×). Load average {load} at the end.\n")
    text = ("| pair | first | keep-alive req/s on | off | ratio "
            "| close conn/s on | off | ratio |\n|---:|---|---:|---:|---:|---:|---:|---:|\n")
    ka, close = [], []
    for i, p in enumerate(pairs):
        on, off = p.get(ON, {}), p.get(OFF, {})
        rk, rc = ratio(on.get("ka"), off.get("ka")), ratio(on.get("close"), off.get("close"))
        ka += [rk] if rk else []
        close += [rc] if rc else []
        first = "on" if i % 2 == 0 else "off"
        f = lambda v: "–" if v is None else f"{v:,.0f}".replace(",", " ")  # noqa: E731
        g = lambda v: "–" if v is None else f"{v:.3f}×"  # noqa: E731
        text += (f"| {i + 1} | {first} | {f(on.get('ka'))} | {f(off.get('ka'))} | {g(rk)} "
                 f"| {f(on.get('close'))} | {f(off.get('close'))} | {g(rc)} |\n")
    med = lambda v: f"**{statistics.median(v):.3f}×**" if v else "–"  # noqa: E731
    text += f"| median | | | | {med(ka)} | | | {med(close)} |\n"
    out.append(text)
    out.append("\nThe io-server's own work per request over the same runs (medians of "
               "all starts of each arm): CPU seconds (utime+stime) per 10k requests, and "
               "system calls per request counted by `perf stat` where it can.\n")
    text = ("| figure | on | off | on / off |\n|---|---:|---:|---:|\n")
    for key, what in (("ka", "keep-alive"), ("close", "Connection: close")):
        for suffix, unit, dec in (("cpu", "CPU s / 10k req", 3), ("sys", "syscalls / req", 2)):
            v = {arm: [p[arm][f"{key}_{suffix}"] for p in pairs
                       if f"{key}_{suffix}" in p.get(arm, {})] for arm in (ON, OFF)}
            if not (v[ON] and v[OFF]):
                continue
            on, off = statistics.median(v[ON]), statistics.median(v[OFF])
            text += f"| {what}, {unit} | {on:.{dec}f} | {off:.{dec}f} | {on / off:.3f}× |\n"
    out.append(text)

#!/usr/bin/env python3
# Latency of one trapped call: run as `saps-run --address 127.0.0.1 -- python3 bench/traplat.py`
# and plainly as `python3 bench/traplat.py` (docs/benchmarks.md, "Trapped-call latency").
import socket, time, sys
N = 20000
s = socket.socket()
s.bind(("0.0.0.0", 0))          # virtual under saps-run: served by the io-server
t = time.perf_counter()
for _ in range(N):
    s.getsockname()
dt = (time.perf_counter() - t) / N * 1e6
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # never trapped
t = time.perf_counter()
for _ in range(N):
    u.getsockname()
du = (time.perf_counter() - t) / N * 1e6
print(f"getsockname: {dt:.2f} us per call on a TCP socket, {du:.2f} us on an untrapped UDP socket")

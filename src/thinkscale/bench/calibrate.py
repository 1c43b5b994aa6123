"""Measure an emulated link the way a rank sees it: TCP round-trip time and one-way throughput.

Run inside two rank namespaces by netem-based benchmarks:
    python -m thinkscale.bench.calibrate server --port P --mb 32
    python -m thinkscale.bench.calibrate client --host 10.231.77.2 --port P --mb 32
The client prints one JSON line `CALIBRATION {...}` with the median RTT of 20 one-byte ping-pongs and
the throughput of sending `mb` MiB (timed until the server acknowledges the last byte).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

PINGS = 20
CHUNK = 1 << 20


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(min(CHUNK, n - len(data)))
        if not part:
            raise ConnectionError("peer closed the connection early")
        data += part
    return bytes(data)


def server(port: int, nbytes: int, timeout_s: float) -> None:
    with socket.create_server(("0.0.0.0", port)) as listener:
        listener.settimeout(timeout_s)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(PINGS):
                conn.sendall(_recv_exact(conn, 1))
            remaining = nbytes
            while remaining:
                part = conn.recv(min(CHUNK, remaining))
                if not part:
                    raise ConnectionError("client closed the connection early")
                remaining -= len(part)
            conn.sendall(b"k")


def client(host: str, port: int, nbytes: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:  # the server may not be listening yet
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            break
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(PINGS):
            t0 = time.perf_counter()
            sock.sendall(b"p")
            _recv_exact(sock, 1)
            rtts.append(time.perf_counter() - t0)
        payload = bytes(CHUNK)
        t0 = time.perf_counter()
        for offset in range(0, nbytes, CHUNK):
            sock.sendall(payload[: min(CHUNK, nbytes - offset)])
        _recv_exact(sock, 1)
        seconds = time.perf_counter() - t0
    return {"rtt_ms": 1000 * statistics.median(rtts), "throughput_gbit_s": nbytes * 8 / seconds / 1e9,
            "bytes": nbytes, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=29600)
    p.add_argument("--mb", type=float, default=32.0)
    p.add_argument("--timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)
    nbytes = int(args.mb * (1 << 20))
    if args.role == "server":
        server(args.port, nbytes, args.timeout_s)
    else:
        if not args.host:
            p.error("client needs --host")
        print("CALIBRATION", json.dumps(client(args.host, args.port, nbytes, args.timeout_s)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

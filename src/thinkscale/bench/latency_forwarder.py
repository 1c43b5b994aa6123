"""A user-space switch between TUN devices that adds one-way latency and paces each downlink.

The kernel on the benchmark machine has no netem, so latency is made here: every rank namespace gets
one TUN device; this process holds the other end of all of them, reads each IP packet a rank sends,
and writes it to the destination rank's TUN device `latency` seconds later (plus the time the
destination's link needs to carry it at `rate`, so N > 2 ranks sending to one rank share its link).
Bandwidth on the way out of each rank is capped by `tc tbf` on its TUN device (set up by netem.py).

Run by netem.Cluster, never by hand:
    python -m thinkscale.bench.latency_forwarder --names d0 d1 --latency-ms 5 --rate-bps 1e9
It creates the TUN devices in its own network namespace, prints READY, and the parent moves them into
the rank namespaces (the open file descriptors stay valid across the move). It exits when its stdin
closes (the parent died or is done), and the devices vanish with it.
"""
from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65535
QUEUE_LIMIT_BYTES = 64 << 20  # per destination; beyond this a packet is dropped, as a full switch port would
READS_PER_WAKEUP = 64  # per device, so one busy sender cannot starve the others


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def schedule(now: float, link_free_at: float, size_bytes: int, rate_bps: float | None,
             latency_s: float) -> tuple[float, float]:
    """When a packet handed over at `now` reaches its destination, and when the destination's link is
    free again: it waits for the link, takes size/rate on it, then travels `latency_s`."""
    start = max(now, link_free_at)
    done = start + (size_bytes * 8 / rate_bps if rate_bps else 0.0)
    return done + latency_s, done


def destination_index(packet: bytes, subnet_prefix: bytes) -> int | None:
    """Rank index of an IPv4 packet's destination 10.a.b.(i+1), None for anything else (IPv6, other
    subnets): only traffic between our own ranks is forwarded."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[16:19] != subnet_prefix:
        return None
    return packet[19] - 1


def forward(fds: list[int], latency_s: float, rate_bps: float | None, subnet_prefix: bytes,
            stop_fd: int) -> dict:
    """The switch loop; returns packet counters when `stop_fd` becomes readable (EOF on stdin)."""
    poller = select.epoll()
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    poller.register(stop_fd, select.EPOLLIN)
    in_flight: list[tuple[float, int, int, bytes]] = []  # (deliver_at, seq, destination, packet)
    link_free_at = [0.0] * len(fds)
    queued_bytes = [0] * len(fds)
    seq = 0
    stats = {"forwarded": 0, "dropped_full": 0, "dropped_foreign": 0}
    while True:
        wait = in_flight[0][0] - time.monotonic() if in_flight else 0.5
        if wait > 0.002:
            events = poller.poll(wait - 0.001)  # epoll rounds up to whole ms
        else:
            if wait > 0:
                time.sleep(wait)  # nanosleep keeps sub-ms latencies close to the target
            events = poller.poll(0)
        for fd, _ in events:
            if fd == stop_fd:
                return stats
            for _ in range(READS_PER_WAKEUP):
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                dst = destination_index(packet, subnet_prefix)
                if dst is None or not 0 <= dst < len(fds):
                    stats["dropped_foreign"] += 1
                    continue
                if queued_bytes[dst] + len(packet) > QUEUE_LIMIT_BYTES:
                    stats["dropped_full"] += 1
                    continue
                deliver_at, link_free_at[dst] = schedule(time.monotonic(), link_free_at[dst], len(packet),
                                                         rate_bps, latency_s)
                queued_bytes[dst] += len(packet)
                heapq.heappush(in_flight, (deliver_at, seq, dst, packet))
                seq += 1
        now = time.monotonic()
        while in_flight and in_flight[0][0] <= now:
            _, _, dst, packet = heapq.heappop(in_flight)
            queued_bytes[dst] -= len(packet)
            try:
                os.write(fds[dst], packet)
                stats["forwarded"] += 1
            except (BlockingIOError, OSError):  # the device is gone or its queue is full: a lost packet
                stats["dropped_full"] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--names", nargs="+", required=True, help="TUN device names, rank order")
    p.add_argument("--latency-ms", type=float, required=True)
    p.add_argument("--rate-bps", type=float, default=0.0, help="downlink pacing; 0 = none")
    p.add_argument("--subnet", required=True, help="first three octets of the rank addresses, e.g. 10.231.77")
    args = p.parse_args(argv)
    fds = [open_tun(name) for name in args.names]
    print("READY", flush=True)
    subnet_prefix = bytes(int(x) for x in args.subnet.split("."))
    stats = forward(fds, args.latency_ms / 1000, args.rate_bps or None, subnet_prefix, sys.stdin.fileno())
    print("STATS", stats, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An emulated cluster on one machine: one network namespace per rank, shaped links, added latency.

    with Cluster(world_size=4, link=Link(rate="1gbit", latency_ms=5)) as cluster:
        cluster.spawn(rank, argv)            # runs argv inside rank's namespace

Topology (every name starts with the cluster's prefix, every address is in 10.231.77.0/24, and nothing
is connected to the host's own network):
- latency 0, 2 ranks: one veth pair between the two rank namespaces;
- latency 0, N > 2 ranks: a bridge namespace with a Linux bridge, one veth pair per rank to it;
- latency > 0: one TUN device per rank namespace, all held by a user-space forwarder process
  (latency_forwarder.py) that delivers each packet `latency_ms` later (the kernel has no netem).
Bandwidth: `tc qdisc ... tbf rate R` on the egress of every link end (each direction of each link is
capped at R); with latency the forwarder paces the downlink to each rank at R.
MTU: one value, Cluster.MTU = 64000, on every device of every path (both veth ends, the bridge and its
ports, the TUN devices). 64000 because the Python forwarder's cost is per packet, so it needs big
packets for throughput (veth and bridges take them too); the same on every path so that cells with and
without latency differ only in latency, not in per-packet work. tbf's burst is computed from it.

`close()` (also run by `with`, on errors and on Ctrl-C) deletes every namespace it made and stops the
forwarder. Needs root: the constructor refuses clearly otherwise.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

SUBNET = "10.231.77"
RATE_UNITS = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3}


class NetemError(RuntimeError):
    """The emulated network could not be built (not root, tools missing, a command failed)."""


def parse_rate(rate: str | None) -> int | None:
    """tc rate string -> bits/s ('1gbit' -> 10**9); None / 'none' -> None (unshaped)."""
    if rate is None or rate == "none":
        return None
    for suffix, mult in RATE_UNITS.items():
        if rate.lower().endswith(suffix):
            number = rate[: -len(suffix)]
            try:
                value = float(number)
            except ValueError:
                break
            if value > 0:
                return int(value * mult)
    raise ValueError(f"bad rate {rate!r}: use 'none' or tc units such as 10gbit, 1gbit, 100mbit")


def tbf_burst_bytes(rate_bps: int, mtu: int) -> int:
    """Bucket size: two packets of the largest size, or 2 ms of traffic, whichever is larger. Smaller
    buckets make tbf undershoot its rate at high speeds (timer granularity); bigger ones let bursts
    through unshaped."""
    return max(2 * (mtu + 100), rate_bps // 8 // 500)


@dataclasses.dataclass(frozen=True)
class Link:
    rate: str | None = None  # tc units, None = unshaped
    latency_ms: float = 0.0  # one-way

    def __post_init__(self):
        parse_rate(self.rate)
        if not 0 <= self.latency_ms <= 1000:
            raise ValueError(f"latency_ms must be in [0, 1000], got {self.latency_ms}")

    @property
    def rate_bps(self) -> int | None:
        return parse_rate(self.rate)

    def describe(self) -> str:
        return f"{self.rate or 'unshaped'}, {self.latency_ms:g} ms one-way"


def address(rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"


def check_can_emulate() -> None:
    """Refuse early and clearly instead of failing half-way through building the network."""
    if sys.platform != "linux":
        raise NetemError("network emulation needs Linux (network namespaces, tc)")
    if os.geteuid() != 0:
        raise NetemError("network emulation needs root (ip netns, tc, /dev/net/tun): run it with sudo")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetemError(f"network emulation needs {', '.join(missing)} (package iproute2)")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetemError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Cluster:
    """N rank namespaces joined as described in the module docstring."""

    MTU = 64000  # every path (see the module docstring): the forwarder's per-packet cost sets it

    def __init__(self, world_size: int, link: Link = Link(), prefix: str | None = None):
        check_can_emulate()
        if world_size < 2 or world_size > 250:
            raise ValueError(f"world_size must be in [2, 250], got {world_size}")
        self.world_size = world_size
        self.link = link
        self.prefix = prefix or f"ts{os.getpid() % 100000}"
        if len(self.prefix) > 10:  # device names get up to 4 more characters; the limit is 15
            raise ValueError(f"prefix {self.prefix!r} is longer than 10 characters")
        self.namespaces = [f"{self.prefix}r{r}" for r in range(world_size)]
        self.devices = [f"{self.prefix}d{r}" for r in range(world_size)]
        self._made: list[str] = []
        self._forwarder: subprocess.Popen | None = None

    # ----- lifetime -----------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> None:
        for ns in self.namespaces:
            self._add_namespace(ns)
        if self.link.latency_ms > 0:
            self._build_tun()
        elif self.world_size == 2:
            self._build_veth_pair()
        else:
            self._build_bridge()
        for r in range(self.world_size):
            self.exec(r, "ip", "link", "set", "lo", "up")  # torchrun's store talks to itself over lo

    def close(self) -> None:
        if self._forwarder is not None:
            if self._forwarder.poll() is None:
                self._forwarder.stdin.close()  # EOF: the forwarder's signal to stop
                try:
                    self._forwarder.wait(10)
                except subprocess.TimeoutExpired:
                    self._forwarder.kill()
                    self._forwarder.wait(10)
            self._forwarder = None
        for ns in reversed(self._made):
            _run("ip", "netns", "del", ns, check=False)
        self._made = []

    # ----- building blocks ----------------------------------------------------------------------
    def _add_namespace(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._made.append(ns)

    def _netns(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", ns, *cmd, check=check)

    def exec(self, rank: int, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a short command inside rank's namespace."""
        return self._netns(self.namespaces[rank], *cmd, check=check)

    def _shape(self, ns: str, dev: str) -> None:
        rate = self.link.rate_bps
        if rate is None:
            return
        self._netns(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", str(rate) + "bit",
                    "burst", str(tbf_burst_bytes(rate, self.MTU)), "latency", "200ms")

    def _configure_rank_device(self, rank: int) -> None:
        ns, dev = self.namespaces[rank], self.devices[rank]
        self._netns(ns, "ip", "addr", "add", f"{address(rank)}/24", "dev", dev)
        self._netns(ns, "ip", "link", "set", dev, "mtu", str(self.MTU), "up")
        self._shape(ns, dev)

    def _add_veth(self, name: str, ns: str, peer: str, peer_ns: str) -> None:
        """A veth pair with the cluster's MTU on both ends from the start."""
        mtu = str(self.MTU)
        _run("ip", "link", "add", name, "mtu", mtu, "netns", ns, "type", "veth",
             "peer", "name", peer, "mtu", mtu, "netns", peer_ns)

    def _build_veth_pair(self) -> None:
        self._add_veth(self.devices[0], self.namespaces[0], self.devices[1], self.namespaces[1])
        for r in range(2):
            self._configure_rank_device(r)

    def _build_bridge(self) -> None:
        bridge_ns, bridge = f"{self.prefix}br", f"{self.prefix}br"
        self._add_namespace(bridge_ns)
        # an MTU set by the user sticks: the bridge does not fall back to its smallest port's
        self._netns(bridge_ns, "ip", "link", "add", bridge, "mtu", str(self.MTU), "type", "bridge")
        self._netns(bridge_ns, "ip", "link", "set", bridge, "up")
        for r in range(self.world_size):
            port = f"{self.prefix}p{r}"
            self._add_veth(self.devices[r], self.namespaces[r], port, bridge_ns)
            self._netns(bridge_ns, "ip", "link", "set", port, "master", bridge)
            self._netns(bridge_ns, "ip", "link", "set", port, "up")
            self._shape(bridge_ns, port)  # the downlink to rank r
            self._configure_rank_device(r)

    def _build_tun(self) -> None:
        rate = self.link.rate_bps or 0
        self._forwarder = subprocess.Popen(
            [sys.executable, "-m", "thinkscale.bench.latency_forwarder", "--names", *self.devices,
             "--latency-ms", str(self.link.latency_ms), "--rate-bps", str(rate), "--subnet", SUBNET],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self._forwarder.stdout.readline().strip()
        if ready != "READY":
            raise NetemError(f"latency forwarder did not start: {ready} {self._forwarder.stderr.read()[-500:]}")
        for r in range(self.world_size):
            _run("ip", "link", "set", self.devices[r], "netns", self.namespaces[r])
            self._configure_rank_device(r)

    # ----- running things inside ----------------------------------------------------------------
    def spawn(self, rank: int, argv: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
        """Start argv inside rank's namespace (a child of this process); the caller waits for it."""
        if self._forwarder is not None and self._forwarder.poll() is not None:
            raise NetemError("the latency forwarder has exited; the network is down")
        full_env = {**os.environ, **(env or {})}
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[rank], *argv], env=full_env,
                                start_new_session=True, **popen)

    def forwarder_alive(self) -> bool:
        return self._forwarder is None or self._forwarder.poll() is None


def wait_all(procs: list[subprocess.Popen], timeout_s: float, grace_s: float = 20.0) -> list[int]:
    """Exit codes of all procs. Once one fails the others get `grace_s` to notice (their collectives
    time out or abort) and are then killed; anything still running at `timeout_s` is killed too and
    reported as 124. Processes are killed by process group (spawn() starts a new session each), so
    torchrun's workers go with it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            deadline = min(deadline, time.monotonic() + grace_s)
        time.sleep(0.2)
    codes = [p.poll() for p in procs]
    for p in procs:
        kill_group(p)
    return [124 if c is None else c for c in codes]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (torchrun passes it to its workers), SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue

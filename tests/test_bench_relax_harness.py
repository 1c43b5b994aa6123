"""The emulated-network harness, for real: namespaces, tbf, the latency forwarder, torchrun across
namespaces and the `thinkscale bench relax` command. Needs root, ip and tc (the dev/CI machine has them)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from thinkscale.bench import netem
from thinkscale.bench.netem import Cluster, Link, NetemError, address, wait_all

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None or not os.path.exists("/dev/net/tun"),
    reason="network emulation needs root, iproute2 (ip, tc) and /dev/net/tun")

TINY = "--mlp-hidden 64 --mlp-layers 2"


def namespaces_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def calibrate(cluster: Cluster) -> dict:
    cmd = [sys.executable, "-m", "thinkscale.bench.calibrate"]
    server = cluster.spawn(1, [*cmd, "server", "--mb", "4"])
    client = cluster.spawn(0, [*cmd, "client", "--host", address(1), "--mb", "4"], stdout=subprocess.PIPE,
                           text=True)
    assert wait_all([server, client], 60) == [0, 0]
    return json.loads(client.stdout.read().split("CALIBRATION ", 1)[1])


def test_refuses_without_root(monkeypatch):
    monkeypatch.setattr(netem.os, "geteuid", lambda: 1000)
    with pytest.raises(NetemError, match="needs root"):
        Cluster(2, Link("1gbit"))


def test_shaped_veth_and_cleanup():
    prefix = f"tq{os.getpid() % 10000}a"
    with Cluster(2, Link("100mbit", 0), prefix=prefix) as cluster:
        assert len(namespaces_with(prefix)) == 2
        cal = calibrate(cluster)
    assert namespaces_with(prefix) == []
    assert 0.07 < cal["throughput_gbit_s"] < 0.105  # the cap holds and is not far undershot
    assert cal["rtt_ms"] < 1.0


def test_latency_forwarder_adds_latency_between_four_ranks():
    prefix = f"tq{os.getpid() % 10000}b"
    with Cluster(4, Link(None, 5), prefix=prefix) as cluster:
        cal = calibrate(cluster)
        forwarder = cluster._forwarder
        # rank 2 -> rank 3 too (not only 0 <-> 1): the switch routes by destination address
        cmd = [sys.executable, "-m", "thinkscale.bench.calibrate"]
        server = cluster.spawn(3, [*cmd, "server", "--mb", "1", "--port", "29601"])
        client = cluster.spawn(2, [*cmd, "client", "--host", address(3), "--mb", "1", "--port", "29601"],
                               stdout=subprocess.PIPE, text=True)
        assert wait_all([server, client], 60) == [0, 0]
        rtt_23 = json.loads(client.stdout.read().split("CALIBRATION ", 1)[1])["rtt_ms"]
    assert forwarder.poll() is not None, "the forwarder must stop with the cluster"
    assert namespaces_with(prefix) == []
    for rtt in (cal["rtt_ms"], rtt_23):
        assert 10.0 <= rtt < 20.0, f"5 ms one-way should give a ~10 ms round trip, got {rtt:.2f} ms"


def link_mtu(namespace: str, device: str) -> int:
    out = subprocess.run(["ip", "-n", namespace, "-o", "link", "show", "dev", device], capture_output=True,
                         text=True, check=True).stdout
    words = out.split()
    return int(words[words.index("mtu") + 1])


@pytest.mark.parametrize("world_size, latency_ms", [(2, 0), (3, 0), (2, 1)], ids=["veth", "bridge", "tun"])
def test_every_path_uses_one_mtu(world_size, latency_ms):
    """Cells with and without latency must not differ in packet size: every device gets Cluster.MTU."""
    prefix = f"tq{os.getpid() % 10000}m"
    with Cluster(world_size, Link("1gbit", latency_ms), prefix=prefix) as cluster:
        devices = list(zip(cluster.namespaces, cluster.devices))
        if world_size > 2:  # the bridge and its ports, one per rank, in the bridge namespace
            bridge = f"{prefix}br"
            devices += [(bridge, bridge)] + [(bridge, f"{prefix}p{r}") for r in range(world_size)]
        mtus = {device: link_mtu(namespace, device) for namespace, device in devices}
    assert mtus == {device: Cluster.MTU for _, device in devices}


def failed_runs(out) -> str:
    """The full error (every node's log tail) of each failed contender, for the assertion message: the
    report's table shows only its first line."""
    path = out / "results.json"
    if not path.exists():
        return ""
    cells = json.loads(path.read_text()).get("cells", {}).values()
    return "".join(f"\n{name}: {run['error']}" for cell in cells for name, run in cell.get("runs", {}).items()
                   if isinstance(run, dict) and "error" in run)


def run_cli(tmp_path, *extra, repeats=1, timeout=400):
    cmd = [sys.executable, "-m", "thinkscale", "bench", "relax", "--world-sizes", "2", "--steps", "4",
           "--timing-warmup", "1", "--worker-args", TINY, "--out", str(tmp_path), "--repeats", str(repeats),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_smoke_1gbit(tmp_path):
    """The issue's smoke run: 2 ranks, 1 Gbit/s, a few steps; DDP vs ByteGrad, real bytes counted. One
    repeat, to stay under a minute (the repeat logic has its own tests in test_bench_netem_math.py)."""
    prefix = f"tq{os.getpid() % 10000}c"
    proc = run_cli(tmp_path, "--rates", "1gbit", "--latencies-ms", "0", "--contenders", "ddp", "bytegrad",
                   "--prefix", prefix)
    assert proc.returncode == 0, proc.stderr[-3000:] + failed_runs(tmp_path)
    assert namespaces_with(prefix) == []
    report = json.loads((tmp_path / "results.json").read_text())
    (cell,) = report["cells"].values()
    assert cell["calibration"]["throughput_gbit_s"] < 1.05
    assert [len(cell["repeat_runs"][c]) for c in ("ddp", "bytegrad")] == [1, 1]
    assert cell["runs"]["ddp"]["repeat_index"] == 0 and len(cell["runs"]["ddp"]["repeats"]) == 1
    rows = cell["summary"]["rows"]
    assert set(rows) == {"ddp", "bytegrad"} and rows["ddp"]["repeats"] == 1
    # ByteGrad sends uint8 instead of fp32: well under half of DDP's bytes (headers and min/max aside)
    assert 0 < rows["bytegrad"]["mb_per_step"] < 0.5 * rows["ddp"]["mb_per_step"]
    assert rows["ddp"]["x_ddp"] == 1.0 and rows["ddp"]["ideal_comm_ms"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "| bytegrad |" in md and "1gbit, 0 ms one-way" in md and "step times: one run each" in md
    for png in ("step_time_mlp_2ranks.png", "tradeoff_step_mlp_2ranks.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_cli_with_latency_and_resume(tmp_path):
    prefix = f"tq{os.getpid() % 10000}d"
    args = ("--rates", "none", "--latencies-ms", "1", "--contenders", "ddp", "--prefix", prefix)
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"].values()
    assert 2.0 <= cell["calibration"]["rtt_ms"] < 6.0
    # --resume with nothing left to run builds no network and keeps the result
    again = run_cli(tmp_path, *args, "--resume")
    assert again.returncode == 0 and "building the network" not in again.stdout
    (cell2,) = json.loads((tmp_path / "results.json").read_text())["cells"].values()
    assert cell2["runs"]["ddp"]["step_ms"] == cell["runs"]["ddp"]["step_ms"]
    # one more repeat asked for: only that one runs, the first is kept
    more = run_cli(tmp_path, *args, "--resume", repeats=2)
    assert more.returncode == 0 and "ddp repeat 2/2" in more.stdout and "repeat 1/2" not in more.stdout
    (cell3,) = json.loads((tmp_path / "results.json").read_text())["cells"].values()
    assert cell3["repeat_runs"]["ddp"][0]["step_ms"] == cell["runs"]["ddp"]["step_ms"]
    assert len(cell3["runs"]["ddp"]["repeats"]) == 2


def test_cli_bad_input(tmp_path):
    proc = run_cli(tmp_path, "--rates", "fast")
    assert proc.returncode == 2 and "bad rate 'fast'" in proc.stderr
    proc = run_cli(tmp_path, "--world-sizes", "1")
    assert proc.returncode == 2 and "world-sizes" in proc.stderr
    proc = run_cli(tmp_path, "--contenders", "ddp", "bytegrad:warmup_steps=3")
    assert proc.returncode == 2 and "no option 'warmup_steps'" in proc.stderr
    proc = run_cli(tmp_path, repeats=0)
    assert proc.returncode == 2 and "--repeats must be at least 1, got 0" in proc.stderr


def test_ctrl_c_cleans_up(tmp_path):
    prefix = f"tq{os.getpid() % 10000}e"
    cmd = [sys.executable, "-m", "thinkscale", "bench", "relax", "--world-sizes", "2", "--rates", "none",
           "--latencies-ms", "1", "--contenders", "ddp", "--steps", "400", "--worker-args", TINY,
           "--out", str(tmp_path), "--prefix", prefix]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(namespaces_with(prefix)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(namespaces_with(prefix)) == 2
    def ranks_running() -> bool:  # torchrun and its worker carry --iface <prefix>d<rank>
        return subprocess.run(["pgrep", "-f", "--", f"--iface {prefix}d"], capture_output=True).returncode == 0

    while not ranks_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ranks_running()
    proc.send_signal(signal.SIGINT)
    proc.wait(90)
    assert namespaces_with(prefix) == []
    assert not ranks_running()

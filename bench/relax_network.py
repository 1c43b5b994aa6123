"""Relax algorithms vs torch DDP over an emulated network: two namespaces, one veth, tbf bandwidth caps.

    sudo .venv/bin/python bench/relax_network.py                       # needs root (ip netns, tc)
    .venv/bin/python bench/relax_network.py --rates 1gbit 100mbit --steps 16 --algorithms ddp bytegrad

What it builds (and always removes again, also on Ctrl-C / SIGTERM / errors):
  namespace <prefix>a  [veth <prefix>a 10.231.77.1/24] <==> [veth <prefix>b 10.231.77.2/24]  namespace <prefix>b
with `tc qdisc ... tbf rate R` on the egress of both veth ends (so each direction is capped at R).
The kernel has no netem, so no added latency: this is a bandwidth-only emulation.
Rank 0 runs in namespace a, rank 1 in namespace b, each a plain `python examples/train_relax.py` with
RANK/WORLD_SIZE/MASTER_ADDR set, gloo bound to its veth (GLOO_SOCKET_IFNAME); no traffic leaves the two
namespaces. For each rate: a calibration allreduce (effective Gbit/s), then every algorithm's mean step
time, with ratios vs DDP at that rate. Separately, the MinMaxUInt8 quantizer is timed eager vs compiled
(cold and warm compile cost, bit-identity) because on CPU its cost decides whether quantization pays.
Writes bench/out/relax_network.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relax_step_time import BENCH_OPTIONS, DDP, EXAMPLE, OUT_DIR, ROOT, machine, plan  # noqa: E402

SUBNET = "10.231.77"
ADDR = {0: f"{SUBNET}.1", 1: f"{SUBNET}.2"}
PORT = 29500  # fresh namespaces: nothing else listens there
DEFAULT_ALGORITHMS = ["gradient_allreduce", "bytegrad", "decentralized", "low_precision_decentralized",
                      "qadam", "async"]


# ----- the emulated network --------------------------------------------------------------------------
def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


class VethPair:
    """Two namespaces joined by one veth pair; `close()` deletes both namespaces (and so the veth)."""

    def __init__(self, prefix: str):
        self.ns = {0: f"{prefix}a", 1: f"{prefix}b"}
        self.dev = {0: f"{prefix}a", 1: f"{prefix}b"}  # <= 15 chars: interface name limit
        self.created: list[str] = []

    def create(self) -> None:
        for r in (0, 1):
            sh("ip", "netns", "add", self.ns[r])
            self.created.append(self.ns[r])
        sh("ip", "link", "add", self.dev[0], "netns", self.ns[0], "type", "veth",
           "peer", "name", self.dev[1], "netns", self.ns[1])
        for r in (0, 1):
            self.exec(r, "ip", "addr", "add", f"{ADDR[r]}/24", "dev", self.dev[r])
            self.exec(r, "ip", "link", "set", self.dev[r], "up")
            self.exec(r, "ip", "link", "set", "lo", "up")  # the rendezvous store talks to itself

    def exec(self, r: int, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns[r], *cmd, check=check)

    def shape(self, rate: str | None) -> None:
        """Cap both directions at `rate` (tc syntax, e.g. 1gbit); None removes the cap."""
        for r in (0, 1):
            self.exec(r, "tc", "qdisc", "del", "dev", self.dev[r], "root", check=False)
            if rate is not None:
                # burst: at least one GSO segment (64 KiB) and ~1 ms worth of traffic; queue up to 200 ms.
                bits = parse_rate(rate)
                burst = max(65536, bits // 8 // 1000) * 2
                self.exec(r, "tc", "qdisc", "add", "dev", self.dev[r], "root", "tbf", "rate", rate,
                          "burst", str(burst), "latency", "200ms")

    def close(self) -> None:
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created = []


def parse_rate(rate: str) -> int:
    """'1gbit' -> 10**9 bits/s (tc's decimal units)."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    for suffix, mult in units.items():
        if rate.lower().endswith(suffix):
            return int(float(rate[: -len(suffix)]) * mult)
    raise ValueError(f"rate {rate!r}: use tc units such as 1gbit, 100mbit, 500kbit")


# ----- running two ranks, one per namespace ----------------------------------------------------------
CALIBRATE = r"""
import os, sys, time, torch, torch.distributed as dist
from datetime import timedelta
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
t = torch.ones(int(sys.argv[1]))
dist.all_reduce(t); dist.barrier()
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter(); dist.all_reduce(t); times.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    print("CALIBRATE", min(times), flush=True)
dist.destroy_process_group()
"""


def run_pair(net: VethPair, argv: list[str], timeout_s: float, extra_env: dict | None = None) -> tuple[int, str]:
    """Start rank 0 in namespace a and rank 1 in namespace b; wait (kill both on timeout/interrupt).
    Returns (worst exit code, rank 0's output + rank 1's stderr tail)."""
    procs = []
    logs = [tempfile.TemporaryFile("w+") for _ in (0, 1)]
    try:
        for r in (0, 1):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": ADDR[0], "MASTER_PORT": str(PORT), "GLOO_SOCKET_IFNAME": net.dev[r],
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
            procs.append(subprocess.Popen(["ip", "netns", "exec", net.ns[r], sys.executable, *argv], cwd=ROOT,
                                          env=env, stdout=logs[r], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(124)
        for log in logs:
            log.seek(0)
        out0, out1 = logs[0].read(), logs[1].read()
        return max(codes), out0 + ("" if max(codes) == 0 else "\n--- rank 1 ---\n" + out1[-1500:])
    finally:
        for p in procs:  # only our own children, by handle
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for log in logs:
            log.close()


def calibrate(net: VethPair, numel: int, timeout_s: float) -> dict:
    code, out = run_pair(net, ["-c", CALIBRATE, str(numel), "3"], timeout_s)
    line = [ln for ln in out.splitlines() if ln.startswith("CALIBRATE")]
    if code != 0 or not line:
        return {"error": out[-800:]}
    seconds = float(line[0].split()[1])
    # A 2-rank ring allreduce sends and receives numel*4*(n-1)/n*2 = numel*4 bytes per rank.
    return {"allreduce_mb": numel * 4 / 1e6, "seconds": seconds, "effective_gbit_s": numel * 4 * 8 / seconds / 1e9}


def run_training(net: VethPair, algorithm: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        argv = [str(EXAMPLE), "--algorithm", algorithm, "--steps", str(args.steps),
                "--timing-warmup", str(args.timing_warmup), "--batch-size", str(args.batch_size),
                "--bucket-size-mb", str(args.bucket_size_mb), "--d-in", str(args.d_in),
                "--hidden", str(args.hidden), "--layers", str(args.layers), "--log-every", str(args.steps),
                "--timeout-s", "120", "--json-out", str(out), *BENCH_OPTIONS.get(algorithm, [])]
        code, text = run_pair(net, argv, args.run_timeout_s)
        if code != 0 or not out.exists():
            return {"error": f"exit {code}: {text[-1500:]}"}
        summary = json.loads(out.read_text())
        if not args.keep_step_times:
            summary.pop("step_ms", None)
        return summary


# ----- quantizer cost ---------------------------------------------------------------------------------
QUANTIZER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from thinkscale.relax import quantize
n, chunks = int(sys.argv[1]), 2
t = torch.randn(n, generator=torch.Generator().manual_seed(0))
def timed(fn, *a, reps=5):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); r = fn(*a); best = min(best, time.perf_counter() - t0)
    return best, r
t0 = time.perf_counter(); mm, q = quantize.compress(t, chunks); first_compress = time.perf_counter() - t0
t0 = time.perf_counter(); quantize.decompress(mm, q); first_decompress = time.perf_counter() - t0
compiled = {k: v == "compiled" for k, v in quantize.compiled_status().items()}
c_s, (mm_c, q_c) = timed(quantize.compress, t, chunks)
e_s, (mm_e, q_e) = timed(quantize.compress_eager, t, chunks)
cd_s, d_c = timed(quantize.decompress, mm_c, q_c)
ed_s, d_e = timed(quantize.decompress_eager, mm_e, q_e)
clone_s, _ = timed(torch.clone, t)
print("QUANT", json.dumps({"numel": n, "compiled_path": compiled,
    "first_compress_s": first_compress, "first_decompress_s": first_decompress,
    "compress_compiled_s": c_s, "compress_eager_s": e_s, "decompress_compiled_s": cd_s,
    "decompress_eager_s": ed_s, "clone_s": clone_s,
    "identical_bytes": bool(torch.equal(q_c, q_e) and torch.equal(mm_c, mm_e)),
    "identical_decompress": bool(torch.equal(d_c, d_e))}), flush=True)
"""


def quantizer_cost(numel: int, timeout_s: float) -> dict:
    """Cold compile (empty inductor cache), then warm (cache filled by the first process)."""
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold_cache", "warm_cache"):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
            try:
                proc = subprocess.run([sys.executable, "-c", QUANTIZER, str(numel)], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                results[label] = {"error": f"timed out after {timeout_s} s"}
                continue
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("QUANT ")]
            results[label] = json.loads(line[0][6:]) if line else {"error": proc.stderr[-800:]}
    return results


# ----- report -----------------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    lines = []
    for rate, block in report["rates"].items():
        cal = block["calibration"]
        cal_text = (f"allreduce {cal['allreduce_mb']:.0f} MB in {cal['seconds']:.3f} s = "
                    f"{cal['effective_gbit_s']:.2f} Gbit/s effective" if "error" not in cal else "calibration failed")
        lines.append(f"rate {rate}  ({cal_text})")
        ddp = block["results"].get(DDP, {}).get("mean_step_ms")
        ddp_median = block["results"].get(DDP, {}).get("median_step_ms")
        lines.append(f"  {'algorithm':<30} {'mean ms':>9} {'median ms':>10} {'x DDP':>7} {'x DDP med':>9} "
                     f"{'loss':>8}  quantizer")
        for name, r in block["results"].items():
            if "error" in r:
                lines.append(f"  {name:<30} FAILED ({r['error'].strip().splitlines()[-1][:70]})")
                continue
            ratio = f"{r['mean_step_ms'] / ddp:.2f}" if ddp else "-"
            ratio_median = f"{r['median_step_ms'] / ddp_median:.2f}" if ddp_median else "-"
            quant = ",".join(f"{k}={v}" for k, v in sorted(r.get("quantizer", {}).items())) or "-"
            lines.append(f"  {name:<30} {r['mean_step_ms']:>9.1f} {r['median_step_ms']:>10.1f} {ratio:>7} "
                         f"{ratio_median:>9} {r['final_loss']:>8.4f}  {quant}")
    for name in report["missing"]:
        lines.append(f"  {name:<30} missing (not registered)")
    q = report.get("quantizer")
    if q:
        for label, r in q.items():
            if "error" in r:
                lines.append(f"quantizer {label}: FAILED {r['error'][-200:]}")
                continue
            lines.append(
                f"quantizer ({label}, {r['numel'] / 1e6:.1f}M floats, 2 chunks, 1 thread): compiled path "
                f"{r['compiled_path']}, first call (incl. compile) compress {r['first_compress_s']:.1f} s + "
                f"decompress {r['first_decompress_s']:.1f} s; steady compress {1e3 * r['compress_compiled_s']:.1f} ms "
                f"compiled vs {1e3 * r['compress_eager_s']:.1f} ms eager, decompress "
                f"{1e3 * r['decompress_compiled_s']:.1f} vs {1e3 * r['decompress_eager_s']:.1f} ms, clone "
                f"{1e3 * r['clone_s']:.1f} ms; identical bytes {r['identical_bytes']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rates", nargs="+", default=["none", "1gbit", "100mbit"],
                   help="tbf rates (tc units); 'none' = unshaped veth")
    p.add_argument("--algorithms", nargs="+", default=DEFAULT_ALGORITHMS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timing-warmup", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bucket-size-mb", type=float, default=10.0)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--calibrate-mb", type=float, default=16.0, help="allreduce size for the calibration")
    p.add_argument("--quantizer-numel", type=int, default=1 << 22, help="0 skips the quantizer timing")
    p.add_argument("--run-timeout-s", type=float, default=300.0)
    p.add_argument("--keep-step-times", action="store_true")
    p.add_argument("--prefix", default=f"tsrx{os.getpid() % 100000}", help="namespace/veth name prefix")
    p.add_argument("--out", default=str(OUT_DIR / "relax_network.json"))
    args = p.parse_args(argv)
    if len(args.prefix) > 14:
        p.error("--prefix must be at most 14 characters (interface names are limited to 15)")
    for rate in args.rates:
        if rate != "none":
            parse_rate(rate)
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("relax_network needs root (ip netns / tc); run it with sudo", file=sys.stderr)
        return 2
    to_run, missing = plan(args.algorithms)
    report: dict = {"machine": machine(), "config": vars(args), "missing": missing, "rates": {}}
    # Ctrl-C and kill -TERM both unwind through the finally below (even if SIGINT was inherited ignored).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    net = VethPair(args.prefix)
    try:
        net.create()
        for rate in args.rates:
            net.shape(None if rate == "none" else rate)
            print(f"[relax_network] rate {rate}: calibrating ...", flush=True)
            block = {"calibration": calibrate(net, int(args.calibrate_mb * 1e6 / 4), args.run_timeout_s),
                     "results": {}}
            for name in to_run:
                print(f"[relax_network] rate {rate}: {name} ...", flush=True)
                block["results"][name] = run_training(net, name, args)
            report["rates"][rate] = block
    finally:
        net.close()
        leftover = [ns for ns in net.ns.values() if ns in sh("ip", "netns", "list", check=False).stdout]
        if leftover:
            print(f"[relax_network] WARNING: could not delete namespaces {leftover}", file=sys.stderr)
    if args.quantizer_numel > 0:
        print("[relax_network] timing the quantizer (cold and warm compile) ...", flush=True)
        report["quantizer"] = quantizer_cost(args.quantizer_numel, args.run_timeout_s)
    text = format_report(report)
    print(text)
    report["table"] = text
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"[relax_network] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mean training step time of every relax algorithm next to torch DDP, 2 ranks on this machine.

    .venv/bin/python bench/relax_step_time.py                 # default: ~2-4 min on 2 cores
    .venv/bin/python bench/relax_step_time.py --steps 60 --repeats 2 --hidden 2048

Each algorithm (and DDP) runs as its own `torchrun --nproc_per_node 2 examples/train_relax.py` with the
same model, data, batch size and bucket size; the mean step time of rank 0 after --timing-warmup steps
(which also absorbs the quantizer's one-off torch.compile) is compared with DDP measured in the same
invocation. Algorithms the spec names that are not registered yet are listed as missing.
Writes bench/out/relax_step_time.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from thinkscale.relax import algorithms

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_relax.py"
OUT_DIR = ROOT / "bench" / "out"
DDP = "ddp"
# The spec's algorithms, in the order the tables show them; anything else registered is appended.
SPEC_ALGORITHMS = ["gradient_allreduce", "bytegrad", "decentralized", "low_precision_decentralized",
                   "qadam", "async"]
# Options a short benchmark needs so that it measures the algorithm's steady state, not its warm-up.
BENCH_OPTIONS = {"qadam": ["--warmup-steps", "3"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(algorithms to run, in table order, DDP first; spec algorithms that are not registered)."""
    registered = algorithms.names()
    wanted = requested if requested is not None else SPEC_ALGORITHMS + [a for a in registered
                                                                         if a not in SPEC_ALGORITHMS]
    run = [DDP] + [a for a in wanted if a in registered and a != DDP]
    missing = [a for a in wanted if a not in registered and a != DDP]
    return run, missing


def model_args(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--timing-warmup", str(args.timing_warmup),
            "--batch-size", str(args.batch_size), "--bucket-size-mb", str(args.bucket_size_mb),
            "--d-in", str(args.d_in), "--hidden", str(args.hidden), "--layers", str(args.layers),
            "--log-every", str(args.steps)]


def run_torchrun(algorithm: str, train_args: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """One 2-rank run on loopback; returns the example's JSON summary or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(EXAMPLE),
               "--algorithm", algorithm, "--json-out", str(out), *train_args, *BENCH_OPTIONS.get(algorithm, [])]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-1500:]}
        return json.loads(out.read_text())


def summarize(runs: list[dict]) -> dict:
    """Combine repeated runs of one algorithm: mean of the per-run means, all step times kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    return {
        "mean_step_ms": statistics.fmean(r["mean_step_ms"] for r in ok),
        "median_step_ms": statistics.median(t for r in ok for t in r["step_ms"][r["timing_warmup"]:]),
        "run_means_ms": [r["mean_step_ms"] for r in ok],
        "first_step_ms": ok[0]["first_step_ms"],
        "final_loss": ok[-1]["final_loss"], "first_loss": ok[-1]["first_loss"],
        "quantizer": ok[0]["quantizer"], "params": ok[0]["params"],
        "failed_runs": len(runs) - len(ok),
    }


def format_table(results: dict[str, dict], missing: list[str], title: str) -> str:
    ddp = results.get(DDP, {}).get("mean_step_ms")
    rows = [title, f"{'algorithm':<30} {'mean ms':>9} {'median ms':>10} {'x DDP':>7} {'final loss':>10}  quantizer"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"{name:<30} FAILED: {r['error'].splitlines()[-1][:80] if r['error'] else ''}")
            continue
        ratio = f"{r['mean_step_ms'] / ddp:.2f}" if ddp else "-"
        quant = ",".join(f"{k}={v}" for k, v in sorted(r["quantizer"].items())) or "-"
        rows.append(f"{name:<30} {r['mean_step_ms']:>9.1f} {r['median_step_ms']:>10.1f} {ratio:>7} "
                    f"{r['final_loss']:>10.4f}  {quant}")
    for name in missing:
        rows.append(f"{name:<30} missing (not registered in thinkscale.relax.algorithms)")
    rows.append("x DDP = mean step time / DDP mean step time (lower is faster).")
    return "\n".join(rows)


def machine() -> dict:
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "host_cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=None, help="default: all the spec names + registered")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--timing-warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="runs per algorithm, interleaved")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bucket-size-mb", type=float, default=10.0)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--run-timeout-s", type=float, default=240.0)
    p.add_argument("--out", default=str(OUT_DIR / "relax_step_time.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    to_run, missing = plan(args.algorithms)
    runs: dict[str, list[dict]] = {a: [] for a in to_run}
    for rep in range(args.repeats):
        order = to_run if rep % 2 == 0 else list(reversed(to_run))  # interleave to spread machine noise
        for name in order:
            print(f"[relax_step_time] repeat {rep + 1}/{args.repeats}: {name} ...", flush=True)
            runs[name].append(run_torchrun(name, model_args(args), args.run_timeout_s))
    results = {name: summarize(r) for name, r in runs.items()}
    params = next((r["params"] for r in results.values() if "params" in r), None)
    title = (f"2 ranks, gloo on loopback, 1 thread/rank, MLP {args.d_in}-{args.hidden}x{args.layers - 1}-10 "
             f"({params / 1e6 if params else float('nan'):.2f}M params), batch {args.batch_size}/rank, "
             f"{args.steps} steps (first {args.timing_warmup} not timed), {args.repeats} repeat(s)")
    print(format_table(results, missing, title))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "config": vars(args), "missing": missing,
                                          "results": results, "raw": runs}, indent=1))
    print(f"[relax_step_time] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`thinkscale bench relax`: relax algorithms vs torch DDP on an emulated cluster, over a grid of links.

For every world size and every (bandwidth, latency) cell it builds the network (netem.Cluster), measures
it (TCP RTT and throughput between rank 0 and rank 1), then runs every contender on every workload
`--repeats` times: one torchrun per rank namespace, joined by torchrun's c10d rendezvous on rank 0's
namespace address, gloo bound to the namespace's interface. The repeats are interleaved within a cell
(round 1 of every contender, then round 2, ...), so that slow drift of a shared machine affects all
contenders alike. Results are saved after every run, then summarized into report.md, results.json and
PNG plots under --out.

results.json, per cell (see relax_report.combine_repeats):
- "repeat_runs": {contender: [the worker's JSON, or {"error": ...}, of each repeat in round order]},
  the record `--resume` continues: it keeps the successful repeats and runs the missing ones (failed
  repeats are run again); a results.json from before repeats counts each run as one repeat;
- "runs": {contender: the repeat of median mean step time, with "repeat_index" and "repeats" (each
  repeat's mean_step_ms, median_step_ms, final_loss, eval_loss, tx_bytes_per_step)}, or
  {"error", "failed_repeat", "repeats"} if a repeat failed;
- "summary": the report's numbers (relax_report.summarize_cell).

    sudo thinkscale bench relax                                  # the default grid (see --help)
    sudo thinkscale bench relax --world-sizes 2 --rates 1gbit --latencies-ms 0 --contenders ddp bytegrad \
        --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from thinkscale.bench import machine, relax_report, relax_worker
from thinkscale.bench.netem import (Cluster, Link, NetemError, address, check_can_emulate, kill_group,
                                   parse_rate, wait_all)

DEFAULT_CONTENDERS = [
    "ddp", "ddp_fp16", "ddp_powersgd", "gradient_allreduce", "bytegrad", "decentralized",
    "decentralized:peer_selection_mode=shift_one,communication_interval=2", "low_precision_decentralized",
    "qadam:warmup_steps=5", "async",
]
RDZV_PORT = 29400
CALIBRATION_PORT = 29399


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2], help="ranks (one namespace each)")
    p.add_argument("--rates", nargs="+", default=["none", "10gbit", "1gbit", "100mbit"],
                   help="link bandwidths in tc units; 'none' = unshaped")
    p.add_argument("--latencies-ms", type=float, nargs="+", default=[0.0, 1.0, 5.0], help="one-way latency")
    p.add_argument("--workloads", nargs="+", default=["mlp"], choices=list(relax_worker.WORKLOADS),
                   help="mlp: a wide MLP; policy: the demo's policy on its SFT data; smollm2: SmolLM2-135M on "
                        "the same data (pass its sizes with --worker-args, e.g. '--seq-len 64 --accumulate 1')")
    p.add_argument("--contenders", nargs="+", default=DEFAULT_CONTENDERS,
                   help="ddp, ddp_fp16, ddp_powersgd or a relax algorithm, optionally name:key=value,...")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every contender in every cell, interleaved across contenders; the report "
                        "shows the median step time and its min-max")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--timing-warmup", type=int, default=5, help="first steps left out of the step time")
    p.add_argument("--worker-args", default="", help="extra arguments for every worker (one string)")
    p.add_argument("--run-timeout-s", type=float, default=900.0, help="per run (one repeat of one contender)")
    p.add_argument("--calibrate-mb", type=float, default=32.0)
    p.add_argument("--out", default="bench/out/relax", help="folder for report.md, results.json, plots")
    p.add_argument("--resume", action="store_true",
                   help="keep the successful repeats in --out/results.json; run the missing and failed ones")
    p.add_argument("--prefix", default=None, help="namespace name prefix (default: ts<pid>)")


def validate(args: argparse.Namespace) -> None:
    for rate in args.rates:
        parse_rate(rate)  # raises with the bad value named
    for ws in args.world_sizes:
        if not 2 <= ws <= 16:
            raise ValueError(f"--world-sizes: each must be in [2, 16], got {ws}")
    for lat in args.latencies_ms:
        Link(None, lat)
    for spec in args.contenders:  # before any network is built, not once per rank and cell
        relax_worker.parse_contender(spec)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.steps < 2 or not 0 <= args.timing_warmup < args.steps:
        raise ValueError(f"need --steps >= 2 and 0 <= --timing-warmup < --steps "
                         f"(got {args.steps}, {args.timing_warmup})")


def cell_key(world_size: int, rate: str | None, latency_ms: float, workload: str) -> str:
    return f"{workload}|{world_size}|{rate or 'none'}|{latency_ms:g}"


# ----- repeats ----------------------------------------------------------------------------------------
def successful(results: list[dict]) -> list[dict]:
    return [result for result in results if "error" not in result]


def repeats_missing(results: list[dict], repeats: int) -> int:
    """Runs a contender still needs for `repeats` successful ones (a failed repeat does not count)."""
    return max(0, repeats - len(successful(results)))


def interleaved_rounds(missing: dict[str, int]) -> list[str]:
    """Contenders in run order: one repeat of every contender that needs one, then the next round, so
    that drift of a shared machine (load, thermals) falls on every contender alike."""
    rounds = max(missing.values(), default=0)
    return [name for r in range(rounds) for name, n in missing.items() if n > r]


def record_repeat(cell: dict, contender: str, result: dict) -> None:
    """Append one repeat to the raw record and recombine the contender's entry of cell["runs"]."""
    results = cell.setdefault("repeat_runs", {}).setdefault(contender, [])
    results.append(result)
    cell["runs"][contender] = relax_report.combine_repeats(results)


def keep_successful_repeats(report: dict) -> None:
    """--resume: drop failed repeats (they are run again) and recombine. A results.json written before
    repeats existed has no "repeat_runs": each of its runs counts as one repeat."""
    for cell in report["cells"].values():
        recorded = (cell["repeat_runs"] if "repeat_runs" in cell
                    else {name: [run] for name, run in cell["runs"].items()})
        cell["repeat_runs"] = {name: ok for name, results in recorded.items() if (ok := successful(results))}
        cell["runs"] = {name: relax_report.combine_repeats(results) for name, results in cell["repeat_runs"].items()}


# ----- running ----------------------------------------------------------------------------------------
def calibrate(cluster: Cluster, mb: float, timeout_s: float = 180.0) -> dict:
    cmd = [sys.executable, "-m", "thinkscale.bench.calibrate"]
    port = ["--port", str(CALIBRATION_PORT), "--mb", str(mb)]
    server = cluster.spawn(1, [*cmd, "server", *port], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = cluster.spawn(0, [*cmd, "client", "--host", address(1), *port],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = wait_all([server, client], timeout_s)
    out = client.stdout.read()
    line = next((ln for ln in out.splitlines() if ln.startswith("CALIBRATION ")), None)
    if max(codes) != 0 or line is None:
        return {"error": f"exit {codes}: {client.stderr.read()[-500:]} {server.stderr.read()[-500:]}"}
    return json.loads(line.split(" ", 1)[1])


def torchrun_argv(cluster: Cluster, rank: int, run_id: str, port: int, worker_argv: list[str]) -> list[str]:
    """One node of a multi-node torchrun job, node = rank namespace; rendezvous on rank 0's address.
    is_host: torchrun decides who serves the rendezvous store by matching the endpoint against the
    hostname, which every namespace shares, so it is told instead."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cluster.world_size),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{address(0)}:{port}",
            "--rdzv-id", run_id, "--rdzv-conf", f"join_timeout=120,is_host={int(rank == 0)}",
            "--local-addr", address(rank),
            "--max-restarts", "0", "-m", "thinkscale.bench.relax_worker", *worker_argv,
            "--iface", cluster.devices[rank]]


def run_contender(cluster: Cluster, workload: str, contender: str, args: argparse.Namespace,
                  run_id: str, port: int) -> dict:
    """One training run of `contender`; returns the worker's JSON or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        json_out = Path(tmp) / "result.json"
        worker = ["--workload", workload, "--contender", contender, "--steps", str(args.steps),
                  "--timing-warmup", str(args.timing_warmup), "--json-out", str(json_out),
                  *shlex.split(args.worker_args)]
        logs = [open(Path(tmp) / f"rank{r}.log", "w+") for r in range(cluster.world_size)]
        env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        procs = []
        try:
            for r in range(cluster.world_size):
                procs.append(cluster.spawn(r, torchrun_argv(cluster, r, run_id, port, worker),
                                           env=env,
                                           stdout=logs[r], stderr=subprocess.STDOUT))
            codes = wait_all(procs, args.run_timeout_s)
        finally:  # also on Ctrl-C: no rank may outlive the run
            for p in procs:
                kill_group(p)
        text = []
        for r, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- node {r} ---\n{log.read()[-6000:]}")
            log.close()
        if max(codes) != 0 or not json_out.exists():
            why = "timed out" if 124 in codes else f"exit codes {codes}"
            if not cluster.forwarder_alive():
                why += "; the latency forwarder died"
            return {"error": f"{why}\n" + "\n".join(text)}
        return json.loads(json_out.read_text())


def run_status(result: dict) -> str:
    if "error" in result:
        return "FAILED: " + result["error"].splitlines()[0]
    return f"mean step {result['mean_step_ms']:.1f} ms, loss {result['final_loss']:.4f}"


def run_order(report: dict, args: argparse.Namespace, world_size: int, link: Link) -> dict[str, list[str]]:
    """workload -> contenders to run in this network, in interleaved rounds (empty when all are done)."""
    order = {}
    for workload in args.workloads:
        recorded = report["cells"].get(cell_key(world_size, link.rate, link.latency_ms, workload), {})
        missing = {c: repeats_missing(recorded.get("repeat_runs", {}).get(c, []), args.repeats)
                   for c in args.contenders}
        order[workload] = interleaved_rounds(missing)
    return order


def run_grid(args: argparse.Namespace, report: dict, save) -> None:
    n_run = 0
    for world_size in args.world_sizes:
        for latency in args.latencies_ms:
            for rate in args.rates:
                link = Link(None if rate == "none" else rate, latency)
                order = run_order(report, args, world_size, link)
                if not any(order.values()):
                    continue
                print(f"[bench relax] {world_size} ranks, {link.describe()}: building the network", flush=True)
                with Cluster(world_size, link, prefix=args.prefix) as cluster:
                    calibration = calibrate(cluster, args.calibrate_mb)
                    print(f"[bench relax]   calibration {calibration}", flush=True)
                    for workload, contenders in order.items():
                        cell = report["cells"].setdefault(cell_key(world_size, link.rate, latency, workload), {
                            "workload": workload, "world_size": world_size, "rate": link.rate,
                            "latency_ms": latency, "link": link.describe(), "runs": {}})
                        cell["calibration"] = calibration
                        for contender in contenders:
                            n_run += 1
                            t0 = time.monotonic()
                            result = run_contender(cluster, workload, contender, args,
                                                   f"bench{os.getpid()}x{n_run}", RDZV_PORT + n_run % 500)
                            record_repeat(cell, contender, result)
                            repeat = len(cell["repeat_runs"][contender])
                            print(f"[bench relax]   {workload} {contender} repeat {repeat}/{args.repeats}: "
                                  f"{run_status(result)} ({time.monotonic() - t0:.0f} s)", flush=True)
                            save()


def summarize(report: dict) -> None:
    """Add summaries; the target loss is DDP's (per workload and world size: same data, same math)."""
    targets: dict[tuple, float] = {}
    for cell in report["cells"].values():
        ddp = cell["runs"].get(relax_report.BASELINE)
        if ddp and "error" not in ddp:
            targets.setdefault((cell["workload"], cell["world_size"]),
                               relax_report.target_loss(ddp["mean_loss_per_step"]))
    for cell in report["cells"].values():
        target = targets.get((cell["workload"], cell["world_size"]))
        cell["summary"] = relax_report.summarize_cell(cell["runs"], parse_rate(cell["rate"]), target)


def write_outputs(report: dict, out: Path) -> list[Path]:
    summarize(report)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(relax_report.markdown(report))
    written = [out / "results.json", out / "report.md"]
    for workload, world_size in sorted({(c["workload"], c["world_size"]) for c in report["cells"].values()}):
        stem = f"{workload}_{world_size}ranks"
        plots = [(relax_report.plot_step_time, {}, f"step_time_{stem}.png"),
                 (relax_report.plot_tradeoff_map, {"key": "step_ms"}, f"tradeoff_step_{stem}.png"),
                 (relax_report.plot_tradeoff_map, {"key": "time_to_target_s"}, f"tradeoff_target_{stem}.png"),
                 (relax_report.plot_tradeoff_map, {"key": "time_to_target_s", "exclude": ("async",)},
                  f"tradeoff_target_sync_{stem}.png")]
        for fn, options, name in plots:
            if fn(report, workload, world_size, path=str(out / name), **options):
                written.append(out / name)
    return written


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    try:
        validate(args)
        check_can_emulate()
    except (ValueError, NetemError) as e:
        print(f"thinkscale bench relax: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    report = json.loads(results.read_text()) if args.resume and results.exists() else {"cells": {}}
    if args.resume:
        keep_successful_repeats(report)
    report["machine"] = machine.describe()
    report["command"] = "thinkscale " + shlex.join(sys.argv[1:])
    report["config"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    signal.signal(signal.SIGTERM, _raise_interrupt)  # unwind through Cluster.close() on kill -TERM
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`&`)

    def save() -> None:
        results.write_text(json.dumps(report, indent=1))

    try:
        run_grid(args, report, save)
    except NetemError as e:
        print(f"thinkscale bench relax: {e}", file=sys.stderr)
        save()
        return 1
    finally:
        report["machine"]["load_end"] = machine.load_average()
    written = write_outputs(report, out)
    print((out / "report.md").read_text())
    print("[bench relax] wrote " + ", ".join(str(p) for p in written))
    failed = sum("error" in r for c in report["cells"].values() for r in c["runs"].values())
    return 1 if failed else 0

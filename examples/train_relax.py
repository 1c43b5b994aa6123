"""Train a small MLP classifier data-parallel with a `thinkscale.relax` algorithm (or torch DDP).

    torchrun --nproc_per_node 2 examples/train_relax.py --algorithm bytegrad
    python examples/train_relax.py --algorithm gradient_allreduce        # world size 1

The task is synthetic and made here: inputs x ~ N(0, I), labels = argmax of a fixed random teacher
network, so the loss falls from ~log(classes) within a few hundred steps. Each rank draws its own
batches (different seed per rank). The model is big enough (default ~3.7M parameters, 15 MB of fp32
gradients) that communication shows up in the step time.

Backend: nccl when CUDA is available, gloo otherwise. Without a launcher (no WORLD_SIZE in the
environment) no process group is created and DataParallel runs as a plain module.
Rank 0 prints one line every --log-every steps with the loss and the mean step time (ms) since the last
line. --json-out writes a summary (mean step time after --timing-warmup steps, losses, quantizer path)
that the benchmarks in bench/ read.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from thinkscale.relax import DataParallel, algorithms, end_process_group, exit_process, quantize

DDP = "ddp"

# CLI option -> algorithm config field. Only options given on the command line are passed on, and only
# to algorithms whose config has that field (an option the algorithm lacks is an error).
ALGORITHM_OPTIONS = ("hierarchical", "warmup_steps", "communication_interval", "peer_selection_mode",
                     "sync_interval_ms")


# ----- model and data ----------------------------------------------------------------------------------
def make_mlp(d_in: int, hidden: int, layers: int, classes: int, seed: int) -> nn.Module:
    """`layers` Linear layers with ReLU between them (layers >= 2)."""
    torch.manual_seed(seed)
    dims = [d_in] + [hidden] * (layers - 1) + [classes]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        modules.append(nn.Linear(a, b))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def make_batches(rank: int, count: int, batch_size: int, d_in: int, classes: int,
                 seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches for `rank`, labelled by a teacher shared by all ranks. Made up front so that
    data generation is not part of the measured step time."""
    g_teacher = torch.Generator().manual_seed(seed + 12345)
    teacher = torch.randn(d_in, classes, generator=g_teacher) / d_in**0.5
    g = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    batches = []
    for _ in range(count):
        x = torch.randn(batch_size, d_in, generator=g)
        batches.append((x, torch.tanh(x @ teacher).argmax(dim=1)))
    return batches


# ----- setup -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algorithm", default="gradient_allreduce",
                   help=f"one of {algorithms.names() + [DDP]} (or any algorithm registered later)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (SGD), 1e-3 (qadam)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (not qadam)")
    p.add_argument("--bucket-size-mb", type=float, default=10.0)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4, help="number of Linear layers (>= 2)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--timeout-s", type=float, default=300.0, help="process group / collective timeout")
    p.add_argument("--timing-warmup", type=int, default=None,
                   help="steps left out of the mean step time (default: min(5, steps // 5))")
    p.add_argument("--json-out", default=None, help="rank 0 writes a JSON summary here")
    g = p.add_argument_group("algorithm options (passed only when given)")
    g.add_argument("--hierarchical", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    g.add_argument("--warmup-steps", type=int, default=None, help="qadam / async warm-up steps")
    g.add_argument("--communication-interval", type=int, default=None, help="decentralized variants")
    g.add_argument("--peer-selection-mode", default=None, help="decentralized / async: all, shift_one")
    g.add_argument("--sync-interval-ms", type=int, default=None, help="async")
    args = p.parse_args(argv)
    known = algorithms.names() + [DDP]
    if args.algorithm not in known:
        p.error(f"unknown --algorithm {args.algorithm!r}; registered: {', '.join(known)}")
    if args.layers < 2:
        p.error(f"--layers must be >= 2, got {args.layers}")
    for name in ("steps", "batch_size", "log_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is None:
        args.lr = 1e-3 if args.algorithm == "qadam" else 0.05
    if args.timing_warmup is None:
        args.timing_warmup = min(5, args.steps // 5)
    if not 0 <= args.timing_warmup < args.steps:
        p.error(f"--timing-warmup must be in [0, steps), got {args.timing_warmup}")
    return args


def init_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    """Process group from the launcher's environment (torchrun, or RANK/WORLD_SIZE/MASTER_* set by hand).
    Returns (rank, world_size, device)."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def algorithm_options(args: argparse.Namespace) -> dict:
    """Options given on the command line, checked against the algorithm's config fields."""
    given = {k: getattr(args, k) for k in ALGORITHM_OPTIONS if getattr(args, k) is not None}
    if args.algorithm == DDP:
        if given:
            raise SystemExit(f"--algorithm ddp takes no algorithm options, got {sorted(given)}")
        return {}
    fields = {f.name for f in dataclasses.fields(algorithms.REGISTRY[args.algorithm])}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise SystemExit(f"algorithm {args.algorithm!r} has no option(s) {unknown}; its options: {sorted(fields)}")
    if "lr" in fields:  # qadam's config carries the learning rate in the spec
        given["lr"] = args.lr
    return given


def _accepted_kwargs(fn, **candidates) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in candidates.items() if k in params and v is not None}


def make_optimizer(args: argparse.Namespace, params) -> torch.optim.Optimizer:
    if args.algorithm != "qadam":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    cls = getattr(algorithms, "QAdamOptimizer", None)
    if cls is None:
        raise SystemExit("qadam is registered but thinkscale.relax.algorithms.QAdamOptimizer is missing")
    return cls(params, **_accepted_kwargs(cls, lr=args.lr, warmup_steps=args.warmup_steps))


def wrap(args, module: nn.Module, optimizer, world_size: int, device: torch.device) -> nn.Module:
    if args.algorithm == DDP:
        if world_size == 1:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None, bucket_cap_mb=args.bucket_size_mb)
    return DataParallel(module, optimizer, algorithm=args.algorithm, bucket_size_mb=args.bucket_size_mb,
                        timeout_s=args.timeout_s, **algorithm_options(args))


# ----- training --------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rank, world_size, device = init_distributed(args.timeout_s)
    module = make_mlp(args.d_in, args.hidden, args.layers, args.classes, args.seed).to(device)
    optimizer = make_optimizer(args, module.parameters())
    model = wrap(args, module, optimizer, world_size, device)
    batches = [(x.to(device), y.to(device))
               for x, y in make_batches(rank, 16, args.batch_size, args.d_in, args.classes, args.seed)]
    n_params = sum(p.numel() for p in module.parameters())
    if rank == 0:
        print(f"[train_relax] algorithm={args.algorithm} world_size={world_size} device={device} "
              f"params={n_params / 1e6:.2f}M grad_bytes={4 * n_params / 2**20:.1f}MiB "
              f"batch={args.batch_size}/rank threads={args.threads}", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    step_ms: list[float] = []
    losses: list[float] = []
    window_start = 0
    for step in range(1, args.steps + 1):
        x, y = batches[(step - 1) % len(batches)]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_ms.append(1000 * (time.perf_counter() - t0))
        losses.append(loss.item())
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            window = step_ms[window_start:]
            print(f"[train_relax] step {step}/{args.steps} loss {losses[-1]:.4f} "
                  f"step_ms {statistics.fmean(window):.1f}", flush=True)
            window_start = step
    if isinstance(model, DataParallel):
        model.close()
    measured = step_ms[args.timing_warmup:]
    summary = {
        "algorithm": args.algorithm, "world_size": world_size, "device": str(device),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "params": n_params, "batch_size": args.batch_size, "steps": args.steps,
        "timing_warmup": args.timing_warmup, "bucket_size_mb": args.bucket_size_mb, "threads": args.threads,
        "mean_step_ms": statistics.fmean(measured),
        "median_step_ms": statistics.median(measured),
        "first_step_ms": step_ms[0], "step_ms": step_ms,
        "first_loss": losses[0], "final_loss": losses[-1],
        "quantizer": quantize.compiled_status(),
    }
    if rank == 0:
        print(f"[train_relax] done: mean step {summary['mean_step_ms']:.1f} ms over {len(measured)} steps "
              f"(first step {step_ms[0]:.0f} ms), loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
        if args.json_out is not None:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(summary, f, indent=1)
    end_process_group()  # a barrier, then the group is destroyed
    return summary


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    # A process that ran a gloo group ends without interpreter finalization, which can abort it after its
    # work is done (see thinkscale.relax.exit_process).
    exit_process(main())

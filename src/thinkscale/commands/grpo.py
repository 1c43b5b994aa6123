"""`thinkscale grpo`: joint GRPO + SPR training of the policy and its SPRM head, data-parallel with relax.

    thinkscale grpo --model runs/sft --out runs/grpo                 # questions from runs/sft/data/train.jsonl
    thinkscale grpo --model runs/sft --out runs/grpo --nproc 2 --algorithm bytegrad
    thinkscale grpo --model my-model-dir --data questions.jsonl --eval-data test.jsonl --out runs/grpo
    thinkscale grpo --model runs/sft --task gym:gsm_symbolic --out runs/grpo  # reward: the task's own grader
    thinkscale grpo --model runs/sft --out runs/grpo --nproc 2 --max-restarts 3   # survives a killed worker
    thinkscale grpo --model runs/sft --out runs/grpo --resume                     # continue an interrupted run
    torchrun --nproc_per_node 2 -m thinkscale.cli grpo --model runs/sft --out runs/grpo
"""
from __future__ import annotations

import argparse

from thinkscale.commands.stage import (add_failure_arguments, add_parallel_arguments, checkpoint_options,
                                       run_training_stage)
from thinkscale.commands.argtypes import non_negative_float, non_negative_int, positive_float, positive_int, unit_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thinkscale.reflect.head import HEAD_INPUTS
    from thinkscale.tasks.registry import help_text
    from thinkscale.train.grpo import GRPOOptions

    d = GRPOOptions(model="", out="")
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter

    io = parser.add_argument_group("model, data and output")
    io.add_argument("--model", required=True,
                    help="starting model: a folder (an SFT output: policy + tokenizer [+ SPRM head]; without "
                         "sprm_head.safetensors a fresh head is trained), 'smollm2' (SmolLM2-135M-Instruct, a 4-bit "
                         "Q4_1 round trip of the released weights; give --data), or a `thinkscale fit-head` folder")
    io.add_argument("--out", required=True, help="output directory: policy + trained SPRM head + tokenizer + "
                                                 "reflect_config.json + metrics.jsonl")
    io.add_argument("--data", help="JSONL of questions with answers (default: MODEL/data/train.jsonl)")
    io.add_argument("--eval-data", help="JSONL of test questions for the final evaluation "
                                        "(default: MODEL/data/test.jsonl when present)")
    io.add_argument("--task", default=None, metavar="TASK",
                    help="the data is this task's: its grader gives the reward and grades the evaluation "
                         "(default: math equivalence with the answer). Tasks: " + help_text())
    io.add_argument("--overwrite", action="store_true", help="retrain even if --out holds a finished run")

    r = parser.add_argument_group("rollouts")
    r.add_argument("--steps", type=positive_int, default=d.steps, help="training steps (one rollout batch each)")
    r.add_argument("--prompts-per-step", type=positive_int, default=d.prompts_per_step,
                   help="questions per step on each rank")
    r.add_argument("--group-size", type=positive_int, default=d.group_size,
                   help="rollouts per question (GRPO group, >= 2)")
    r.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens,
                   help="longest rollout; longer ones are truncated (and skipped by the SPR loss when wrong)")
    r.add_argument("--temperature", type=non_negative_float, default=d.temperature, help="sampling temperature")
    r.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (1: off)")

    o = parser.add_argument_group("optimization")
    add_parallel_arguments(o, d.algorithm)
    o.add_argument("--lr", type=positive_float, default=d.lr, help="policy learning rate (AdamW)")
    o.add_argument("--head-lr", type=positive_float, default=d.head_lr, help="SPRM head learning rate (AdamW)")
    o.add_argument("--updates-per-batch", type=positive_int, default=d.updates_per_batch,
                   help="joint policy + head updates on each rollout batch (PPO epochs; ratios clipped)")
    o.add_argument("--clip-ratio", type=positive_float, default=d.clip_ratio, help="PPO clip range")
    o.add_argument("--kl-coef", type=non_negative_float, default=d.kl_coef,
                   help="weight of the k3 KL to the starting policy")
    o.add_argument("--entropy-coef", type=non_negative_float, default=d.entropy_coef, help="entropy bonus weight")
    o.add_argument("--grad-clip", type=non_negative_float, default=d.grad_clip, help="policy grad-norm clip (0: off)")
    o.add_argument("--head-grad-clip", type=non_negative_float, default=d.head_grad_clip,
                   help="SPRM head grad-norm clip (0: off)")
    o.add_argument("--backbone-grad-scale", type=non_negative_float, default=None,
                   help="share of the SPR-loss gradient that reaches the policy (default: the model's reflect "
                        "config, 1e-4 as in the spec)")
    o.add_argument("--spr-min-class-share", type=unit_float, default=d.spr_min_class_share,
                   help="SPR loss: an outcome class of which the pseudo-label filter keeps fewer than this share of "
                        "the scored steps is trained whole that step, so the head cannot settle on scoring every "
                        f"step low (0: the spec's loss exactly; default {d.spr_min_class_share})")
    o.add_argument("--seed", type=int, default=d.seed, help="seed for prompt order, sampling and the fresh head")

    h = parser.add_argument_group("head refit (after training, on training questions, outcome labels only)")
    h.add_argument("--refit-head", action="store_true",
                   help="fit the SPRM head again on many rollouts of the final policy (reflect.head_fit)")
    h.add_argument("--refit-inputs", choices=list(HEAD_INPUTS), default=d.refit.inputs,
                   help="what the refitted head reads: hidden states, + the step's free confidences, or those alone")
    h.add_argument("--refit-questions", type=positive_int, default=d.refit.questions,
                   help="training questions sampled for the refit (over all ranks)")
    h.add_argument("--refit-samples", type=positive_int, default=d.refit.samples, help="rollouts per question")

    e = parser.add_argument_group("evaluation (rank 0, on the evaluation questions)")
    e.add_argument("--eval-questions", type=non_negative_int, default=d.eval_questions,
                   help="questions for the final evaluation (0: skip)")
    e.add_argument("--eval-samples", type=positive_int, default=d.eval_samples,
                   help="sampled answers per question for SPRM best-of-k and score separation")
    e.add_argument("--eval-before", action="store_true", help="also evaluate the starting model (for comparison)")
    add_failure_arguments(parser, d)


def options_from_args(args: argparse.Namespace):
    from thinkscale.reflect.head_fit import HeadFitOptions
    from thinkscale.relax import algorithms
    from thinkscale.train.grpo import GRPOOptions

    algorithms.resolve(args.algorithm)  # an unknown name fails here, listing the valid ones
    return GRPOOptions(
        model=args.model, out=args.out, data=args.data, eval_data=args.eval_data, algorithm=args.algorithm,
        task=args.task,
        steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size, lr=args.lr,
        head_lr=args.head_lr, clip_ratio=args.clip_ratio, kl_coef=args.kl_coef, entropy_coef=args.entropy_coef,
        grad_clip=args.grad_clip, head_grad_clip=args.head_grad_clip, backbone_grad_scale=args.backbone_grad_scale,
        updates_per_batch=args.updates_per_batch, spr_min_class_share=args.spr_min_class_share,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        eval_questions=args.eval_questions, eval_samples=args.eval_samples, eval_before=args.eval_before,
        refit_head=args.refit_head, refit=HeadFitOptions(inputs=args.refit_inputs, questions=args.refit_questions,
                                                         samples=args.refit_samples, seed=args.seed,
                                                         max_new_tokens=args.max_new_tokens),
        **checkpoint_options(args),
    )


def run(args: argparse.Namespace) -> int:
    from thinkscale.reflect.loading import check_model_arg
    from thinkscale.train.grpo import load_data, run_grpo

    options = options_from_args(args)
    load_data(options)  # bad data or model fails here, in one line, before any worker starts
    check_model_arg(options.model)
    return run_training_stage("GRPO", run_grpo, options, args, _print_summary, "model and SPRM head")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_summary(summary: dict) -> None:
    first, last = summary.get("first", {}), summary.get("last", {})
    print(f"steps {summary.get('steps')}  time {summary.get('train_time_s', 0):.1f} s  "
          f"reward {_fmt(first.get('reward_mean'))} -> {_fmt(last.get('reward_mean'))}  "
          f"SPRM score correct/wrong {_fmt(last.get('score_correct'))}/{_fmt(last.get('score_wrong'))}  "
          f"pair accuracy {_fmt(last.get('score_pair_acc'))}")
    refit = summary.get("head_refit")
    if refit and "skipped" in refit:
        print(f"head refit skipped: {refit['skipped']}")
    elif refit:
        print(f"head refit: {refit['inputs']} inputs, {refit['aggregation']} aggregation, held-out pair accuracy "
              f"{_fmt(refit['val_pair_accuracy'])} on {refit['val_questions']} training questions, "
              f"{refit['rollouts']} rollouts, {refit['time_s']:.0f} s")
    for key in ("eval_before", "eval"):
        if key in summary:
            ev = summary[key]
            parts = ", ".join(f"{k} {_fmt(v) if isinstance(v, float) or v is None else v}" for k, v in ev.items())
            print(f"{'before' if key == 'eval_before' else 'after'}: {parts}")

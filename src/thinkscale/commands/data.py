"""`thinkscale data`: a task's train / test / hard splits as JSONL, for sft, grpo and eval.

    thinkscale data --task countdown --out data/countdown               # the demo's sizes and seed 0
    thinkscale data --task arithmetic --seed 1 --train 0 --hard 0 --out data/arith-seed1   # a second test set
    thinkscale data --task gym:chain_sum:max_terms=3 --out data/chain_sum  # a reasoning-gym dataset

Questions of the test and hard splits come from the task's evaluation pool (a hash of the question
text), so they never appear in any seed's training split; `--exclude FILE` also drops the questions of
another split (e.g. the demo's own test set), so a second test set is disjoint from the first.
"""
from __future__ import annotations

import argparse

from thinkscale.commands.argtypes import ensure_writable_dir, non_negative_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thinkscale.tasks.registry import help_text

    parser.add_argument("--task", default="arithmetic", metavar="TASK",
                        help="the task (default arithmetic): " + help_text())
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for train.jsonl, test.jsonl, hard.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0, as the demo)")
    parser.add_argument("--train", type=non_negative_int, default=None,
                        help="training questions (default: the demo's, 20000 arithmetic / 8000 countdown / "
                             "2000 gym:NAME)")
    parser.add_argument("--test", type=non_negative_int, default=200, help="test questions (default 200)")
    parser.add_argument("--hard", type=non_negative_int, default=100, help="hard questions (default 100)")
    parser.add_argument("--exclude", metavar="FILE", action="append", default=[],
                        help="a JSONL file whose questions no split may contain (repeatable)")


def run(args: argparse.Namespace) -> int:
    from thinkscale.tasks.jsonl import read_examples, write_jsonl
    from thinkscale.tasks.registry import get_task

    task = get_task(args.task)
    if args.train is None:
        args.train = task.demo_num_train
    excluded = {e.question for path in args.exclude for e in read_examples(path)}
    out = ensure_writable_dir(args.out)
    # draw extra questions, then drop the excluded ones, so every split keeps its size
    spare = len(excluded)
    splits = task.make_splits(task.demo_config, args.seed, args.train + spare, args.test + spare,
                              args.hard + spare, hard_config=task.demo_hard_config)
    sizes = {"train": args.train, "test": args.test, "hard": args.hard}
    for name, problems in splits.items():
        kept = [p for p in problems if p.question not in excluded][: sizes[name]]
        write_jsonl(out / f"{name}.jsonl", (p.to_record() for p in kept))
        print(f"{out / f'{name}.jsonl'}: {len(kept)} {args.task} questions")
    return 0

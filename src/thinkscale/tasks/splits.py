"""Seeded, disjoint splits for any built-in task: one home for drawing distinct problems.

A task supplies `random_problem(rng, config) -> Problem`; these functions turn it into `n` distinct
problems of a split and into train / test / hard splits. Splits are disjoint by construction: a stable
hash of the question text (`in_eval_pool`) puts it in the training pool or the evaluation pool; test and
hard draw from the evaluation pool, and hard skips the test questions.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable

SPLITS = ("train", "test", "hard")
EVAL_POOL_FRACTION = 0.1  # share of all questions reserved for test/hard (by hash of the text)
# A run of this many misses in a row (x10 for the evaluation pool, which takes ~1 draw in 10) means the
# problem space is (nearly) used up: fail in seconds instead of grinding on.
MAX_MISSES_IN_A_ROW = 20_000


def in_eval_pool(question: str) -> bool:
    """Whether `question` belongs to the evaluation pool (test/hard) rather than training; stable across runs."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < EVAL_POOL_FRACTION


def draw_distinct(random_problem: Callable, config, n: int, seed: int, split: str, exclude, task: str,
                  hint: str) -> list:
    """`n` distinct problems of `split`, deterministic for (config, n, seed, split, exclude).

    `task` names the random stream; `hint` says how to enlarge the space when it is too small.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    want_eval = split != "train"
    rng = random.Random(f"thinkscale-{task}:{seed}:{split}")
    problems: list = []
    seen: set[str] = set(exclude)
    misses, max_misses = 0, MAX_MISSES_IN_A_ROW * (10 if want_eval else 1)
    while len(problems) < n:
        problem = random_problem(rng, config)
        if problem.question in seen or in_eval_pool(problem.question) != want_eval:
            misses += 1
            if misses > max_misses:
                raise ValueError(f"found only {len(problems)} of {n} distinct {split} problems; the problem "
                                 f"space of {config} is too small: {hint}")
            continue
        seen.add(problem.question)
        problems.append(problem)
        misses = 0
    return problems


def make_splits(generate: Callable, config, seed: int, n_train: int, n_test: int, n_hard: int = 0,
                hard_config=None) -> dict[str, list]:
    """Train, test and hard splits with pairwise disjoint questions (`generate` is a task's); hard uses
    `config.harder()` by default."""
    test = generate(config, n_test, seed, "test")
    hard_config = config.harder() if hard_config is None else hard_config
    return {
        "train": generate(config, n_train, seed, "train"),
        "test": test,
        "hard": generate(hard_config, n_hard, seed, "hard", exclude={p.question for p in test}),
    }

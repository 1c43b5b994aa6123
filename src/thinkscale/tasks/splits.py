"""Seeded, disjoint splits for any task: one home for drawing distinct problems.

A built-in task supplies `random_problem(rng, config) -> Problem` (`draw_distinct`), a task source with
its own generator an endless stream of problems (`take_distinct`, e.g. `tasks.gym`); these functions
turn either into `n` distinct problems of a split and into train / test / hard splits. Splits are
disjoint by construction: a stable hash of the question text (`in_eval_pool`) puts it in the training
pool or the evaluation pool; test and hard draw from the evaluation pool, and hard skips the test
questions.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from typing import Callable, Iterable

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
    rng = random.Random(f"thinkscale-{task}:{seed}:{split}")
    return take_distinct((random_problem(rng, config) for _ in itertools.count()), n, split, exclude,
                         space=str(config), hint=hint)


def take_distinct(problems: Iterable, n: int, split: str, exclude, space: str, hint: str,
                  max_misses_in_a_row: int = MAX_MISSES_IN_A_ROW) -> list:
    """The first `n` problems of the endless stream `problems` that belong to `split`'s pool (by
    `in_eval_pool`), skipping repeats and questions in `exclude`.

    `space` names the problem space in the error raised when it runs dry (after `max_misses_in_a_row`
    problems in a row, x10 for test and hard, were not taken), `hint` says how to enlarge it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    want_eval = split != "train"
    found: list = []
    seen: set[str] = set(exclude)
    misses, max_misses = 0, max_misses_in_a_row * (10 if want_eval else 1)
    stream = iter(problems)
    while len(found) < n:
        problem = next(stream)
        if problem.question in seen or in_eval_pool(problem.question) != want_eval:
            misses += 1
            if misses > max_misses:
                raise ValueError(f"found only {len(found)} of {n} distinct {split} problems; the problem "
                                 f"space of {space} is too small: {hint}")
            continue
        seen.add(problem.question)
        found.append(problem)
        misses = 0
    return found


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

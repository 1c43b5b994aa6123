"""The built-in reasoning task: seeded multi-step integer arithmetic, solved one operation per step.

    question:   What is (23 + 58) * 3 - 17?
    completion: 23 + 58 = 81.\\n\\n81 * 3 = 243.\\n\\n243 - 17 = 226.\\n\\n</think>\\n\\boxed{226}

Designed so a tiny model learns it from scratch in minutes: steps follow evaluation order (left
operand first), each step is one operation whose operands were either in the question or computed in
the previous steps, and every intermediate value is an integer inside [min_value, max_value]
(division only when exact). Questions print with the fewest parentheses that still parse back to the
same expression tree, so the step order is determined by the question alone.

Splits are disjoint by construction: a stable hash of the question text assigns it to the training
pool or to the evaluation pool; `test` and `hard` draw from the evaluation pool (and `hard` skips
questions already in `test`), so a question never appears in two splits whatever the sizes asked for.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Union

from . import format_completion, format_prompt, splits
from .splits import SPLITS, draw_distinct, in_eval_pool  # noqa: F401 (in_eval_pool: part of this module's API)

OPERATORS = ("+", "-", "*", "/")
SHAPES = ("chain", "tree")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_MAX_ATTEMPTS_PER_PROBLEM = 2000


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty knobs of the arithmetic task.

    min_ops/max_ops: operations (= reasoning steps) per problem, drawn uniformly.
    min_digits/max_digits: digits per operand, drawn uniformly (operands have no leading zero, are >= 1).
    operators: any of "+", "-", "*", "/" ("/" only ever appears as an exact division).
    max_value: bound on |every intermediate value|; negative values only when allow_negative.
    shape: "chain" = left to right, e.g. (23 + 58) * 3 - 17; "tree" = random expression trees,
        e.g. 23 + 58 * (3 - 1), which also need operator precedence and parentheses.
    """

    min_ops: int = 2
    max_ops: int = 4
    min_digits: int = 1
    max_digits: int = 2
    operators: tuple[str, ...] = ("+", "-", "*")
    max_value: int = 999
    allow_negative: bool = False
    shape: str = "chain"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, max_ops={self.max_ops}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got min_digits={self.min_digits}, max_digits={self.max_digits}"
            )
        if isinstance(self.operators, str) or not self.operators:
            raise TypeError(f"operators must be a non-empty tuple drawn from {OPERATORS}, got {self.operators!r}")
        unknown = [op for op in self.operators if op not in OPERATORS]
        if unknown:
            raise ValueError(f"unknown operators {unknown}; allowed: {OPERATORS}")
        if self.max_value < 10 ** self.min_digits - 1:
            raise ValueError(
                f"max_value={self.max_value} is below the smallest {self.min_digits}-digit operands can reach; "
                f"use at least {10 ** self.min_digits - 1}"
            )
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; allowed: {SHAPES}")

    def harder(self) -> "ArithmeticConfig":
        """The held-out harder setting: two more operations and one more digit than this config allows."""
        return replace(
            self,
            min_ops=self.max_ops + 1,
            max_ops=self.max_ops + 2,
            max_digits=self.max_digits + 1,
            max_value=self.max_value * 10 + 9,
        )


@dataclass(frozen=True)
class Problem:
    """One question with its exact answer and its solution steps (each "a op b = c", no delimiter)."""

    question: str
    answer: str
    steps: tuple[str, ...] = field(default=())

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def completion(self) -> str:
        """The target text after the prompt (the tokenizer appends EOS)."""
        return format_completion(self.steps, self.answer)

    def to_record(self) -> dict:
        """A JSONL record in the format `tasks.jsonl` reads."""
        return {"question": self.question, "answer": self.answer, "solution": self.completion}


# An expression tree: an int leaf, or (operator, left, right).
Expr = Union[int, tuple]


class _Rejected(Exception):
    """A drawn problem broke a constraint (range, exact division); draw again."""


def _random_skeleton(rng: random.Random, n_ops: int, config: ArithmeticConfig):
    """Tree shape with operators and empty leaves (None), `n_ops` internal nodes."""
    if n_ops == 0:
        return None
    op = rng.choice(config.operators)
    if config.shape == "chain":
        return (op, _random_skeleton(rng, n_ops - 1, config), None)
    n_left = rng.randint(0, n_ops - 1)
    return (op, _random_skeleton(rng, n_left, config), _random_skeleton(rng, n_ops - 1 - n_left, config))


def _random_operand(rng: random.Random, config: ArithmeticConfig) -> int:
    digits = rng.randint(config.min_digits, config.max_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or a % b != 0:
        raise _Rejected
    return a // b


def _fill(rng: random.Random, skeleton, config: ArithmeticConfig, steps: list[str]) -> tuple[Expr, int]:
    """Draw leaves in evaluation order and evaluate; appends one step per operation to `steps`."""
    if skeleton is None:
        value = _random_operand(rng, config)
        return value, value
    op, left_skeleton, right_skeleton = skeleton
    left, a = _fill(rng, left_skeleton, config, steps)
    if op == "/" and right_skeleton is None:
        # Draw the divisor among the exact divisors of the left value, so division is not mostly rejected.
        lo, hi = 10 ** (config.min_digits - 1), 10**config.max_digits - 1
        divisors = [d for d in range(max(lo, 2), min(hi, abs(a)) + 1) if a % d == 0]
        if not divisors:
            raise _Rejected
        right = b = rng.choice(divisors)
    else:
        right, b = _fill(rng, right_skeleton, config, steps)
    value = _apply(op, a, b)
    lowest = -config.max_value if config.allow_negative else 0
    if not lowest <= value <= config.max_value:
        raise _Rejected
    steps.append(f"{a} {op} {b} = {value}")
    return (op, left, right), value


def render(expr: Expr) -> str:
    """The expression with the fewest parentheses that still parse back to the same tree."""
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr
    left_text, right_text = render(left), render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        left_text = f"({left_text})"
    # A right operand of equal precedence needs parentheses too: `a + (b + c)` is a different tree
    # (and a different step order) from `a + b + c`.
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}"


def random_problem(rng: random.Random, config: ArithmeticConfig) -> Problem:
    """One problem drawn from `rng` (rejection sampling until every constraint holds)."""
    # Draw the number of operations once: retrying it with the rest would favour short problems,
    # which stay in range more often.
    n_ops = rng.randint(config.min_ops, config.max_ops)
    for _ in range(_MAX_ATTEMPTS_PER_PROBLEM):
        skeleton = _random_skeleton(rng, n_ops, config)
        steps: list[str] = []
        try:
            expr, value = _fill(rng, skeleton, config, steps)
        except _Rejected:
            continue
        return Problem(question=f"{_QUESTION_PREFIX}{render(expr)}{_QUESTION_SUFFIX}", answer=str(value),
                       steps=tuple(steps))
    raise ValueError(
        f"could not draw a problem within max_value={config.max_value} in {_MAX_ATTEMPTS_PER_PROBLEM} "
        f"attempts; raise max_value or use fewer operations/digits ({config})"
    )


_QUESTION_PREFIX, _QUESTION_SUFFIX = "What is ", "?"


def parse_expression(text: str) -> Expr:
    """The expression tree of `render`'s output (integers, + - * /, parentheses; usual precedence,
    left-associative). ValueError on anything else."""
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"expression ends early: {text!r}")
        pos += 1
        return tokens[pos - 1]

    def atom() -> Expr:
        token = take()
        if token == "(":
            inner = level(1)
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {text!r}")
            return inner
        if not token.isdigit():
            raise ValueError(f"unexpected {token!r} in {text!r}")
        return int(token)

    def level(precedence: int) -> Expr:
        left = atom() if precedence == 2 else level(2)
        while peek() in _PRECEDENCE and _PRECEDENCE[peek()] == precedence:
            op = take()
            left = (op, left, atom() if precedence == 2 else level(2))
        return left

    tree = level(1)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} in {text!r}")
    return tree


def solution_steps(question: str) -> list[str]:
    """The reference steps of a question of this task, in evaluation order ("a op b = c")."""
    if not (question.startswith(_QUESTION_PREFIX) and question.endswith(_QUESTION_SUFFIX)):
        raise ValueError(f"not an arithmetic question: {question!r}")
    steps: list[str] = []

    def walk(expr: Expr) -> int:
        if isinstance(expr, int):
            return expr
        op, left, right = expr
        a, b = walk(left), walk(right)
        if op == "/" and (b == 0 or a % b):
            raise ValueError(f"inexact division {a} / {b} in {question!r}")
        value = _apply(op, a, b)
        steps.append(f"{a} {op} {b} = {value}")
        return value

    walk(parse_expression(question[len(_QUESTION_PREFIX):-len(_QUESTION_SUFFIX)]))
    return steps


def step_truth(question: str, steps: list[str]) -> list[bool]:
    """Per generated step: True while the steps so far are the solution's steps (order is determined by
    the question, so this is "the equation is right and follows a valid solution"); False from the
    first deviation on, and for any step beyond the solution's end."""
    reference = solution_steps(question)
    truth, on_track = [], True
    for j, step in enumerate(steps):
        on_track = on_track and j < len(reference) and " ".join(step.split()) == reference[j]
        truth.append(on_track)
    return truth


def generate(
    config: ArithmeticConfig,
    n: int,
    seed: int,
    split: str = "train",
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[Problem]:
    """`n` distinct problems for `split`, deterministic for (config, n, seed, split, exclude).

    "train" draws from the training pool, "test" and "hard" from the evaluation pool (see the module docstring);
    `config` decides the difficulty, so pass `config.harder()` for the hard split. Questions in
    `exclude` are skipped.
    """
    return draw_distinct(random_problem, config, n, seed, split, exclude, task="arithmetic", hint="allow more operations, digits or operators")


def make_splits(
    config: ArithmeticConfig,
    seed: int,
    n_train: int,
    n_test: int,
    n_hard: int = 0,
    hard_config: ArithmeticConfig | None = None,
) -> dict[str, list[Problem]]:
    """Train, test and hard splits with pairwise disjoint questions; hard uses `config.harder()` by default."""
    return splits.make_splits(generate, config, seed, n_train, n_test, n_hard, hard_config)
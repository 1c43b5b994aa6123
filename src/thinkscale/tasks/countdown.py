"""The "reach the target" task (Countdown-style): combine the given numbers into the target.

    question:   Make 72 from 3, 5, 8, 8 with + - * /, using each number once.
    completion: 8 - 5 = 3.\\n\\n8 * 3 = 24.\\n\\n24 * 3 = 72.\\n\\n</think>\\n\\boxed{8 * (8 - 5) * 3}

The rules (the same for generation, `solvable`, `solutions` and `step_truth`):
- each step combines two available numbers, `a op b = c`, with an operator the question lists; a
  number is available when it is in the question or is the result of an earlier step, and each
  available number is used once (the two operands are consumed, the result becomes available);
- every result is a non-negative integer no larger than `max_value`; division only when exact;
- every number is used: after the last step one number is left, and it is the target.

The answer is the whole expression built from the steps, printed with the fewest parentheses that
parse back to the same expression tree. Many different expressions are right (`is_solution` checks
the numbers used and the exact value, not the text), so majority voting over answer texts is weak:
votes are counted on `normalize_answer`, under which two different correct expressions stay apart.

Generation draws the numbers, then a random computation: a random pair of the available numbers
(larger one first), a random operator among those whose result obeys the rules, repeated until one
number is left; that number is the target. Draws whose target is out of [min_target, max_target]
(or, by default, equal to one of the input numbers) are rejected. The question lists the numbers
sorted, so one puzzle has one question text. Splits are disjoint by question text exactly as in
`arithmetic` (the same hash-based evaluation pool).
"""
from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Union

from . import splits
from .arithmetic import Problem
from .grading import extract_answer
from .splits import draw_distinct

__all__ = [
    "OPERATORS",
    "MAX_NUMBERS",
    "MAX_EXPRESSION_CHARS",
    "CountdownConfig",
    "Problem",
    "format_question",
    "parse_question",
    "parse_expression",
    "evaluate_expression",
    "render",
    "normalize_answer",
    "is_solution",
    "grade",
    "solvable",
    "solutions",
    "step_truth",
    "random_problem",
    "generate",
    "make_splits",
]

OPERATORS = ("+", "-", "*", "/")
MAX_NUMBERS = 6  # the exhaustive solver behind step_truth is exponential in the count of numbers
MAX_EXPRESSION_CHARS = 200  # longer answers are rejected before parsing (bounds time and recursion)
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_MAX_ATTEMPTS_PER_PROBLEM = 2000
_DIGITS = "0123456789"  # str.isdigit() would also accept other scripts' digits
_WHITESPACE = " \t\r\n"
_INT = r"(?:0|[1-9][0-9]*)"  # no leading zeros: one number, one spelling
_QUESTION = re.compile(rf"Make ({_INT}) from ({_INT}(?:, {_INT})+) with ([^,]+), using each number once\.")
_STEP = re.compile(rf"\s*({_INT})\s*([-+*/])\s*({_INT})\s*=\s*({_INT})\s*")

# An expression tree: an int leaf, or (operator, left, right).
Expr = Union[int, tuple]


@dataclass(frozen=True)
class CountdownConfig:
    """Difficulty knobs and rules of the countdown task.

    n_numbers: how many numbers each question gives (= steps + 1); `harder()` adds one.
    min_operand/max_operand: range of the given numbers (drawn uniformly, repeats allowed).
    operators: any of "+", "-", "*", "/"; the question lists them, so they are part of the puzzle.
    max_value: bound on every step result (results are integers in [0, max_value], "/" only exact).
    min_target/max_target: range of the target.
    allow_target_in_numbers: accept a target equal to one of the given numbers (rejected by default:
        such a puzzle is often solved by cancelling the other numbers away).

    The defaults suit a ~1M-parameter model learning from scratch in minutes: 3 numbers mean two
    steps per problem; max_value = 100 keeps every step a small operation on numbers of at most 3
    digits (the arithmetic task's default already uses 2-digit operands); all four operators keep
    several routes open to most targets (the point of the task: a step can be right or a dead end),
    and exact division is cheap to check. Operands go up to 20 rather than 9 because 3 numbers from
    1-9 make only ~1,400 distinct puzzles with a target in [10, 100] (~160 in the evaluation pool,
    too few for a 200-question test split); 1-20 make ~11,500 (~1,150 in the evaluation pool).
    Targets start at 10 so a target is rarely a single given number moved by one trivial step.
    """

    n_numbers: int = 3
    min_operand: int = 1
    max_operand: int = 20
    operators: tuple[str, ...] = OPERATORS
    max_value: int = 100
    min_target: int = 10
    max_target: int = 100
    allow_target_in_numbers: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.n_numbers <= MAX_NUMBERS:
            raise ValueError(f"need 2 <= n_numbers <= {MAX_NUMBERS}, got n_numbers={self.n_numbers}")
        if not 1 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"need 1 <= min_operand <= max_operand, got min_operand={self.min_operand}, "
                f"max_operand={self.max_operand}"
            )
        if isinstance(self.operators, str) or not self.operators:
            raise TypeError(f"operators must be a non-empty tuple drawn from {OPERATORS}, got {self.operators!r}")
        unknown = [op for op in self.operators if op not in OPERATORS]
        if unknown:
            raise ValueError(f"unknown operators {unknown}; allowed: {OPERATORS}")
        if self.max_value < self.max_operand:
            raise ValueError(f"max_value={self.max_value} is below max_operand={self.max_operand}")
        if not 0 <= self.min_target <= self.max_target <= self.max_value:
            raise ValueError(
                f"need 0 <= min_target <= max_target <= max_value, got min_target={self.min_target}, "
                f"max_target={self.max_target}, max_value={self.max_value}"
            )

    def harder(self) -> "CountdownConfig":
        """The held-out harder setting: one more number (one more step, a larger search)."""
        return replace(self, n_numbers=self.n_numbers + 1)


# ---------------------------------------------------------------- questions

def _canonical_operators(operators: Sequence[str]) -> tuple[str, ...]:
    """`operators` in the fixed order of OPERATORS, without repeats (how a question lists them)."""
    return tuple(op for op in OPERATORS if op in operators)


def format_question(numbers: Sequence[int], target: int, operators: Sequence[str] = OPERATORS) -> str:
    """The question text; numbers are sorted so that one puzzle has exactly one question."""
    listed = ", ".join(str(n) for n in sorted(numbers))
    return f"Make {target} from {listed} with {' '.join(_canonical_operators(operators))}, using each number once."


def _parse_question(question: str) -> tuple[tuple[int, ...], int, tuple[str, ...]]:
    """(numbers, target, operators) of a countdown question; ValueError if it is not one."""
    match = _QUESTION.fullmatch(question) if isinstance(question, str) else None
    if match is None:
        raise ValueError(f"not a countdown question: {question!r}")
    target, listed, ops_text = match.group(1), match.group(2), match.group(3)
    operators = tuple(ops_text.split(" "))
    if not operators or any(op not in OPERATORS for op in operators) or len(set(operators)) != len(operators):
        raise ValueError(f"not a countdown question (operators {ops_text!r}): {question!r}")
    return tuple(int(n) for n in listed.split(", ")), int(target), operators


def parse_question(question: str) -> tuple[tuple[int, ...], int]:
    """(numbers, target) of a question written by `format_question`; ValueError if it is not one."""
    numbers, target, _ = _parse_question(question)
    return numbers, target


# ---------------------------------------------------------------- expressions

def _tokenize(text: str) -> list[Union[int, str]]:
    """Integers (no leading zeros), operators and parentheses; whitespace is skipped."""
    tokens: list[Union[int, str]] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in _WHITESPACE:
            i += 1
        elif char in "+-*/()":
            tokens.append(char)
            i += 1
        elif char in _DIGITS:
            j = i
            while j < len(text) and text[j] in _DIGITS:
                j += 1
            literal = text[i:j]
            if len(literal) > 1 and literal[0] == "0":
                raise ValueError(f"number with a leading zero: {literal!r}")
            tokens.append(int(literal))
            i = j
        else:
            raise ValueError(f"unexpected character {char!r} at position {i} of {text!r}")
    return tokens


class _Parser:
    """Recursive descent, one method per rule (operators are left-associative):

        expression := term (("+" | "-") term)*
        term       := factor (("*" | "/") factor)*
        factor     := integer | "(" expression ")"
    """

    def __init__(self, tokens: list[Union[int, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> Union[int, str, None]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expression(self) -> Expr:
        tree = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            tree = (op, tree, self.term())
        return tree

    def term(self) -> Expr:
        tree = self.factor()
        while self.peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            tree = (op, tree, self.factor())
        return tree

    def factor(self) -> Expr:
        token = self.peek()
        if isinstance(token, int):
            self.pos += 1
            return token
        if token == "(":
            self.pos += 1
            tree = self.expression()
            if self.peek() != ")":
                raise ValueError("missing closing parenthesis")
            self.pos += 1
            return tree
        raise ValueError("expected a number or '(' but the expression ended" if token is None
                         else f"expected a number or '(', got {token!r}")


def parse_expression(text: str) -> Expr:
    """The expression tree of `text` (integers, + - * /, parentheses, spaces); ValueError if malformed."""
    if not isinstance(text, str):
        raise ValueError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters ({len(text)})")
    parser = _Parser(_tokenize(text))
    tree = parser.expression()
    if parser.peek() is not None:
        raise ValueError(f"unexpected {parser.peek()!r} after a complete expression in {text!r}")
    return tree


def _value(expr: Expr) -> Fraction:
    """The exact value of a tree (any rational, negative included); ValueError on division by zero."""
    if isinstance(expr, int):
        return Fraction(expr)
    op, left, right = expr
    a, b = _value(left), _value(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ValueError("division by zero")
    return a / b


def _leaves(expr: Expr) -> list[int]:
    return [expr] if isinstance(expr, int) else _leaves(expr[1]) + _leaves(expr[2])


def _operators_used(expr: Expr) -> set[str]:
    return set() if isinstance(expr, int) else {expr[0]} | _operators_used(expr[1]) | _operators_used(expr[2])


def evaluate_expression(text: str) -> tuple[Fraction, tuple[int, ...]]:
    """(exact value, sorted integer literals) of an expression; ValueError if malformed or dividing by 0."""
    tree = parse_expression(text)
    return _value(tree), tuple(sorted(_leaves(tree)))


def render(expr: Expr) -> str:
    """The expression with the fewest parentheses that still parse back to the same tree."""
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr
    left_text, right_text = render(left), render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        left_text = f"({left_text})"
    # A right operand of equal precedence keeps its parentheses: `a - (b - c)` is another value and
    # `a + (b + c)` another tree (another order of steps) than `a + b + c`.
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}"


def normalize_answer(answer: str) -> str:
    """The text an answer votes with: whitespace and redundant parentheses removed.

    A well-formed expression is re-rendered from its tree, so `((8-5)*8)*3` and `(8 - 5) * 8 * 3`
    vote together, while a different tree (`8 * (8 - 5) * 3`, `(8 - 5) * (8 * 3)`) is a different
    vote even when it is just as correct. Malformed text only loses its whitespace.
    """
    try:
        text = render(parse_expression(answer))
    except ValueError:
        text = str(answer)
    return "".join(text.split())


# ---------------------------------------------------------------- grading

def is_solution(question: str, answer: str | None) -> bool:
    """Whether `answer` uses exactly the question's numbers (as a multiset), only the question's
    operators, and equals the target exactly. Never raises: None or malformed text is False.

    Only the final expression is checked, so intermediate values may be fractions or negative here
    (`8 / (3 - 8 / 3)` makes 24 from 3, 3, 8, 8); the step rules apply to the steps (`step_truth`).
    """
    if not isinstance(answer, str):
        return False
    try:
        numbers, target, operators = _parse_question(question)
        tree = parse_expression(answer)
        value = _value(tree)
    except ValueError:
        return False
    return sorted(_leaves(tree)) == sorted(numbers) and _operators_used(tree) <= set(operators) and value == target


def grade(text: str, question: str, think_end: str | None = "</think>") -> bool:
    """Whether a completion's final answer (its last \\boxed{} after `think_end`) solves `question`."""
    return is_solution(question, extract_answer(text, think_end=think_end))


# ---------------------------------------------------------------- rules and solver

def _combine(op: str, a: int, b: int, max_value: int) -> int | None:
    """The result of the step `a op b`, or None if the rules forbid it (negative, inexact, too big)."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif b == 0 or a % b != 0:
        return None
    else:
        c = a // b
    return c if 0 <= c <= max_value else None


# Bounded: a value set holds up to max_value + 1 ints, and a long training run meets many multisets.
@functools.lru_cache(maxsize=1 << 15)
def _reachable(numbers: tuple[int, ...], operators: tuple[str, ...], max_value: int) -> frozenset[int]:
    """Every value that the sorted multiset `numbers` can end as, under the step rules.

    Memoized on the multiset: step orders that meet in the same remaining numbers share the work, and
    so do questions with the same numbers, whatever their targets.
    """
    if len(numbers) == 1:
        return frozenset(numbers)
    values: set[int] = set()
    seen: set[tuple[int, int]] = set()
    for i in range(len(numbers)):
        for j in range(len(numbers)):
            a, b = numbers[i], numbers[j]
            if i == j or (a, b) in seen:  # equal values give equal sub-problems
                continue
            seen.add((a, b))
            rest = numbers[:min(i, j)] + numbers[min(i, j) + 1:max(i, j)] + numbers[max(i, j) + 1:]
            for op in operators:
                c = _combine(op, a, b, max_value)
                if c is not None:
                    values |= _reachable(tuple(sorted(rest + (c,))), operators, max_value)
    return frozenset(values)


def _can_reach(numbers: Sequence[int], target: int, operators: Sequence[str], max_value: int) -> bool:
    if not numbers:
        raise ValueError("need at least one number")
    return target in _reachable(tuple(sorted(numbers)), _canonical_operators(operators), max_value)


def solvable(numbers: Sequence[int], target: int, config: CountdownConfig | None = None) -> bool:
    """Whether `numbers` (each used once, all of them) can reach `target` under the step rules of
    `config` (its operators and max_value; the default config if None). A single number must equal it."""
    config = CountdownConfig() if config is None else config
    return _can_reach(numbers, target, config.operators, config.max_value)


def solutions(numbers: Sequence[int], target: int, config: CountdownConfig | None = None) -> list[str]:
    """Every distinct expression (rendered, sorted) that reaches `target` under the step rules.

    Distinct trees count apart (`3 * 8` and `8 * 3` are two), as they do in a vote on
    `normalize_answer`. Exhaustive, for tests and statistics: it grows factorially with the numbers.
    """
    config = CountdownConfig() if config is None else config
    numbers = tuple(numbers)
    if not numbers:
        raise ValueError("need at least one number")

    @functools.lru_cache(maxsize=None)
    def trees(mask: int) -> list[tuple[int, Expr]]:
        """(value, tree) of every tree over the numbers whose indices are the bits of `mask`."""
        members = [i for i in range(len(numbers)) if mask >> i & 1]
        if len(members) == 1:
            return [(numbers[members[0]], numbers[members[0]])]
        found = []
        left_mask = (mask - 1) & mask
        while left_mask:  # every split into a non-empty left part and a non-empty right part
            for a, left in trees(left_mask):
                for b, right in trees(mask ^ left_mask):
                    for op in config.operators:
                        c = _combine(op, a, b, config.max_value)
                        if c is not None:
                            found.append((c, (op, left, right)))
            left_mask = (left_mask - 1) & mask
        return found

    return sorted({render(tree) for value, tree in trees((1 << len(numbers)) - 1) if value == target})


def step_truth(question: str, steps: Sequence[str], config: CountdownConfig | None = None) -> list[bool]:
    """Per step (text without the delimiter): is the solution still on track after it?

    A step is True iff it and every step before it are well-formed `a op b = c` with a and b
    available (see the module docstring), an operator the question lists, c exactly a op b within
    the rules (`config.max_value`, default config if None), and the numbers left after it can still
    reach the target (one number left: it is the target). After the first False step every step is
    False, as is any step once all numbers are combined. ValueError if `question` is not a countdown
    question.
    """
    config = CountdownConfig() if config is None else config
    numbers, target, operators = _parse_question(question)
    available = Counter(numbers)
    truth: list[bool] = []
    on_track = True
    for step in steps:
        on_track = on_track and _apply_step(step, available, operators, config.max_value)
        on_track = on_track and _can_reach(list(available.elements()), target, operators, config.max_value)
        truth.append(on_track)
    return truth


def _apply_step(step: str, available: Counter, operators: Sequence[str], max_value: int) -> bool:
    """Check one step against the `available` numbers and, if it is valid, apply it (in place)."""
    # Length first: int() refuses numbers of thousands of digits, and a step is never that long.
    match = _STEP.fullmatch(step) if isinstance(step, str) and len(step) <= MAX_EXPRESSION_CHARS else None
    if match is None:
        return False
    a, op, b, c = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
    needed = Counter([a, b])
    if op not in operators or any(available[n] < k for n, k in needed.items()):
        return False
    if _combine(op, a, b, max_value) != c:
        return False
    available.subtract(needed)
    available[c] += 1
    return True


# ---------------------------------------------------------------- generation

def _random_computation(
    rng: random.Random, numbers: list[int], config: CountdownConfig
) -> tuple[Expr, int, list[str]] | None:
    """Combine random pairs with random legal operators until one number is left.

    Returns (tree, final value, steps), or None when some pair has no legal operator (possible when
    "-" is not allowed).
    """
    items: list[tuple[int, Expr]] = [(n, n) for n in numbers]
    steps: list[str] = []
    while len(items) > 1:
        i, j = sorted(rng.sample(range(len(items)), 2))
        second, first = items.pop(j), items.pop(i)
        # Larger operand first: "-" and "/" can then always be tried, and the steps read uniformly.
        (a, left), (b, right) = sorted([first, second], key=lambda item: item[0], reverse=True)
        legal = []
        for op in config.operators:
            c = _combine(op, a, b, config.max_value)
            if c is not None:
                legal.append((op, c))
        if not legal:
            return None
        op, c = rng.choice(legal)
        steps.append(f"{a} {op} {b} = {c}")
        items.append((c, (op, left, right)))
    value, tree = items[0]
    return tree, value, steps


def random_problem(rng: random.Random, config: CountdownConfig) -> Problem:
    """One problem drawn from `rng` (rejection sampling until the target constraints hold)."""
    for _ in range(_MAX_ATTEMPTS_PER_PROBLEM):
        numbers = [rng.randint(config.min_operand, config.max_operand) for _ in range(config.n_numbers)]
        drawn = _random_computation(rng, numbers, config)
        if drawn is None:
            continue
        tree, target, steps = drawn
        if not config.min_target <= target <= config.max_target:
            continue
        if not config.allow_target_in_numbers and target in numbers:
            continue
        question = format_question(numbers, target, config.operators)
        return Problem(question=question, answer=render(tree), steps=tuple(steps))
    raise ValueError(
        f"could not draw a target in [{config.min_target}, {config.max_target}] in "
        f"{_MAX_ATTEMPTS_PER_PROBLEM} attempts; widen the target range or change the operands ({config})"
    )


def generate(
    config: CountdownConfig,
    n: int,
    seed: int,
    split: str = "train",
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[Problem]:
    """`n` distinct problems for `split`, deterministic for (config, n, seed, split, exclude).

    "train" draws from the training pool, "test" and "hard" from the evaluation pool (`splits.in_eval_pool`);
    `config` decides the difficulty, so pass `config.harder()` for the hard split. Questions in
    `exclude` are skipped.
    """
    return draw_distinct(random_problem, config, n, seed, split, exclude, task="countdown", hint="allow more numbers, a wider operand or target range")


def make_splits(
    config: CountdownConfig,
    seed: int,
    n_train: int,
    n_test: int,
    n_hard: int = 0,
    hard_config: CountdownConfig | None = None,
) -> dict[str, list[Problem]]:
    """Train, test and hard splits with pairwise disjoint questions; hard uses `config.harder()` by default."""
    return splits.make_splits(generate, config, seed, n_train, n_test, n_hard, hard_config)
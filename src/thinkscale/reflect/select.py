"""Pick one candidate out of k: best-of-N by SPRM score, votes over answers, and reasoning effort.

Every strategy has one signature, `strategy(candidates, answers, ballot) -> index into candidates`,
and lives in one registry, `STRATEGIES`; `select` is the only entry point. Ties are always broken by
the lowest `sample_index`, so a result never depends on the order of the list.

- sprm:     the highest trajectory score.
- majority: the most common answer class (answers grouped by `answers_equivalent`); ties go to the
            class with the larger total SPRM score, then to the class whose first member came first.
- weighted: the answer class with the largest total SPRM score; ties go to the larger class, then to
            the class whose first member came first.
- first:    sample 0 (what pass@1 measures).
- oracle:   a correct candidate when any is (pass@k; needs the reference, for evaluation only).

In a vote, candidates without an answer never win unless no candidate has one; the candidate returned
for a winning class is its highest-scored member.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .candidate import Candidate
from .grade import DEFAULT_TIMEOUT_S, answers_equivalent, extract_answer, reference_to_answer

EFFORT_K: dict[str, int] = {"low": 2, "medium": 8, "high": 32}


def effort_to_k(mode: str, table: dict[str, int] | None = None) -> int:
    """Number of samples for a reasoning-effort mode ("low"/"medium"/"high" by default)."""
    table = EFFORT_K if table is None else table
    if mode not in table:
        raise ValueError(f"unknown reasoning effort {mode!r}; valid: {', '.join(table)}")
    k = table[mode]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"reasoning effort {mode!r} maps to k={k!r}; k must be a positive integer")
    return k


@dataclass(frozen=True)
class Ballot:
    """What a strategy may consult beyond the candidates themselves."""

    reference: str | None = None
    correct: tuple[bool, ...] | None = None  # per candidate, when known (oracle only)
    timeout_s: float = DEFAULT_TIMEOUT_S

    def equivalent(self, a: str, b: str) -> bool:
        return answers_equivalent(a, b, timeout_s=self.timeout_s)


Strategy = Callable[[Sequence[Candidate], list, Ballot], int]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    """Add a strategy to the registry under `name`."""
    def add(fn: Strategy) -> Strategy:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = fn
        return fn
    return add


def select(
    candidates: Sequence[Candidate],
    strategy: str = "sprm",
    reference: object = None,
    *,
    think_end: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Candidate:
    """The candidate a strategy keeps.

    Answers come from `candidate.extra["answer"]` when an evaluator has set it, else from the text
    (after `think_end` when given). `reference` is needed only by "oracle", which otherwise falls
    back to `candidate.extra["correct"]` set by the evaluator.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if len(candidates) == 0:
        raise ValueError("select() needs at least one candidate")
    answers = [_answer_of(c, think_end) for c in candidates]
    ballot = Ballot(reference=reference_to_answer(reference), timeout_s=timeout_s)
    if strategy == "oracle":
        ballot = Ballot(reference=ballot.reference, correct=_correctness(candidates, answers, ballot),
                        timeout_s=timeout_s)
    return candidates[STRATEGIES[strategy](candidates, answers, ballot)]


def _answer_of(candidate: Candidate, think_end: str | None) -> str | None:
    if "answer" in candidate.extra:
        return candidate.extra["answer"] or None
    return extract_answer(candidate.text, think_end=think_end)


def _correctness(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> tuple[bool, ...]:
    if ballot.reference is not None:
        return tuple(ballot.equivalent(ballot.reference, a) for a in answers)
    if all("correct" in c.extra for c in candidates):
        return tuple(bool(c.extra["correct"]) for c in candidates)
    raise ValueError("strategy 'oracle' needs a reference answer (or candidates graded by the evaluator)")


def _best_scored(candidates: Sequence[Candidate], indices: Sequence[int]) -> int:
    """Among `indices`, the highest score; ties to the lowest sample_index."""
    return min(indices, key=lambda i: (-candidates[i].score, candidates[i].sample_index))


def _answer_classes(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> list[list[int]]:
    """Group candidates with an answer into equivalence classes, in order of first appearance.

    Each answer joins the first class whose first member it is equivalent to; when no candidate has
    an answer, all of them form one class.
    """
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].sample_index)
    answered = [i for i in order if answers[i] is not None]
    if not answered:
        return [order]
    classes: list[list[int]] = []
    for i in answered:
        for members in classes:
            if ballot.equivalent(answers[members[0]], answers[i]):
                members.append(i)
                break
        else:
            classes.append([i])
    return classes


@register("sprm")
def _sprm(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    return _best_scored(candidates, range(len(candidates)))


@register("majority")
def _majority(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    classes = _answer_classes(candidates, answers, ballot)
    # max() keeps the first of equal keys, and classes are in order of first appearance.
    winner = max(classes, key=lambda m: (len(m), sum(candidates[i].score for i in m)))
    return _best_scored(candidates, winner)


@register("weighted")
def _weighted(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    classes = _answer_classes(candidates, answers, ballot)
    winner = max(classes, key=lambda m: (sum(candidates[i].score for i in m), len(m)))
    return _best_scored(candidates, winner)


@register("first")
def _first(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    return min(range(len(candidates)), key=lambda i: candidates[i].sample_index)


@register("oracle")
def _oracle(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].sample_index)
    correct = [i for i in order if ballot.correct[i]]
    return correct[0] if correct else order[0]

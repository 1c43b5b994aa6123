"""Pick one candidate out of k: best-of-N by SPRM score or by free confidence, votes over answers.

Every strategy has one signature, `strategy(candidates, answers, ballot, **options) -> index into
candidates`, and lives in one registry, `STRATEGIES`; `select` is the only entry point. A strategy is
named with its options as "name:key=value,key=value" (e.g. "sprm:agg=min", "deepconf:eta=90"); an
unknown name or option is an error that lists the valid ones. Ties are always broken by the lowest
`sample_index`, so a result never depends on the order of the list.

- sprm:      the highest trajectory score. agg = "geomean" (default: the recorded `score`, geometric
             mean of step probabilities, as released), "min" (weakest step) or "last" (final step).
- majority:  the most common answer class (answers grouped by `answers_equivalent`); ties go to the
             class with the larger total SPRM score, then to the class whose first member came first.
- weighted:  the answer class with the largest total SPRM score; ties go to the larger class, then to
             the class whose first member came first.
- logprob:   the highest mean sampled-token log-prob (free: recorded while decoding).
- confidence: the highest trace confidence (DeepConf token confidence; measure = mean | lowest |
             bottom10 | tail over windows of `window` tokens, see `reflect.confidence`).
- deepconf:  DeepConf offline: keep the top eta % of traces by trace confidence (measure, window;
             default the lowest group confidence), then a confidence-weighted majority vote among them.
- self_certainty: Borda vote: candidates ranked by self-certainty (rank 0 = most certain) vote for
             their answer with weight (N - rank) ** p (p = 0.5 by default, an option); p = 0
             counts votes as majority does (ties then go to the most certain class).
- first:     sample 0 (what pass@1 measures).
- oracle:    a correct candidate when any is (pass@k; needs the reference, for evaluation only).

In a vote, candidates without an answer never win unless no candidate has one; the candidate returned
for a winning class is its highest-scored member (by the strategy's own score).

    >>> best = select(candidates, "deepconf:eta=10")   # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..spec import Registry, split_spec, typed_options
from ..tasks.grading import DEFAULT_TIMEOUT_S, answers_equivalent, extract_answer, reference_to_answer
from .candidate import Candidate
from .confidence import DEEPCONF_WINDOW, mean, trace_confidence
from .loss import SCORE_AGGREGATIONS

EFFORT_K: dict[str, int] = {"low": 2, "medium": 8, "high": 32}


def effort_to_k(mode: str, table: dict[str, int] | None = None) -> int:
    """Number of samples for a reasoning-effort mode ("low"/"medium"/"high" by default).

        >>> from thinkscale.reflect import EFFORT_K, effort_to_k
        >>> EFFORT_K
        {'low': 2, 'medium': 8, 'high': 32}
        >>> effort_to_k("high"), effort_to_k("high", {"high": 64})
        (32, 64)
    """
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
    same_answer: Callable[[str, str], bool] | None = None  # a task's answer equality; None: math equivalence

    def equivalent(self, a: str, b: str) -> bool:
        if self.same_answer is not None:
            return self.same_answer(a, b)
        return answers_equivalent(a, b, timeout_s=self.timeout_s)


Strategy = Callable[..., int]  # (candidates, answers, ballot, **options) -> index
STRATEGIES: Registry[Strategy] = Registry("selection strategy")
register = STRATEGIES.register  # @register("name") adds a strategy


def parse_strategy(spec: str) -> tuple[str, dict[str, object]]:
    """ "name:key=value,..." -> (name, options), read by `thinkscale.spec` (values inferred: int, float,
    bool or text). Unknown names and options are errors that list the valid ones."""
    name, items = split_spec(spec, what="selection strategy")
    allowed = [p for p in inspect.signature(STRATEGIES.lookup(name)).parameters.values()
               if p.kind == inspect.Parameter.KEYWORD_ONLY]
    options = typed_options(name, items, what="strategy", types={p.name: Any for p in allowed},
                            defaults={p.name: p.default for p in allowed})
    return name, options


HEAD_STRATEGIES = ("sprm", "weighted")  # the ones that rank by the SPRM head's scores
HEAD_FALLBACK = "logprob"  # free: recorded while decoding, and no head needed


def choosing_strategy(strategy: str, head_trained: bool, candidates: Sequence[Candidate]) -> str:
    """The strategy that really chooses: `strategy`, unless it ranks by the SPRM head's scores (sprm,
    weighted) and the head is untrained or no candidate has a scored step - its scores would then be a coin
    flip - in which case "logprob" (a sample's mean token log-prob, free from decoding).

        >>> from thinkscale.reflect import HEAD_FALLBACK, HEAD_STRATEGIES, Candidate, choosing_strategy
        >>> HEAD_STRATEGIES, HEAD_FALLBACK
        (('sprm', 'weighted'), 'logprob')
        >>> scored = [Candidate(0, 0, "", [], [0.8], 0.8, True, False, 0, 0)]
        >>> unscored = [Candidate(0, 0, "", [], [], 0.0, True, False, 0, 0)]
        >>> choosing_strategy("sprm", True, scored), choosing_strategy("sprm", False, scored)
        ('sprm', 'logprob')
        >>> choosing_strategy("weighted", True, unscored), choosing_strategy("majority", False, unscored)
        ('logprob', 'majority')
    """
    name, _ = parse_strategy(strategy)
    if name not in HEAD_STRATEGIES:
        return strategy
    if head_trained and any(c.step_scores for c in candidates):
        return strategy
    return HEAD_FALLBACK


def select(
    candidates: Sequence[Candidate],
    strategy: str = "sprm",
    reference: object = None,
    *,
    think_end: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    equivalent: Callable[[str, str], bool] | None = None,
) -> Candidate:
    """The candidate a strategy keeps (`strategy`: a name, with options as "name:key=value,...").

    Answers come from `candidate.extra["answer"]` when an evaluator has set it, else from the text
    (after `think_end` when given). `reference` is needed only by "oracle", which otherwise falls
    back to `candidate.extra["correct"]` set by the evaluator. `equivalent` decides which answers vote
    together (default: math equivalence; a task with many right texts gives its own).

        >>> from thinkscale.reflect import STRATEGIES, Candidate, select
        >>> picks = [Candidate(0, i, "", [], [s], s, True, False, 0, 0, extra={"answer": a})
        ...          for i, (a, s) in enumerate([("4", 0.9), ("5", 0.2), ("5.0", 0.3)])]
        >>> select(picks, "sprm").extra["answer"], select(picks, "majority").extra["answer"]
        ('4', '5.0')
        >>> "deepconf" in STRATEGIES and "weighted" in STRATEGIES      # every name select() takes
        True
    """
    name, options = parse_strategy(strategy)
    if len(candidates) == 0:
        raise ValueError("select() needs at least one candidate")
    answers = [_answer_of(c, think_end) for c in candidates]
    ballot = Ballot(reference=reference_to_answer(reference), timeout_s=timeout_s, same_answer=equivalent)
    if name == "oracle":
        ballot = Ballot(reference=ballot.reference, correct=_correctness(candidates, answers, ballot),
                        timeout_s=timeout_s, same_answer=equivalent)
    return candidates[STRATEGIES[name](candidates, answers, ballot, **options)]


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


def _best(candidates: Sequence[Candidate], indices: Sequence[int], value: Callable[[Candidate], float]) -> int:
    """Among `indices`, the highest `value`; ties to the lowest sample_index."""
    return min(indices, key=lambda i: (-value(candidates[i]), candidates[i].sample_index))


def _best_scored(candidates: Sequence[Candidate], indices: Sequence[int]) -> int:
    """Among `indices`, the highest SPRM score; ties to the lowest sample_index."""
    return _best(candidates, indices, lambda c: c.score)


def _answer_classes(candidates: Sequence[Candidate], answers: list, ballot: Ballot,
                    among: Sequence[int] | None = None) -> list[list[int]]:
    """Group candidates with an answer into equivalence classes, in order of first appearance.

    Each answer joins the first class whose first member it is equivalent to; when no candidate has
    an answer, all of them form one class. `among` restricts the vote to those indices.
    """
    pool = range(len(candidates)) if among is None else among
    order = sorted(pool, key=lambda i: candidates[i].sample_index)
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


def _weighted_vote(candidates: Sequence[Candidate], answers: list, ballot: Ballot, weight: Sequence[float],
                   among: Sequence[int] | None = None) -> int:
    """The class with the largest total weight (ties: larger class, then first seen); its heaviest member."""
    classes = _answer_classes(candidates, answers, ballot, among)
    winner = max(classes, key=lambda m: (sum(weight[i] for i in m), len(m)))
    return min(winner, key=lambda i: (-weight[i], candidates[i].sample_index))


def _require_signals(candidates: Sequence[Candidate], strategy: str) -> None:
    for c in candidates:
        if c.num_generated_tokens > 0 and len(c.token_logprobs) != c.num_generated_tokens:
            raise ValueError(f"strategy {strategy!r} needs the token confidences recorded while sampling; "
                             f"candidate {c.sample_index} has none (sampled by an older thinkscale?)")


def step_aggregate(candidate: Candidate, agg: str = "geomean") -> float:
    """A trajectory score from step scores, as `loss.trajectory_score` defines the aggregations: "geomean"
    is the score recorded while decoding (the model's own aggregation, geomean unless its head was fitted
    with another); "min" and "last" are read off the recorded step probabilities exactly; 0 with no step."""
    if agg == "geomean":
        return candidate.score
    if agg not in SCORE_AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {agg!r}; valid: {', '.join(SCORE_AGGREGATIONS)}")
    if not candidate.step_scores:
        return 0.0
    return min(candidate.step_scores) if agg == "min" else candidate.step_scores[-1]


@register("sprm")
def _sprm(candidates: Sequence[Candidate], answers: list, ballot: Ballot, *, agg: str = "geomean") -> int:
    step_aggregate(candidates[0], agg)  # an unknown aggregation fails before anything is picked
    return _best(candidates, range(len(candidates)), lambda c: step_aggregate(c, agg))


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


@register("logprob")
def _logprob(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    _require_signals(candidates, "logprob")
    return _best(candidates, range(len(candidates)), lambda c: mean(c.token_logprobs))


@register("confidence")
def _confidence(candidates: Sequence[Candidate], answers: list, ballot: Ballot, *, measure: str = "mean",
                window: int = DEEPCONF_WINDOW) -> int:
    _require_signals(candidates, "confidence")
    return _best(candidates, range(len(candidates)), lambda c: trace_confidence(c.token_confidences, measure, window))


@register("deepconf")
def _deepconf(candidates: Sequence[Candidate], answers: list, ballot: Ballot, *, eta: float = 10,
              measure: str = "lowest", window: int = DEEPCONF_WINDOW) -> int:
    if not 0 < eta <= 100:
        raise ValueError(f"deepconf: eta is a percentage in (0, 100], got {eta}")
    _require_signals(candidates, "deepconf")
    conf = [trace_confidence(c.token_confidences, measure, window) for c in candidates]
    ranked = sorted(range(len(candidates)), key=lambda i: (-conf[i], candidates[i].sample_index))
    kept = ranked[: max(1, math.ceil(len(candidates) * eta / 100))]
    # DeepConf's confidences are positive; a trace with no tokens (-inf) carries no weight
    weight = [c if math.isfinite(c) else 0.0 for c in conf]
    return _weighted_vote(candidates, answers, ballot, weight, kept)


@register("self_certainty")
def _self_certainty(candidates: Sequence[Candidate], answers: list, ballot: Ballot, *, p: float = 0.5) -> int:
    if p < 0:
        raise ValueError(f"self_certainty: p must be >= 0, got {p}")
    _require_signals(candidates, "self_certainty")
    certainty = [mean(c.token_certainties) for c in candidates]
    ranked = sorted(range(len(candidates)), key=lambda i: (-certainty[i], candidates[i].sample_index))
    n = len(candidates)
    weight = [0.0] * n
    for rank, i in enumerate(ranked):
        weight[i] = float(n - rank) ** p
    return _weighted_vote(candidates, answers, ballot, weight)


@register("first")
def _first(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    return min(range(len(candidates)), key=lambda i: candidates[i].sample_index)


@register("oracle")
def _oracle(candidates: Sequence[Candidate], answers: list, ballot: Ballot) -> int:
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].sample_index)
    correct = [i for i in order if ballot.correct[i]]
    return correct[0] if correct else order[0]

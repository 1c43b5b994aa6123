"""How good is a scorer? Step- and trace-level quality against the truth, pure functions of candidates.

A *step scorer* gives each scored step of a candidate a number (higher = more likely on track); a
*trace scorer* gives the whole candidate one number. Both are recomputed from recorded candidates
(`candidates.jsonl`), so every scorer is measured the same way:

- step_auc:     ROC AUC of step scores against per-step truth (`extra["step_truth"]`, set by the
                evaluator from the task's step checker), pooled over all labelled steps;
- first_error:  among labelled candidates with a wrong step, the share whose lowest-scored step is the
                first wrong one (ties: the earliest lowest step);
- pair_accuracy: within each question, over every (correct, wrong) pair of candidates, the share where
                the correct one scores higher (ties count one half): what best-of-k needs;
- ece:          expected calibration error (10 equal-width bins) of probabilities against 0/1 truth,
                for scorers whose values are probabilities (the SPRM's).

    >>> roc_auc([0.9, 0.8, 0.3, 0.1], [True, False, True, False])
    0.75
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from .candidate import Candidate
from .confidence import mean, step_values, trace_confidence
from .select import step_aggregate

StepScorer = Callable[[Candidate], list]
TraceScorer = Callable[[Candidate], float]

STEP_SCORERS: dict[str, StepScorer] = {
    "sprm": lambda c: list(c.step_scores),
    "logprob_min": lambda c: step_values(c.token_logprobs, c.step_ends, "min"),
    "logprob_mean": lambda c: step_values(c.token_logprobs, c.step_ends, "mean"),
    "confidence_mean": lambda c: step_values(c.token_confidences, c.step_ends, "mean"),
}
TRACE_SCORERS: dict[str, TraceScorer] = {
    "sprm": lambda c: step_aggregate(c, "geomean"),
    "sprm_min": lambda c: step_aggregate(c, "min"),
    "sprm_last": lambda c: step_aggregate(c, "last"),
    "logprob": lambda c: mean(c.token_logprobs),
    "confidence": lambda c: trace_confidence(c.token_confidences, "mean"),
    "deepconf_lowest": lambda c: trace_confidence(c.token_confidences, "lowest"),
    "self_certainty": lambda c: mean(c.token_certainties),
}
PROBABILITY_SCORERS = ("sprm", "sprm_min", "sprm_last")
ECE_BINS = 10


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties one half; None without both classes."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def expected_calibration_error(probs: Sequence[float], labels: Sequence[bool], bins: int = ECE_BINS) -> float | None:
    """Sum over equal-width bins of (bin share) * |mean prob - frequency of True|; None when empty."""
    if not probs:
        return None
    totals = [[0, 0.0, 0] for _ in range(bins)]  # count, sum of probs, positives
    for p, y in zip(probs, labels):
        b = min(int(p * bins), bins - 1)
        totals[b][0] += 1
        totals[b][1] += p
        totals[b][2] += bool(y)
    return sum(n / len(probs) * abs(s / n - pos / n) for n, s, pos in totals if n)


def _labelled(questions: Sequence[Sequence[Candidate]]) -> list[Candidate]:
    return [c for cands in questions for c in cands if c.extra.get("step_truth") is not None]


def step_quality(questions: Sequence[Sequence[Candidate]], scorer: StepScorer, probability: bool = False) -> dict:
    """step_auc, first_error (and ece when the scores are probabilities) of one step scorer."""
    scores, labels, hits, with_error = [], [], 0, 0
    for c in _labelled(questions):
        truth, values = c.extra["step_truth"], scorer(c)
        if len(values) != len(truth):
            continue  # e.g. no SPRM scores recorded for this candidate
        scores += values
        labels += truth
        if not all(truth):
            with_error += 1
            lowest = min(range(len(values)), key=lambda j: (values[j], j))
            hits += lowest == truth.index(False)
    finite = [(s, y) for s, y in zip(scores, labels) if math.isfinite(s)]
    out = {"steps": len(scores),
           "step_auc": roc_auc([s for s, _ in finite], [y for _, y in finite]) if finite else None,
           "first_error": hits / with_error if with_error else None}
    if probability:
        out["ece"] = expected_calibration_error(scores, labels)
    return out


def pair_accuracy(questions: Sequence[Sequence], scorer: Callable[[object], float],
                  correct: Callable[[object], bool] = lambda c: bool(c.extra.get("correct"))) -> float | None:
    """Share of (correct, wrong) candidate pairs of one question where the correct one scores higher."""
    wins, pairs = 0.0, 0
    for cands in questions:
        right = [scorer(c) for c in cands if correct(c)]
        wrong = [scorer(c) for c in cands if not correct(c)]
        for a in right:
            for b in wrong:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
                pairs += 1
    return wins / pairs if pairs else None


def scorer_report(questions: Sequence[Sequence[Candidate]]) -> dict:
    """Every scorer's quality: {"steps": {name: step_quality}, "traces": {name: {...}}, "labelled": ...}.

    Scorers that need signals the candidates lack (no SPRM scores, no token confidences) are left out.
    """
    samples = [c for cands in questions for c in cands]
    has_sprm = any(c.step_scores for c in samples)
    has_signals = any(c.token_logprobs for c in samples)
    keep = lambda name: (name.startswith("sprm") and has_sprm) or (not name.startswith("sprm") and has_signals)  # noqa: E731
    labelled = _labelled(questions)
    steps = {}
    if labelled:
        steps = {name: step_quality(questions, fn, probability=name in PROBABILITY_SCORERS)
                 for name, fn in STEP_SCORERS.items() if keep(name)}
    traces = {}
    for name, fn in TRACE_SCORERS.items():
        if not keep(name):
            continue
        entry = {"pair_accuracy": pair_accuracy(questions, fn)}
        if name in PROBABILITY_SCORERS:
            entry["ece"] = expected_calibration_error([fn(c) for c in samples],
                                                      [bool(c.extra.get("correct")) for c in samples])
        traces[name] = entry
    return {"labelled_candidates": len(labelled), "candidates": len(samples), "steps": steps, "traces": traces}

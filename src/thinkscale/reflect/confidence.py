"""Free confidence signals: what the policy's own next-token distribution says about a trace.

The sampler computes the policy's distribution at every generated token anyway, so these cost no
extra forward pass (spec: "Free-confidence baselines"). Per token, from the raw logits (temperature 1,
before repetition penalty, temperature and top-p, as DeepConf and self-certainty define them):

    logprob      log p(sampled token)
    confidence   DeepConf's token confidence: -mean of the top-20 log-probs (high = peaked)
    certainty    self-certainty: KL(uniform || p) = -log V - mean_v log p_v

Per trace, the pure functions below turn those lists into the numbers selection strategies rank by.
Group confidence follows DeepConf: the mean token confidence over a sliding window of `window`
tokens (the whole trace when it is shorter).

    >>> mean([-0.1, -0.3])
    -0.2
    >>> group_confidences([1.0, 2.0, 3.0, 4.0], window=2)
    [1.5, 2.5, 3.5]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

DEEPCONF_TOP_K = 20
DEEPCONF_WINDOW = 2048  # the DeepConf release's default window


def token_signals(logits: torch.Tensor, tokens: torch.Tensor, top_k: int = DEEPCONF_TOP_K) -> torch.Tensor:
    """(B, 3) per row: sampled-token log-prob, DeepConf confidence, self-certainty, from (B, V) raw logits."""
    return token_signals_and_top(logits, tokens, 0, top_k)[0]


def token_signals_and_top(logits: torch.Tensor, tokens: torch.Tensor, top_logprobs: int,
                          top_k: int = DEEPCONF_TOP_K) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`token_signals`, and with `top_logprobs` n > 0 the n most likely token ids (B, n) and their
    log-probs (B, n). Three passes over the vocabulary (log-sum-exp, top-k, mean), none materializing
    the (B, V) log-probs: log p_v = logit_v - logsumexp(logits)."""
    logits = logits.float()
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, 1)
    sampled = logits.gather(-1, tokens[:, None]).squeeze(-1) - log_norm[:, 0]
    k = min(top_k, logits.shape[-1])
    values, ids = logits.topk(max(k, top_logprobs), dim=-1)  # sorted, descending
    confidence = -(values[:, :k].mean(dim=-1) - log_norm[:, 0])
    certainty = -math.log(logits.shape[-1]) - (logits.mean(dim=-1) - log_norm[:, 0])
    top = (ids[:, :top_logprobs], values[:, :top_logprobs] - log_norm) if top_logprobs else None
    return torch.stack([sampled, confidence, certainty], dim=-1), top


def mean(values: Sequence[float]) -> float:
    """Plain mean; -inf for an empty trace, so an empty trace never wins a ranking."""
    return sum(values) / len(values) if values else -math.inf


def group_confidences(confidences: Sequence[float], window: int = DEEPCONF_WINDOW) -> list[float]:
    """Sliding-window means of token confidence (one value when the trace is no longer than `window`)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n = len(confidences)
    if n == 0:
        return []
    if n <= window:
        return [sum(confidences) / n]
    out, total = [], sum(confidences[:window])
    out.append(total / window)
    for i in range(window, n):
        total += confidences[i] - confidences[i - window]
        out.append(total / window)
    return out


def trace_confidence(confidences: Sequence[float], measure: str = "mean", window: int = DEEPCONF_WINDOW) -> float:
    """One number per trace from its token confidences (higher = more confident).

    measure: "mean" (all tokens), "lowest" (lowest group confidence), "bottom10" (mean of the lowest 10%
    of group confidences), "tail" (mean of the last `window` tokens).
    """
    if not confidences:
        return -math.inf
    if measure == "mean":
        return mean(confidences)
    if measure == "tail":
        return mean(confidences[-window:])
    groups = group_confidences(confidences, window)
    if measure == "lowest":
        return min(groups)
    if measure == "bottom10":
        worst = sorted(groups)[: max(1, math.ceil(0.1 * len(groups)))]
        return mean(worst)
    raise ValueError(f"unknown confidence measure {measure!r}; valid: mean, lowest, bottom10, tail")


def step_spans(step_ends: Sequence[int]) -> list[tuple[int, int]]:
    """Token ranges [start, end] (inclusive) of each step: from after the previous step's delimiter
    through this step's delimiter token."""
    spans, start = [], 0
    for end in step_ends:
        spans.append((start, end))
        start = end + 1
    return spans


def step_values(token_values: Sequence[float], step_ends: Sequence[int], reduce: str = "min") -> list[float]:
    """A per-step score from a per-token signal: "min" or "mean" over each step's tokens."""
    out = []
    for start, end in step_spans(step_ends):
        span = token_values[start:end + 1]
        if not span:
            out.append(-math.inf)
        elif reduce == "min":
            out.append(min(span))
        elif reduce == "mean":
            out.append(sum(span) / len(span))
        else:
            raise ValueError(f"unknown reduce {reduce!r}; valid: min, mean")
    return out


def step_confidence_inputs(signals: torch.Tensor, step_ends: Sequence[int]) -> torch.Tensor:
    """(S, 4) per step, from per-token signals (G, 3) (`token_signals`): the step's lowest and mean
    token log-prob, the lowest token log-prob of the trace so far (a slip earlier stays visible), and the
    step's mean DeepConf confidence. What an SPRM head with confidence inputs reads."""
    rows, lowest = [], 0.0
    for start, end in step_spans(step_ends):
        span = signals[start:end + 1]
        step_min = float(span[:, 0].min())
        lowest = min(lowest, step_min)
        rows.append([step_min, float(span[:, 0].mean()), lowest, float(span[:, 1].mean())])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)

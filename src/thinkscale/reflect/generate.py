"""Sampling k candidates per prompt, scored by the SPRM during generation, on the one decode engine.

`sample()` turns prompts into engine rows (one per candidate, each with its own seed) and the decoded
rows into Candidates: step ends, SPRM step scores from the features kept while decoding (no second
forward pass) and the free token confidences. `decode()` is the same engine for callers that want the
raw rows (head refits, benchmarks).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .candidate import Candidate
from .engine import SAMPLING, RowSpec, candidate_rows, decode_rows
from .model import ReflectiveModel
from .scoring import Features, scores_from_features

logger = logging.getLogger(__name__)

__all__ = ["Decoded", "decode", "sample", "to_candidate"]


@dataclass
class Decoded:
    """One decoded row: generated ids (EOS included when hit), when scoring their features (token
    position -> (c,), at every possible step end), and the per-token signals (G, 3): log-prob, DeepConf
    confidence, self-certainty."""

    tokens: list[int]
    finished: bool
    features: dict[int, torch.Tensor] | None
    signals: torch.Tensor


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def decode(rm: ReflectiveModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: set[int],
           pad_id: int, temperature: float = SAMPLING.temperature, top_p: float = SAMPLING.top_p,
           repetition_penalty: float = SAMPLING.repetition_penalty,
           generator: torch.Generator | None = None, keep_features: bool = True,
           keep_signals: bool = True, tokenizer=None) -> list[Decoded]:
    """Decode token-id prompts with the same settings; row seeds are drawn from `generator` (default:
    torch's global RNG), so one generator state gives one set of rows.

    `keep_features` False runs the identical loop with no hook: generation alone. `keep_signals` False
    skips the free confidences (their rows are then empty, shape (G, 0); for measuring what they cost).
    `tokenizer` (needed with `keep_features`) says where steps can end: features are kept there only.
    """
    seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator,
                          device=generator.device if generator is not None else "cpu").tolist()
    specs = [RowSpec(p, max_new_tokens, temperature, top_p, s) for p, s in zip(prompts, seeds)]
    feature_tokens = rm.step_feature_tokens(tokenizer) if keep_features and tokenizer is not None else None
    rows = decode_rows(rm, specs, eos_ids, pad_id, repetition_penalty, keep_features, keep_signals,
                       feature_tokens=feature_tokens)
    return [Decoded(r.tokens, r.finish == "eos", r.features if keep_features else None, r.signal_matrix())
            for r in rows]


def _rounded(values: torch.Tensor) -> list[float]:
    # 4 decimals: far below any difference a ranking acts on, and candidates.jsonl stays small
    return [round(v, 4) for v in values.tolist()]


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        # a chat-templated prompt already carries its special tokens
        add_special = not (bos is not None and prompt.startswith(bos))
        return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    return [int(t) for t in prompt]


def eos_token_ids(rm: ReflectiveModel, tokenizer) -> set[int]:
    """The ids that end a row: the tokenizer's EOS and the policy's generation config's."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(rm.policy, "generation_config", None), "eos_token_id", None)):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def to_candidate(rm: ReflectiveModel, tokenizer, prompt_ids: list[int], tokens: list[int], finished: bool,
                 features: Features | None, signals: torch.Tensor, prompt_index: int = 0,
                 sample_index: int = 0, top: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Candidate:
    """A decoded row as a Candidate: step ends, SPRM step scores (when `features` were kept) and the
    token signals; with `top` (a row's kept (ids, log-probs) per position) extra["top_logprobs"]."""
    step_ends, step_scores, traj = scores_from_features(rm, tokenizer, prompt_ids, tokens, features, signals)
    logprob, confidence, certainty = (_rounded(signals[:, i]) if signals.shape[1] else [] for i in range(3))
    extra = {"top_logprobs": [(ids.tolist(), _rounded(lps)) for ids, lps in top]} if top else {}
    return Candidate(
        prompt_index=prompt_index, sample_index=sample_index, text=tokenizer.decode(tokens, skip_special_tokens=True),
        token_ids=list(tokens), step_scores=step_scores, score=traj, finished=finished, truncated=not finished,
        num_prompt_tokens=len(prompt_ids), num_generated_tokens=len(tokens), step_ends=step_ends,
        token_logprobs=logprob, token_confidences=confidence, token_certainties=certainty, extra=extra)


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """The checks every entry point makes on sampling settings (errors say which value and why)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def pad_token_id(tokenizer, eos_ids: set[int]) -> int:
    pad_id = tokenizer.pad_token_id
    return pad_id if pad_id is not None else (min(eos_ids) if eos_ids else 0)


def sample(rm: ReflectiveModel, tokenizer, prompts: Sequence[str | Sequence[int]], k: int = 8,
           temperature: float = SAMPLING.temperature, top_p: float = SAMPLING.top_p, max_new_tokens: int = 512,
           seed: int | None = None, batch_size: int | None = None,
           repetition_penalty: float = SAMPLING.repetition_penalty, score: bool = True) -> list[list[Candidate]]:
    """k candidates per prompt, each with SPRM step scores taken from its own generation pass.

    prompts: text used verbatim (apply `rm.format_prompt` first) or token ids. Rows (prompt p, sample j)
    are decoded `batch_size` at a time (default k); row (p, j) samples from its own stream seeded with
    `engine.row_seed(seed, p, j)` (`engine.candidate_rows`), so the same seed gives the same candidates whatever the batch size
    (and `thinkscale serve` gives the same as this for a request with that seed). Without a seed the
    row seeds come from torch's global RNG. temperature 0 is greedy; top_p 1.0 disables nucleus filtering.
    Returns one list of k Candidates per prompt; `score=False` skips scoring (scores are then empty/0).

        >>> from thinkscale.reflect import ReflectiveModel
        >>> from thinkscale.tasks.policy import tiny_policy
        >>> policy, tokenizer = tiny_policy()                      # 2 layers of width 32, untrained
        >>> rm = ReflectiveModel(policy)                           # a fresh head on its hidden states
        >>> from thinkscale.reflect import sample, select
        >>> groups = sample(rm, tokenizer, [rm.format_prompt("What is 1 + 2?", tokenizer)], k=4, max_new_tokens=8,
        ...                 seed=0)
        >>> len(groups), len(groups[0]), all(0.0 <= c.score <= 1.0 for c in groups[0])
        (1, 4, True)
        >>> best = select(groups[0], "sprm")                 # the SPRM's pick of the 4
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    check_sampling(temperature, top_p, max_new_tokens)
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
    batch_size = k if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    encoded = encode_prompts(rm, tokenizer, prompts, max_new_tokens)
    eos_ids = eos_token_ids(rm, tokenizer)
    if not eos_ids:
        logger.warning("no EOS token known: every candidate runs to max_new_tokens")
    pad_id = pad_token_id(tokenizer, eos_ids)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())

    rows = candidate_rows(encoded, 1, k, max_new_tokens, temperature, top_p, seed)  # tagged (p, j)
    out: list[list[Candidate]] = [[] for _ in prompts]
    feature_tokens = rm.step_feature_tokens(tokenizer) if score else None
    with eval_mode(rm):
        for lo in range(0, len(rows), batch_size):
            decoded = decode_rows(rm, rows[lo:lo + batch_size], eos_ids, pad_id, repetition_penalty, keep_features=score,
                                  feature_tokens=feature_tokens)
            for row in decoded:
                p, j = row.spec.tag
                out[p].append(to_candidate(rm, tokenizer, encoded[p], row.tokens, row.finish == "eos",
                                           row.features if score else None, row.signal_matrix(), p, j))
            logger.debug("decoded rows %d-%d of %d", lo, lo + len(decoded) - 1, len(rows))
    return out


def encode_prompts(rm: ReflectiveModel, tokenizer, prompts: Sequence[str | Sequence[int]],
                   max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (text verbatim, or ids), refusing an empty one or one past the context."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
        check_context(rm, len(ids), max_new_tokens, f"prompt {i}")
    return encoded


def check_context(rm: ReflectiveModel, prompt_tokens: int, max_new_tokens: int, what: str = "the prompt") -> None:
    """Refuse a prompt that, with its token budget, would run past the model's context."""
    limit = getattr(rm.policy.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"{what} has {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                         f"the model's context of {limit} positions")

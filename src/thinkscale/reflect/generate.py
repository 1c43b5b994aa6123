"""Sampling k candidates per prompt with a KV cache, scored by the SPRM during generation.

The decode loop is the policy's own forward pass. With scoring on, a forward hook hands over the
feature-layer output of every new position as it is produced; once a candidate is complete its step
mask is computed and the head runs at the scored positions only - no second forward pass.
With scoring off, the same loop runs without the hook (the baseline for the overhead benchmark).
Either way the loop records each token's free confidence signals (`reflect.confidence`) from the
logits it already has.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .candidate import Candidate
from .model import ReflectiveModel, capture_output
from .confidence import token_signals
from .scoring import scores_from_features

logger = logging.getLogger(__name__)


@dataclass
class Decoded:
    """One decoded row: generated ids (EOS included when hit), when scoring their features (G, c), and
    the per-token signals (G, 3): log-prob, DeepConf confidence, self-certainty."""

    tokens: list[int]
    finished: bool
    features: torch.Tensor | None
    signals: torch.Tensor


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out the tail beyond nucleus mass top_p (the most likely token always stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # mass before this token already exceeds top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, repetition_penalty: float,
                seen: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits: repetition penalty, then greedy (temperature 0) or
    temperature + top-p sampling."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = _filter_top_p(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def decode(rm: ReflectiveModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: set[int],
           pad_id: int, temperature: float = 0.6, top_p: float = 0.95, repetition_penalty: float = 1.0,
           generator: torch.Generator | None = None, keep_features: bool = True,
           keep_signals: bool = True) -> list[Decoded]:
    """Decode one batch of token-id prompts, left-padded, with the KV cache.

    `keep_features` False runs the identical loop with no hook: generation alone. `keep_signals` False
    skips the free confidences (their rows are then empty, shape (G, 0); for measuring what they cost).
    """
    device = next(rm.policy.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((B, P), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(list(p), device=device)
        attn[b, P - len(p):] = 1
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    seen = None
    if repetition_penalty != 1.0:
        vocab = rm.policy.get_output_embeddings().weight.shape[0]
        # count real prompt tokens per id (scatter_add, so a pad id that is also a real token stays seen)
        seen = torch.zeros(B, vocab, dtype=torch.long, device=device).scatter_add_(1, ids, attn) > 0
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(rm.policy.forward).parameters else {}

    next_pos = attn.sum(dim=1, keepdim=True)  # (B, 1)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    features: list[torch.Tensor] = []  # features[g]: (B, c) at the position that predicts token g
    signals: list[torch.Tensor] = []  # signals[g]: (B, 3) free confidences of token g
    generated: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    with contextlib.ExitStack() as stack:
        # one hook for the whole loop; without it this is plain generation
        captured = stack.enter_context(capture_output(rm.feature_layer)) if keep_features else None
        out = rm(ids, attention_mask=attn, position_ids=positions, use_cache=True, compute_step_logits=False, **extra)
        for step in range(max_new_tokens):
            if captured is not None:
                features.append(captured.value[:, -1])
            token = next_tokens(out.logits[:, -1], temperature, top_p, repetition_penalty, seen, generator)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            generated.append(token)
            if keep_signals:
                signals.append(token_signals(out.logits[:, -1], token))
            lengths += (~done).long()
            done |= torch.isin(token, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
            out = rm(token[:, None], attention_mask=attn, position_ids=next_pos, cache=out.cache, use_cache=True,
                     compute_step_logits=False)
            next_pos = next_pos + 1

    tokens = torch.stack(generated, dim=1).tolist()  # (B, G)
    feats = torch.stack(features, dim=1) if keep_features else None  # (B, G, c)
    sigs = torch.stack(signals, dim=1).cpu() if keep_signals else torch.zeros(B, len(generated), 0)  # (B, G, 3)
    results = []
    for b in range(B):
        n = int(lengths[b])
        ends_on_eos = n > 0 and tokens[b][n - 1] in eos_ids
        results.append(Decoded(tokens[b][:n], ends_on_eos, feats[b, :n] if feats is not None else None, sigs[b, :n]))
    return results


def _rounded(values: torch.Tensor) -> list[float]:
    # 4 decimals: far below any difference a ranking acts on, and candidates.jsonl stays small
    return [round(v, 4) for v in values.tolist()]


def _encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        # a chat-templated prompt already carries its special tokens
        add_special = not (bos is not None and prompt.startswith(bos))
        return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    return [int(t) for t in prompt]


def _eos_ids(rm: ReflectiveModel, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(rm.policy, "generation_config", None), "eos_token_id", None)):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def sample(rm: ReflectiveModel, tokenizer, prompts: Sequence[str | Sequence[int]], k: int = 8,
           temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 512, seed: int | None = None,
           batch_size: int | None = None, repetition_penalty: float = 1.0, score: bool = True) -> list[list[Candidate]]:
    """k candidates per prompt, each with SPRM step scores taken from its own generation pass.

    prompts: text used verbatim (apply `rm.format_prompt` first) or token ids. Rows (prompt, sample)
    are decoded `batch_size` at a time (default k). The same seed and batch_size give the same
    candidates. temperature 0 is greedy; top_p 1.0 disables nucleus filtering.
    Returns one list of k Candidates per prompt; `score=False` skips scoring (scores are then empty/0).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
    batch_size = k if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    encoded = [_encode_prompt(tokenizer, p) for p in prompts]
    limit = getattr(rm.policy.config, "max_position_embeddings", None)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                             f"the model's context of {limit} positions")
    eos_ids = _eos_ids(rm, tokenizer)
    if not eos_ids:
        logger.warning("no EOS token known: every candidate runs to max_new_tokens")
    pad_id = tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (min(eos_ids) if eos_ids else 0)
    device = next(rm.policy.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    rows = [(p, j) for p in range(len(prompts)) for j in range(k)]
    out: list[list[Candidate]] = [[] for _ in prompts]
    with _eval_mode(rm):
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo:lo + batch_size]
            decoded = decode(rm, [encoded[p] for p, _ in batch], max_new_tokens, eos_ids, pad_id, temperature, top_p,
                             repetition_penalty, generator, keep_features=score)
            for (p, j), d in zip(batch, decoded):
                step_ends, step_scores, traj = scores_from_features(rm, tokenizer, encoded[p], d.tokens,
                                                                    d.features if score else None, d.signals)
                logprob, confidence, certainty = (_rounded(d.signals[:, i]) for i in range(3))
                out[p].append(Candidate(
                    prompt_index=p, sample_index=j, text=tokenizer.decode(d.tokens, skip_special_tokens=True),
                    token_ids=d.tokens, step_scores=step_scores, score=traj, finished=d.finished,
                    truncated=not d.finished, num_prompt_tokens=len(encoded[p]), num_generated_tokens=len(d.tokens),
                    step_ends=step_ends, token_logprobs=logprob, token_confidences=confidence,
                    token_certainties=certainty))
            logger.debug("decoded rows %d-%d of %d", lo, lo + len(batch) - 1, len(rows))
    return out

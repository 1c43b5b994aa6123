"""The one decode loop: rows decoded together on the KV cache, each with its own settings and random stream.

A row is one prompt to continue (one candidate of one question, or of one server request) with its own
temperature, top-p, token budget and seed. All rows start together (left-padded prefill) and each leaves
the batch when it ends: on EOS, at its budget, or when the caller's `after_token` policy stops it (a
stop string, a disconnected client, a pruned candidate). The cache rows of leavers are dropped with the
cache's public `reorder_cache`, so they stop costing compute.

Each row draws its uniforms from its own generator, seeded by the row, and turns them into tokens by
inverse-CDF sampling: a row's tokens do not depend on which other rows share its batch, so the server's
packed batches, `sample()` with any batch size and a pruned run all draw the same candidates for the same
seeds (up to float noise in batched matmuls, far below a sampling boundary in practice).

With `keep_features`, a forward hook hands over the feature-layer output of every new position (for
the SPRM, no second pass); with `keep_signals`, each token's free confidence signals
(`reflect.confidence`) are kept from the logits the loop already has.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .confidence import token_signals
from .model import ReflectiveModel, capture_output

UNIFORM_BLOCK = 64  # uniforms a row draws from its generator at a time (part of the stream's definition)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of row (prompt_index, sample_index) of a call seeded with `seed`: a stable hash, so a
    row's random stream is the same whatever else is decoded with it."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**64; keep it a positive int64


@dataclass(frozen=True)
class RowSpec:
    """What to decode for one row: prompt ids, its sampling settings, its seed and a caller's tag."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.6  # 0 = greedy
    top_p: float = 0.95  # 1.0 = no nucleus filter
    seed: int = 0
    tag: Any = None  # the caller's own key (request id, (prompt, sample) index, ...)


@dataclass
class Row:
    """A row's state while and after it decodes. `finish` is None while it runs, then "eos", "length",
    or the reason a policy gave to `stop()`."""

    spec: RowSpec
    tokens: list[int] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)  # features[g]: (c,) at the position predicting token g
    signals: list[torch.Tensor] = field(default_factory=list)  # signals[g]: (3,) of token g
    finish: str | None = None
    _generator: torch.Generator | None = None
    _uniforms: list[float] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.finish is None

    def stop(self, reason: str = "stop") -> None:
        """End this row now (it leaves the batch after the current token); the first reason given wins."""
        if self.finish is None:
            self.finish = reason

    def next_uniform(self) -> float:
        if not self._uniforms:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(self.spec.seed)
            self._uniforms = torch.rand(UNIFORM_BLOCK, generator=self._generator, dtype=torch.float64).tolist()[::-1]
        return self._uniforms.pop()

    def feature_matrix(self) -> torch.Tensor | None:
        return torch.stack(self.features) if self.features else None  # (G, c)

    def signal_matrix(self) -> torch.Tensor:
        return torch.stack(self.signals).cpu() if self.signals else torch.zeros(len(self.tokens), 0)  # (G, 3)


AfterToken = Callable[[list[Row]], None]  # sees the rows that got a token this step; may stop() some


def filter_top_p(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Zero out the tail beyond nucleus mass top_p per row ((B, 1) or a float; the most likely token stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # mass before this token already exceeds top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
                repetition_penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from (B, V) logits: repetition penalty, then greedy where temperature is 0, else
    temperature + top-p and inverse-CDF sampling with the row's uniform in [0, 1). temperature, top_p,
    uniforms: (B,)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    greedy = logits.argmax(dim=-1)
    if bool((temperature == 0).all()):
        return greedy
    t = temperature.to(logits).clamp(min=1e-6)[:, None]
    probs = torch.softmax(logits / t, dim=-1)
    if bool((top_p < 1.0).any()):
        probs = filter_top_p(probs, top_p.to(probs)[:, None])
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    # right=True skips zero-probability tokens whose cdf equals the target
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return torch.where(temperature.to(logits.device) == 0, greedy, sampled)


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((B, P), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(list(p), device=device)
        attn[b, P - len(p):] = 1
    return ids, attn


@torch.no_grad()
def decode_rows(rm: ReflectiveModel, specs: Sequence[RowSpec], eos_ids: set[int], pad_id: int,
                repetition_penalty: float = 1.0, keep_features: bool = True, keep_signals: bool = True,
                after_token: AfterToken | None = None) -> list[Row]:
    """Decode every row to its end; returns the rows in the order of `specs`.

    `after_token(rows)` runs after each step with the rows that just got a token (already marked "eos" or
    "length" where that ended them) and may `stop()` any of them. `keep_features` False runs the loop with
    no hook (generation alone); `keep_signals` False leaves the signal rows empty.
    """
    if not specs:
        return []
    for spec in specs:
        if len(spec.prompt) == 0 or spec.max_new_tokens < 1:
            raise ValueError("every row needs a non-empty prompt and max_new_tokens >= 1")
    device = next(rm.policy.parameters()).device
    rows = [Row(spec) for spec in specs]
    active = list(range(len(rows)))  # batch position b decodes rows[active[b]]
    ids, attn = _left_padded([s.prompt for s in specs], pad_id, device)
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    next_pos = attn.sum(dim=1, keepdim=True)  # (B, 1)
    temperature = torch.tensor([s.temperature for s in specs], dtype=torch.float32)
    top_p = torch.tensor([s.top_p for s in specs], dtype=torch.float32)
    seen = None
    if repetition_penalty != 1.0:
        vocab = rm.policy.get_output_embeddings().weight.shape[0]
        # count real prompt tokens per id (scatter_add, so a pad id that is also a real token stays seen)
        seen = torch.zeros(len(rows), vocab, dtype=torch.long, device=device).scatter_add_(1, ids, attn) > 0
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(rm.policy.forward).parameters else {}

    with contextlib.ExitStack() as stack:
        captured = stack.enter_context(capture_output(rm.feature_layer)) if keep_features else None
        out = rm(ids, attention_mask=attn, position_ids=positions, use_cache=True, compute_step_logits=False, **extra)
        while True:
            batch = [rows[i] for i in active]
            logits = out.logits[:, -1]  # (B, V)
            uniforms = torch.tensor([row.next_uniform() for row in batch], dtype=torch.float64)
            token = next_tokens(logits, temperature, top_p, uniforms, repetition_penalty, seen)
            feats = captured.value[:, -1] if captured is not None else None  # (B, c)
            sigs = token_signals(logits, token) if keep_signals else None  # (B, 3)
            for b, (row, t) in enumerate(zip(batch, token.tolist())):
                row.tokens.append(t)
                if feats is not None:
                    row.features.append(feats[b])
                if sigs is not None:
                    row.signals.append(sigs[b])
                if t in eos_ids:
                    row.finish = "eos"
                elif len(row.tokens) >= row.spec.max_new_tokens:
                    row.finish = "length"
            if after_token is not None:
                after_token(batch)
            keep = [b for b, row in enumerate(batch) if row.running]
            if not keep:
                break
            if len(keep) < len(batch):  # leavers drop out of the batch and the cache
                index = torch.tensor(keep, device=device)
                out.cache.reorder_cache(index)
                attn, next_pos, token = attn[index], next_pos[index], token[index]
                seen = seen[index] if seen is not None else None
                temperature, top_p = temperature[index.cpu()], top_p[index.cpu()]
                active = [active[b] for b in keep]
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=attn.dtype, device=device)], dim=1)
            out = rm(token[:, None], attention_mask=attn, position_ids=next_pos, cache=out.cache, use_cache=True,
                     compute_step_logits=False)
            next_pos = next_pos + 1
    return rows

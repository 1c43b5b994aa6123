"""The one decode loop: rows decoded together on the KV cache, each with its own settings and random stream.

A row is one prompt to continue (one candidate of one question, or of one server request) with its own
temperature, top-p, token budget and seed. Rows decode together on one `DecodeBatch`: they are admitted
with a left-padded prefill - one forward per distinct prompt, its cache row copied to every row that
shares it - and rows admitted while others decode are spliced into the running cache (`reflect.kv`), so
a server's requests join at the next token. Each row ends on EOS, at its budget, or when its policy
(`after_token`) stops it (a stop string, a disconnected client, a pruned candidate). An ended row takes
no more tokens; once ended rows are 1/compact_every of the batch, their cache rows are dropped together
with the cache's public `reorder_cache` (one copy of the cache per compaction, not one per departure),
and the leading cache columns no row attends to any more go with them. `decode_rows` is a batch with
every row admitted at once.

Each row draws its uniforms from its own generator, seeded by the row, and turns them into tokens by
inverse-CDF sampling: a row's tokens do not depend on which other rows share its batch, so the server's
packed batches, `sample()` with any batch size and a pruned run all draw the same candidates for the same
seeds (up to float noise in batched matmuls, far below a sampling boundary in practice).

For search, a policy may also `pause()` a row (it keeps its KV cache but takes no token: it is fed a
masked pad, so its cache and position do not move) until `resume()`, and `fork()` it: the child starts
from the parent's tokens and a copy of its cache row - no re-prefill - with its own random stream.

With `keep_features`, a forward hook hands over the feature-layer output of every new position (for
the SPRM, no second pass), kept for every token or, with `feature_tokens`, only where the new token could
open a step delimiter (a superset of the step ends the SPRM scores); with `keep_signals`, each token's
free confidence signals (`reflect.confidence`) are kept from the logits the loop already has, and with
`top_logprobs` n its n most likely tokens and their log-probs (the server's `top_logprobs`).

Cost: a step is the model's forward plus O(B x V) passes (log-sum-exp, top-k, mean) over the logits,
never a sort of the vocabulary: top-p sampling looks for the nucleus among the NUCLEUS_SLICE most likely
tokens first, which is exact whenever they hold top_p of the mass, and sorts the row's whole vocabulary
only when they do not.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from . import kv
from .confidence import token_signals_and_top
from .model import ReflectiveModel, capture_output

UNIFORM_BLOCK = 64  # uniforms a row draws from its generator at a time (part of the stream's definition)
NUCLEUS_SLICE = 64  # top tokens where top-p sampling looks for the nucleus before sorting a whole row
MAX_TOP_LOGPROBS = 20  # the most top log-probs a row can keep per token (OpenAI's top_logprobs limit)
COMPACT_EVERY = 8  # ended rows leave the batch (one cache copy) once they are 1/COMPACT_EVERY of it


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of row (prompt_index, sample_index) of a call seeded with `seed`: a stable hash, so a
    row's random stream is the same whatever else is decoded with it."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**64; keep it a positive int64


def candidate_rows(prompts: Sequence[Sequence[int]], n: int, k: int, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, top_logprobs: int = 0) -> list["RowSpec"]:
    """The rows of n answers per prompt, k candidates each: row (q, j) for answer q (prompt q // n) and
    candidate j, seeded row_seed(seed, q, j) and tagged (q, j), in that order (the fan-out of `sample`
    and of every `reflect.answer` request)."""
    return [RowSpec(prompts[q // n], max_new_tokens, temperature, top_p, row_seed(seed, q, j), tag=(q, j),
                    top_logprobs=top_logprobs)
            for q in range(len(prompts) * n) for j in range(k)]


@dataclass(frozen=True)
class SamplingDefaults:
    """The test-time sampling of the MetaStone-S1 release: the defaults of everything that samples
    (`sample`, `search`, `thinkscale eval`, `serve`, the demo)."""

    temperature: float = 0.6
    top_p: float = 0.95
    repetition_penalty: float = 1.0  # 1 = off; the release's own runs used 1.05


SAMPLING = SamplingDefaults()


@dataclass(frozen=True)
class RowSpec:
    """What to decode for one row: prompt ids, its sampling settings, its seed and a caller's tag."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = SAMPLING.temperature  # 0 = greedy
    top_p: float = SAMPLING.top_p  # 1.0 = no nucleus filter
    seed: int = 0
    tag: Any = None  # the caller's own key (request id, (prompt, sample) index, ...)
    top_logprobs: int = 0  # keep this many most likely tokens (and log-probs) at each position


@dataclass
class Row:
    """A row's state while and after it decodes. `finish` is None while it runs, then "eos", "length",
    or the reason a policy gave to `stop()`."""

    spec: RowSpec
    tokens: list[int] = field(default_factory=list)
    # features[g]: (c,) at the position predicting token g (every g, or the possible step ends only)
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    signals: list[torch.Tensor] = field(default_factory=list)  # signals[g]: (3,) of token g
    top: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # top[g]: (ids, log-probs), (n,) each
    finish: str | None = None
    paused: bool = False
    inherited: int = 0  # leading tokens copied from a parent by fork(), not generated by this row
    parent: "Row | None" = None
    policy: "AfterToken | None" = None  # sees this row after each of its tokens (set when admitted; forks inherit)
    owner: Any = None  # whoever admitted it may file it here (a server: its request); forks inherit
    _generator: torch.Generator | None = None
    _uniforms: list[float] = field(default_factory=list)
    _forks: list["Row"] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.finish is None

    @property
    def generated(self) -> int:
        """Tokens this row decoded itself (its parent's prefix excluded)."""
        return len(self.tokens) - self.inherited

    def stop(self, reason: str = "stop") -> None:
        """End this row now (it leaves the batch after the current token); the first reason given wins."""
        if self.finish is None:
            self.finish = reason

    def pause(self) -> None:
        """Keep this row's cache but give it no tokens until `resume()`."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def fork(self, seed: int, tag: Any = None) -> "Row":
        """A child that continues from this row's tokens and cache with its own stream (joins the batch
        after the current step; must be called on a running row)."""
        if not self.running:
            raise ValueError("only a running row can be forked")
        child = Row(replace(self.spec, seed=seed, tag=tag), list(self.tokens), dict(self.features),
                    list(self.signals), list(self.top), paused=self.paused, inherited=len(self.tokens), parent=self,
                    policy=self.policy, owner=self.owner)
        self._forks.append(child)
        return child

    def next_uniform(self) -> float:
        if not self._uniforms:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(self.spec.seed)
            self._uniforms = torch.rand(UNIFORM_BLOCK, generator=self._generator, dtype=torch.float64).tolist()[::-1]
        return self._uniforms.pop()

    def feature_matrix(self) -> torch.Tensor | None:
        """(G, c): the features of every token (None without features); decode with `feature_tokens`
        None, since only those rows hold them all."""
        if not self.features:
            return None
        if len(self.features) != len(self.tokens):
            raise ValueError("this row kept features at its possible step ends only; read them from .features")
        return torch.stack([self.features[g] for g in range(len(self.tokens))])

    def signal_matrix(self) -> torch.Tensor:
        return torch.stack(self.signals).cpu() if self.signals else torch.zeros(len(self.tokens), 0)  # (G, 3)


AfterToken = Callable[[list[Row]], None]  # sees the batch's rows after a step; may stop, pause, resume or fork them


def filter_top_p(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Zero out the tail beyond nucleus mass top_p per row ((B, 1) or a float; the most likely token stays).
    The reference for `next_tokens`' nucleus (which never sorts a whole row when it can avoid it)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # mass before this token already exceeds top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(R,) index per row of (R, n) unnormalized probabilities, by inverse CDF with uniforms (R,) in [0, 1)."""
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    # right=True skips zero-probability entries whose cdf equals the target
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _nucleus_pick(scaled_top: torch.Tensor, ids: torch.Tensor, log_norm: torch.Tensor, top_p: torch.Tensor,
                  uniforms: torch.Tensor, whole_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p sampling from a row's most likely tokens: scaled_top (R, n) tempered logits in descending
    order, ids (R, n) their token ids, log_norm (R, 1) the log-sum-exp of the row's whole tempered logits.
    Returns (token (R,), covered (R,)): covered says the nucleus lies inside the n tokens (the first token
    beyond top_p is among them, or they are the whole row), so the draw is exact; else redo the row whole."""
    probs = torch.exp(scaled_top - log_norm)  # the true probabilities of these tokens
    drop = probs.cumsum(dim=-1) - probs > top_p[:, None]  # mass before the token already exceeds top_p
    covered = drop[:, -1] | whole_row
    picked = _inverse_cdf(probs.masked_fill(drop, 0.0), uniforms)
    return ids.gather(-1, picked[:, None]).squeeze(-1), covered


def next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
                repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
                nucleus_slice: int = NUCLEUS_SLICE) -> torch.Tensor:
    """One token per row from (B, V) logits: repetition penalty, then greedy where temperature is 0, else
    temperature + top-p and inverse-CDF sampling with the row's uniform in [0, 1). temperature, top_p,
    uniforms: (B,).

    Without top-p (1.0) the CDF runs over the vocabulary in id order. With top-p it runs over the nucleus
    in descending probability, found among the `nucleus_slice` most likely tokens (exact when they hold
    it; else that row's whole vocabulary is sorted; 0 sorts every row whole). Each row's token depends on
    its own logits and uniform only."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    tokens = logits.argmax(dim=-1)  # greedy rows keep it
    temperature, top_p = temperature.to(logits.device), top_p.to(logits.device)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return tokens
    rows = sampled.nonzero().squeeze(-1)
    scaled = logits[rows] / temperature[rows, None]
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    u, p = uniforms.to(logits.device)[rows], top_p[rows].to(logits)
    nucleus = p < 1.0
    if not bool(nucleus.all()):  # no nucleus filter: the whole distribution, in id order
        whole = (~nucleus).nonzero().squeeze(-1)
        tokens[rows[whole]] = _inverse_cdf(torch.exp(scaled[whole] - log_norm[whole]), u[whole])
    if bool(nucleus.any()):
        part = nucleus.nonzero().squeeze(-1)
        vocab = logits.shape[-1]
        n = vocab if nucleus_slice == 0 else min(nucleus_slice, vocab)  # 0: sort whole rows (the former cost)
        top, ids = scaled[part].topk(n, dim=-1)
        picked, covered = _nucleus_pick(top, ids, log_norm[part], p[part], u[part], n == vocab)
        if not bool(covered.all()):  # the slice held less than top_p: sort those rows whole
            missed = (~covered).nonzero().squeeze(-1)
            top, ids = scaled[part[missed]].sort(dim=-1, descending=True)
            picked[missed], _ = _nucleus_pick(top, ids, log_norm[part[missed]], p[part[missed]], u[part[missed]], True)
        tokens[rows[part]] = picked
    return tokens


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, P): the prompts right-aligned, pad_id and 0 on their left."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((B, P), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(list(p), device=device)
        attn[b, P - len(p):] = 1
    return ids, attn


class DecodeBatch:
    """Rows decoding together on one KV cache. `admit(specs)` prefills new rows - one forward per distinct
    prompt, its cache row copied to each row that shares it - and splices them into the running batch
    (they take their first token at the next `step()`); `step()` gives every running row one token, runs
    the rows' policies and moves the batch one position; rows leave as they end. `decode_rows` is this
    with every row admitted at once; the server admits requests as they arrive.

    Joining a running batch needs a cache that can be spliced (`kv.splice_supported`: plain DynamicCache
    layers); `joinable` says whether this batch's can. Counters: `steps` (forwards after the prefills),
    `prefills` (prompts prefilled) and `prefill_tokens` (their tokens).
    """

    def __init__(self, rm: ReflectiveModel, eos_ids: set[int], pad_id: int, repetition_penalty: float = 1.0,
                 keep_features: bool = True, keep_signals: bool = True, feature_tokens: frozenset[int] | None = None,
                 nucleus_slice: int = NUCLEUS_SLICE, compact_every: int = COMPACT_EVERY, share_prefill: bool = True):
        if nucleus_slice < 0 or compact_every < 1:
            raise ValueError(f"need nucleus_slice >= 0 and compact_every >= 1, got {nucleus_slice}, {compact_every}")
        self.rm, self.eos_ids, self.pad_id = rm, eos_ids, pad_id
        self.repetition_penalty, self.compact_every, self.share_prefill = repetition_penalty, compact_every, share_prefill
        self.device = next(rm.policy.parameters()).device
        self._record = _Record(keep_features, feature_tokens, keep_signals, nucleus_slice)
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(rm.policy.forward).parameters else {}
        self.rows: list[Row] = []  # batch position b decodes rows[b]; ended rows stay (masked) until a compaction
        self.cache: Any = None
        self.attn = self.next_pos = self.seen = self.logits = self.feats = None  # (B, L), (B, 1), (B, V), (B, V), (B, c)
        self.steps = self.prefills = self.prefill_tokens = 0

    @property
    def running(self) -> int:
        return sum(row.running for row in self.rows)

    @property
    def joinable(self) -> bool:
        """Whether rows can be admitted while others decode (an empty batch always admits)."""
        return not self.rows or kv.splice_supported(self.cache)

    @torch.no_grad()
    def admit(self, specs: Sequence[RowSpec], policy: AfterToken | None = None) -> list[Row]:
        """Prefill `specs` and add them to the batch; `policy(rows)` will see them after each of their tokens."""
        for spec in specs:
            if len(spec.prompt) == 0 or spec.max_new_tokens < 1:
                raise ValueError("every row needs a non-empty prompt and max_new_tokens >= 1")
            if not 0 <= spec.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {spec.top_logprobs}")
        if not specs:
            return []
        if not self.joinable:
            raise ValueError("this model's KV cache cannot be spliced: rows join only an empty batch")
        rows = [Row(spec, policy=policy) for spec in specs]
        prompts = [tuple(spec.prompt) for spec in specs]
        if self.share_prefill:  # row r reads prefill row order[r]
            distinct = list(dict.fromkeys(prompts))
            order = [{p: i for i, p in enumerate(distinct)}[p] for p in prompts]
        else:
            distinct, order = prompts, list(range(len(prompts)))
        ids, attn = left_padded(distinct, self.pad_id, self.device)
        positions = (attn.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        out, feats = self._forward(ids, attn, positions, None, **self._extra)
        index = torch.tensor(order, device=self.device)
        if len(distinct) != len(prompts):
            out.cache.reorder_cache(index)  # a prompt's cache row, copied to each row that shares it
        attn, logits = attn[index], out.logits[:, -1].index_select(0, index)
        feats = feats.index_select(0, index) if feats is not None else None
        seen = None
        if self.repetition_penalty != 1.0:
            vocab = self.rm.policy.get_output_embeddings().weight.shape[0]
            # count real prompt tokens per id (scatter_add, so a pad id that is also a real token stays seen)
            seen = torch.zeros(len(rows), vocab, dtype=torch.long, device=self.device).scatter_add_(1, ids[index], attn) > 0
        if not self.rows:
            self.cache, self.attn, self.seen, self.logits, self.feats = out.cache, attn, seen, logits, feats
            self.next_pos = attn.sum(dim=1, keepdim=True)
        else:
            self.attn = kv.splice(self.cache, self.attn, out.cache, attn)
            self.next_pos = torch.cat([self.next_pos, attn.sum(dim=1, keepdim=True)])
            self.seen = torch.cat([self.seen, seen]) if seen is not None else None
            self.logits = torch.cat([self.logits, logits])
            self.feats = torch.cat([self.feats, feats]) if feats is not None else None
        self.rows += rows
        self.prefills += len(distinct)
        self.prefill_tokens += sum(len(p) for p in distinct)
        return rows

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One token for each running, unpaused row, then the policies, then the next forward. Returns the
        rows forked during this step (they are in the batch now)."""
        batch, device = self.rows, self.device
        live = [b for b, row in enumerate(batch) if row.running and not row.paused]
        if live:
            index = torch.tensor(live, device=device)
            _append_tokens([batch[b] for b in live], self.logits.index_select(0, index),
                           self.feats.index_select(0, index) if self.feats is not None else None, self.eos_ids,
                           self.repetition_penalty, self.seen[index] if self.seen is not None else None, self._record)
            if self.seen is not None:
                newest = torch.tensor([[batch[b].tokens[-1]] for b in live], device=device)
                self.seen[index] = self.seen[index].scatter(1, newest, True)
        in_play = set(live)
        _run_policies([row for b, row in enumerate(batch) if b in in_play or (row.running and row.paused)])
        running = [b for b, row in enumerate(batch) if row.running]
        forks = [(b, child) for b, row in enumerate(batch) for child in row._forks]
        for row in batch:
            row._forks = []
        if not running and not forks:  # every row ended: the batch is empty again
            self.rows, self.cache = [], None
            self.attn = self.next_pos = self.seen = self.logits = self.feats = None
            return []
        if all(batch[b].paused for b in running) and not forks:
            raise RuntimeError("every running row is paused: the policy must resume one")
        ended = len(batch) - len(running)
        if forks or ended * self.compact_every >= len(batch):  # ended rows leave, forks copy their parent's cache
            index = torch.tensor(running + [b for b, _ in forks], device=device)
            self.cache.reorder_cache(index)
            self.attn, self.next_pos = self.attn[index], self.next_pos[index]
            self.seen = self.seen[index] if self.seen is not None else None
            self.attn = kv.trim_left(self.cache, self.attn)
            self.rows = batch = [batch[b] for b in running] + [child for _, child in forks]
        # paused and ended rows are fed a masked pad: their cache gains an ignored column, positions stay
        moving = torch.tensor([row.running and not row.paused for row in batch], device=device)
        inputs = torch.tensor([[row.tokens[-1] if row.running and not row.paused else self.pad_id] for row in batch],
                              device=device)
        self.attn = torch.cat([self.attn, moving[:, None].to(self.attn.dtype)], dim=1)
        out, self.feats = self._forward(inputs, self.attn, self.next_pos, self.cache)
        self.cache, self.logits = out.cache, out.logits[:, -1]
        self.next_pos = self.next_pos + moving[:, None].long()
        self.steps += 1
        return [child for _, child in forks]

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor, cache: Any, **extra):
        """The policy's forward on the cache; with features kept, the feature layer's last-position output."""
        with contextlib.ExitStack() as stack:
            captured = stack.enter_context(capture_output(self.rm.feature_layer)) if self._record.features else None
            out = self.rm(ids, attention_mask=attn, position_ids=positions, cache=cache, use_cache=True,
                          compute_step_logits=False, **extra)
        return out, captured.value[:, -1] if captured is not None else None


def _run_policies(rows: list[Row]) -> None:
    """Each policy sees its own rows (in batch order), policies in the order their first row comes. Equal
    policies are one (two bound methods of one object compare equal)."""
    groups: dict[AfterToken, list[Row]] = {}
    for row in rows:
        if row.policy is not None:
            groups.setdefault(row.policy, []).append(row)
    for policy, members in groups.items():
        policy(members)


@torch.no_grad()
def decode_rows(rm: ReflectiveModel, specs: Sequence[RowSpec], eos_ids: set[int], pad_id: int,
                repetition_penalty: float = 1.0, keep_features: bool = True, keep_signals: bool = True,
                after_token: AfterToken | None = None, feature_tokens: frozenset[int] | None = None,
                nucleus_slice: int = NUCLEUS_SLICE, compact_every: int = COMPACT_EVERY,
                share_prefill: bool = True) -> list[Row]:
    """Decode every row to its end (a `DecodeBatch` with all of them admitted at once); returns the rows of
    `specs` in order, then any forked rows in the order they were forked.

    `after_token(rows)` runs after each step with the rows still in play: those that just got a token
    (already marked "eos" or "length" where that ended them) and the paused ones. It may `stop()`,
    `pause()`, `resume()` or `fork()` any of them. `keep_features` False runs the loop with no hook
    (generation alone); `feature_tokens` keeps a token's feature only when the token is one of these ids
    (the first tokens of the step delimiter: `ReflectiveModel.step_feature_tokens`). `keep_signals` False
    leaves the signal rows empty (a row's `RowSpec.top_logprobs` n in [0, 20] keeps each of its tokens' n
    most likely alternatives). `nucleus_slice` (see `next_tokens`), `compact_every` (ended rows leave once
    they are 1/compact_every of the batch; more than the batch's rows: as each ends) and `share_prefill`
    (False: prefill a prompt once per row, the former cost) change the cost, never the distribution a row
    samples from.
    """
    batch = DecodeBatch(rm, eos_ids, pad_id, repetition_penalty, keep_features, keep_signals, feature_tokens,
                        nucleus_slice, compact_every, share_prefill)
    rows = batch.admit(specs, after_token)
    while batch.rows:
        rows += batch.step()
    return rows


@dataclass(frozen=True)
class _Record:
    """What decode_rows keeps of each step besides the tokens."""

    features: bool
    feature_tokens: frozenset[int] | None
    signals: bool
    nucleus_slice: int


def _append_tokens(rows: list[Row], logits: torch.Tensor, feats: torch.Tensor | None, eos_ids: set[int],
                   repetition_penalty: float, seen: torch.Tensor | None, record: _Record) -> None:
    """Sample one token for each of `rows` from its (B, V) logits and record it with what `record` asks."""
    temperature = torch.tensor([row.spec.temperature for row in rows], dtype=torch.float32)
    top_p = torch.tensor([row.spec.top_p for row in rows], dtype=torch.float32)
    uniforms = torch.tensor([row.next_uniform() for row in rows], dtype=torch.float64)
    token = next_tokens(logits, temperature, top_p, uniforms, repetition_penalty, seen, record.nucleus_slice)
    most = max(row.spec.top_logprobs for row in rows)
    sigs = top = None
    if record.signals or most:
        sigs, top = token_signals_and_top(logits, token, most)  # (B, 3), ((B, n), (B, n))
    for b, (row, t) in enumerate(zip(rows, token.tolist())):
        g = len(row.tokens)
        row.tokens.append(t)
        if feats is not None:
            if record.feature_tokens is None:
                row.features[g] = feats[b]
            elif t in record.feature_tokens:  # a copy: a view would keep the whole step's features alive
                row.features[g] = feats[b].clone()
        if record.signals:
            row.signals.append(sigs[b])
        if row.spec.top_logprobs:
            n = row.spec.top_logprobs
            row.top.append((top[0][b, :n], top[1][b, :n]))
        if t in eos_ids:
            row.finish = "eos"
        elif len(row.tokens) >= row.spec.max_new_tokens:
            row.finish = "length"

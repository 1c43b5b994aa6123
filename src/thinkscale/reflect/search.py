"""Test-time search at a fraction of best-of-k's tokens: small policies on the one decode engine.

Every method spends k candidate rows per question and returns its finished candidates plus the tokens it
really generated (pruned and abandoned rows included; a fork's inherited prefix is not generated again):

- `best_of_n`: k independent rows (what `sample` does).
- `prune`: DeepConf-online's recipe with either signal. `warmup` rows run in full; the threshold is the
  (100 - keep)th percentile of their lowest running value; the other k - warmup rows are stopped when
  theirs falls below it. `signal=sprm`: the SPRM running score (the trajectory score of the steps so
  far), checked after each completed step; `signal=confidence`: DeepConf's group confidence (mean token
  confidence over the last `window` tokens), checked after each token. Pruned rows leave the batch and
  do not vote.
- `beam`: step-level beam search. k rows sample their first step; whenever every running row has
  completed one more step (rows pause at a step end, keeping their cache), the k/width best by SPRM
  running score survive and each continues as `width` rows (itself plus forks that copy its cache).
  A row that finishes is a final candidate and frees its slot (k candidates in the end at most).
- `dvts`: diverse verifier tree search: k/width independent subtrees of `width` rows, each keeping its
  single best row per step (search-and-learn's DVTS).
`budget` caps the generated tokens per question: when a question reaches it, its running rows stop.

Rows are seeded from (seed, question, row number), so the same seed gives the same search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..spec import Registry, field_types, parse_spec
from .candidate import Candidate
from .engine import SAMPLING, Row, RowSpec, decode_rows, row_seed
from .generate import eos_token_ids, eval_mode, check_sampling, encode_prompts, pad_token_id, to_candidate
from .model import ReflectiveModel
from .scoring import scores_from_features

# name -> how it spends its k rows: (run, rows, ctx) -> the decoded rows, where run(specs, policy) decodes
# rows under a per-batch policy and rows(first, last, group) gives the specs of rows first..last - 1
METHODS: Registry[Callable] = Registry("search method")
SIGNALS = ("sprm", "confidence")


@dataclass(frozen=True)
class SearchConfig:
    """A search method and its options (see the module doc)."""

    method: str = "best_of_n"
    k: int = 8
    signal: str = "sprm"  # prune
    warmup: int | None = None  # prune: rows decoded in full first (default: k // 4, at least 1)
    keep: float = 90.0  # prune: percent of warm-up-like rows to keep (DeepConf's eta)
    window: int = 16  # prune, signal=confidence: tokens in a confidence group
    width: int = 4  # beam and dvts: continuations per surviving row
    budget: int | None = None  # generated tokens per question

    def __post_init__(self) -> None:
        METHODS.lookup(self.method)  # an unknown name lists the valid ones
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown prune signal {self.signal!r}; valid: {', '.join(SIGNALS)}")
        if self.warmup is not None and not 1 <= self.warmup <= self.k:
            raise ValueError(f"warmup must be in [1, k={self.k}], got {self.warmup}")
        if not 0 < self.keep <= 100:
            raise ValueError(f"keep is a percentage in (0, 100], got {self.keep}")
        if self.window < 1 or self.width < 1:
            raise ValueError("window and width must be >= 1")
        if self.method in ("beam", "dvts") and self.k % self.width:
            raise ValueError(f"{self.method}: k={self.k} must be a multiple of width={self.width}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 tokens, got {self.budget}")

    @property
    def warmup_rows(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.k // 4)

    @property
    def ranks_by_head(self) -> bool:
        """Whether this search ranks rows by the SPRM head's scores (beam, dvts, prune with signal=sprm)."""
        return self.method in ("beam", "dvts") or (self.method == "prune" and self.signal == "sprm")

    @classmethod
    def parse(cls, spec: str, k: int, budget: int | None = None) -> "SearchConfig":
        """ "method:key=value,..." (e.g. "prune:signal=confidence,keep=90", "beam:width=4"), read by
        `thinkscale.spec` against this class's option types."""
        parsed = parse_spec(spec, what="search", types=field_types(cls, exclude=("method", "k", "budget")))
        return cls(method=parsed.name, k=k, budget=budget, **parsed.options)


@dataclass
class SearchResult:
    """One question's outcome: its candidates in row order (discarded beam partials left out) and the cost."""

    candidates: list[Candidate]
    generated_tokens: int
    rows: int  # rows decoded, forks included

    @property
    def complete(self) -> list[Candidate]:
        """The candidates that may be chosen: finished or cut at max_new_tokens, not pruned or stopped by the
        budget (all of them when every one was stopped)."""
        done = [c for c in self.candidates if c.extra.get("stopped") is None]
        return done or list(self.candidates)

    @property
    def stopped_rows(self) -> int:
        """Rows the search ended before their end (pruned, over budget, or discarded beam partials)."""
        return self.rows - sum(c.extra.get("stopped") is None for c in self.candidates)


@dataclass
class _Track:
    """Per-row search state: its question, step count and the running values seen so far."""

    question: int
    steps: int = 0
    running_score: float = 1.0
    lowest: float = math.inf  # lowest running score (sprm) or group confidence (confidence)
    confidences: list[float] = field(default_factory=list)  # token confidences, for confidence groups

    def copy(self) -> "_Track":
        return _Track(self.question, self.steps, self.running_score, self.lowest, list(self.confidences))


@dataclass
class _Context:
    """What the policies of one search() call share: the model, the config, and every row's track."""

    rm: ReflectiveModel
    tokenizer: object
    config: SearchConfig
    prompts: list[list[int]]
    seed: int
    step_last_ids: frozenset[int]
    tracks: dict[int, _Track] = field(default_factory=dict)  # id(row) -> its track
    rows_of: dict[int, list[Row]] = field(default_factory=dict)  # question -> every row it decoded
    next_row: dict[int, int] = field(default_factory=dict)  # question -> the next row number (its seed)

    def track(self, row: Row) -> _Track:
        return self.tracks[id(row)]

    def register(self, batch: list[Row]) -> None:
        """Give rows seen for the first time a track: a fork starts from a copy of its parent's."""
        for row in batch:
            if id(row) not in self.tracks:
                t = self.tracks[id(row.parent)].copy() if row.parent is not None else _Track(row.spec.tag[0])
                self.tracks[id(row)] = t
                self.rows_of.setdefault(t.question, []).append(row)

    def fork_seed(self, question: int) -> int:
        n = self.next_row[question]
        self.next_row[question] = n + 1
        return row_seed(self.seed, question, n)

    def completed_step(self, row: Row) -> bool:
        """Whether the row's newest token completed a step; updates its running SPRM score."""
        if not row.tokens or row.tokens[-1] not in self.step_last_ids:
            return False
        t = self.track(row)
        ends, _, score = scores_from_features(self.rm, self.tokenizer, self.prompts[t.question], row.tokens,
                                              row.features, row.signal_matrix())
        if len(ends) <= t.steps:
            return False
        t.steps, t.running_score = len(ends), score
        t.lowest = min(t.lowest, score)
        return True

    def observe(self, row: Row) -> float | None:
        """Update the row's running value after its newest token; returns it when it was (re)computed:
        the SPRM running score after a completed step, or the confidence of the last full group."""
        t = self.track(row)
        if self.config.signal == "sprm":
            return t.running_score if self.completed_step(row) else None
        t.confidences.append(float(row.signals[-1][1]))
        window = self.config.window
        if len(t.confidences) < window:  # DeepConf checks full groups only
            return None
        value = sum(t.confidences[-window:]) / window
        t.lowest = min(t.lowest, value)
        return value


def _last_token_ids(rm: ReflectiveModel, tokenizer) -> frozenset[int]:
    """Ids that can be the last token of a step delimiter: only then can a step have just ended."""
    return frozenset(i for pattern in rm.step_tokens(tokenizer).delimiter.patterns for i in pattern[-1])


Policy = Callable[[list[Row], _Context], None]


def search(rm: ReflectiveModel, tokenizer, prompts: Sequence[str | Sequence[int]], config: SearchConfig,
           temperature: float = SAMPLING.temperature, top_p: float = SAMPLING.top_p, max_new_tokens: int = 512, seed: int = 0,
           repetition_penalty: float = SAMPLING.repetition_penalty, cancelled: Callable[[], bool] | None = None,
           run_rows: Callable[[list[RowSpec], Callable[[list[Row]], None]], list[Row]] | None = None,
           top_logprobs: int = 0) -> list[SearchResult]:
    """Run `config`'s search on each prompt (text verbatim, or token ids); one SearchResult per prompt.
    `cancelled()` returning True stops every row at its next token (a server's client went away).
    `run_rows(specs, after_token)` decodes each batch of the search's rows under its policy and returns
    them as `decode_rows` does (default: `decode_rows` on a batch of their own; a server passes one that
    joins its running batch - repetition penalty 1 and the model's step feature tokens). `top_logprobs` n
    keeps each token's n most likely alternatives (candidates' extra["top_logprobs"]).

    Example::

        results = search(rm, tok, [rm.format_prompt("What is 2 + 3?", tok)], SearchConfig("beam", k=8, width=4))
        best = select(results[0].complete, "sprm")
    """
    check_sampling(temperature, top_p, max_new_tokens)
    encoded = encode_prompts(rm, tokenizer, prompts, max_new_tokens)
    eos_ids = eos_token_ids(rm, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)
    ctx = _Context(rm, tokenizer, config, encoded, seed, _last_token_ids(rm, tokenizer))
    k, questions = config.k, range(len(encoded))
    ctx.next_row = {q: k for q in questions}  # rows 0..k-1 are the initial ones; forks number on from k

    def rows(first: int, last: int, group: int = 1) -> list[RowSpec]:
        # tag (question, group): beam and dvts choose survivors within a group
        return [RowSpec(encoded[q], max_new_tokens, temperature, top_p, row_seed(seed, q, j), tag=(q, j // group),
                        top_logprobs=top_logprobs) for q in questions for j in range(first, last)]

    def run(specs: list[RowSpec], policy: Policy | None) -> list[Row]:
        def after_token(batch: list[Row]) -> None:
            ctx.register(batch)
            if cancelled is not None and cancelled():
                for row in batch:
                    row.stop("cancelled")
                return
            if config.budget is not None:
                _enforce_budget(batch, ctx)
            if policy is not None:
                policy(batch, ctx)

        if run_rows is not None:
            return run_rows(specs, after_token)
        with eval_mode(rm):
            return decode_rows(rm, specs, eos_ids, pad_id, repetition_penalty, after_token=after_token,
                               feature_tokens=rm.step_feature_tokens(tokenizer))

    decoded = METHODS.lookup(config.method)(run, rows, ctx)
    return _results(rm, tokenizer, encoded, decoded, ctx)


@METHODS.register("best_of_n")
def _best_of_n(run, rows, ctx: _Context) -> list[Row]:
    return run(rows(0, ctx.config.k), None)


@METHODS.register("prune")
def _prune(run, rows, ctx: _Context) -> list[Row]:
    """Warm-up rows in full, then the rest cut once their running value falls below the warm-up's."""
    config = ctx.config
    w = config.warmup_rows
    warm = run(rows(0, w), _record_lowest)
    thresholds = {q: _percentile([ctx.track(r).lowest for r in warm if ctx.track(r).question == q
                                  and r.finish in ("eos", "length")], 100.0 - config.keep)
                  for q in range(len(ctx.prompts))}
    return warm + (run(rows(w, config.k), _pruner(thresholds)) if w < config.k else [])


@METHODS.register("beam")
def _beam(run, rows, ctx: _Context) -> list[Row]:
    """One group of k rows; at each step end the best k / width survive, `width` continuations each."""
    k = ctx.config.k
    return run(rows(0, k, k), _step_search(k, k // ctx.config.width))


@METHODS.register("dvts")
def _dvts(run, rows, ctx: _Context) -> list[Row]:
    """k / width independent groups of `width` rows, each keeping its best row at each step end."""
    width = ctx.config.width
    return run(rows(0, ctx.config.k, width), _step_search(width, 1))


def _enforce_budget(batch: list[Row], ctx: _Context) -> None:
    """Stop a question's running rows once all its rows together have generated `budget` tokens."""
    for q in {ctx.track(row).question for row in batch}:
        if sum(r.generated for r in ctx.rows_of[q]) >= ctx.config.budget:
            for row in batch:
                if row.running and ctx.track(row).question == q:
                    row.stop("budget")


def _record_lowest(batch: list[Row], ctx: _Context) -> None:
    """Warm-up rows only record their lowest running value."""
    for row in batch:
        if not row.paused:
            ctx.observe(row)


def _pruner(thresholds: dict[int, float]) -> Policy:
    def policy(batch: list[Row], ctx: _Context) -> None:
        for row in batch:
            if row.running:
                value = ctx.observe(row)
                if value is not None and value < thresholds[ctx.track(row).question]:
                    row.stop("pruned")
    return policy


def _step_search(group: int, keep: int) -> Policy:
    """Beam / DVTS: rows pause at each step end; when a group's running rows are all paused, its best
    `keep` survive and fill the group's free slots (group size minus its finished rows) with forks."""
    finished: dict[tuple, int] = {}  # (question, group) -> its rows that finished

    def policy(batch: list[Row], ctx: _Context) -> None:
        groups: dict[tuple, list[Row]] = {}
        for row in batch:
            key = (ctx.track(row).question, row.spec.tag[1])
            if not row.running:
                if row.finish in ("eos", "length"):
                    finished[key] = finished.get(key, 0) + 1
                continue
            if not row.paused and ctx.completed_step(row):
                row.pause()
            groups.setdefault(key, []).append(row)
        for key, members in groups.items():
            if not all(r.paused for r in members):
                continue  # the group's step is not over yet
            slots = group - finished.get(key, 0)
            ranked = sorted(members, key=lambda r: -ctx.track(r).running_score)  # stable: earlier rows win ties
            survivors = ranked[:max(0, min(keep, slots))]
            for r in ranked[len(survivors):]:
                r.stop("pruned")
            for i, r in enumerate(survivors):
                r.resume()
                share = slots // len(survivors) + (1 if i < slots % len(survivors) else 0)
                for _ in range(share - 1):
                    r.fork(ctx.fork_seed(key[0]), tag=r.spec.tag)

    return policy


def _percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile; -inf with no values (nothing is pruned)."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return -math.inf
    pos = (len(finite) - 1) * pct / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return finite[lo] + (finite[hi] - finite[lo]) * (pos - lo)


def _results(rm, tokenizer, encoded: list[list[int]], rows: list[Row], ctx: _Context) -> list[SearchResult]:
    results = [SearchResult([], 0, 0) for _ in encoded]
    for row in rows:
        q = ctx.track(row).question
        res = results[q]
        res.generated_tokens += row.generated
        res.rows += 1
        if row.finish == "pruned" and ctx.config.method in ("beam", "dvts"):
            continue  # a discarded partial beam: its tokens count, it is not a candidate
        c = to_candidate(rm, tokenizer, encoded[q], row.tokens, row.finish == "eos", row.features,
                         row.signal_matrix(), q, len(res.candidates), top=row.top)
        if row.finish not in ("eos", "length"):
            c.extra["stopped"] = row.finish
        c.extra["generated_tokens"] = row.generated
        res.candidates.append(c)
    return results

"""A request answered: n answers per prompt, each the best of k candidates (or of a search's), cut at stop
strings. The one home of "best of k": `sample()` fans out with `engine.candidate_rows`, `thinkscale serve` hands
an `AnswerRequest`'s rows to its scheduler and its candidates to `choose`, and `answer()` does both
offline - so a seeded request answers exactly as offline `sample` + `select` would (with stop strings: as
`answer()` offline, whose rows stop at them too; a search's rows are not stopped, only its answers cut).

    request = AnswerRequest([tokenizer.encode(prompt)], k=8, max_new_tokens=256, seed=0, stop=("\\n\\n",))
    [choice] = answer(rm, tokenizer, request)
    choice.text, choice.strategy, choice.candidate.score

Answer q (prompt p = q // n, choice i = q % n) uses candidate rows (q, 0..k-1), seeded
`row_seed(seed, q, j)`: the rows `sample([prompt p repeated n times], k, seed)` decodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .candidate import Candidate
from .engine import SAMPLING, Row, RowSpec, candidate_rows, decode_rows
from .generate import check_sampling, eos_token_ids, eval_mode, pad_token_id, to_candidate
from .search import SearchConfig, search
from .select import choosing_strategy, parse_strategy, select

BEST_OF_K = "best_of_n"  # the search name of k independent candidates (reflect.search's)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def stop_at_strings(rows: Sequence[Row], tokenizer, stop: Sequence[str]) -> None:
    """Stop each running row in which a stop string has just completed (an `after_token` policy). Only a
    row's tail is decoded (a token holds at least one byte, a character at most 4), not the whole row."""
    if not stop:
        return
    tail = 4 * max(len(s) for s in stop) + 4
    for row in rows:
        if row.running and cut_at_stop(tokenizer.decode(row.tokens[-tail:], skip_special_tokens=True), stop)[1]:
            row.stop("stop")


@dataclass(frozen=True)
class AnswerRequest:
    """What to answer and how (checked when made): token-id prompts; n answers per prompt, each chosen
    among k candidates by `selection` (a `select` strategy spec); `search` "best_of_n" (k independent
    samples) or a `reflect.search` spec; `stop` strings end a candidate (cut before selection);
    `top_logprobs` keeps each token's most likely alternatives; `seed` None draws one per call."""

    prompts: Sequence[Sequence[int]]
    n: int = 1
    k: int = 1
    max_new_tokens: int = 512
    temperature: float = SAMPLING.temperature
    top_p: float = SAMPLING.top_p
    seed: int | None = None
    stop: tuple[str, ...] = ()
    search: str = BEST_OF_K
    selection: str = "sprm"
    top_logprobs: int = 0
    search_config: SearchConfig | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("n", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise ValueError("give at least one prompt, none of them empty")
        check_sampling(self.temperature, self.top_p, self.max_new_tokens)
        parse_strategy(self.selection)  # an unknown strategy lists the valid ones
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.search != BEST_OF_K:
            object.__setattr__(self, "search_config", SearchConfig.parse(self.search, self.k))

    @property
    def answers(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, q: int) -> Sequence[int]:
        return self.prompts[q // self.n]

    def rows(self, seed: int) -> list[RowSpec]:
        """The candidate rows of a best-of-k request (`candidate_rows`)."""
        return candidate_rows(self.prompts, self.n, self.k, self.max_new_tokens, self.temperature, self.top_p, seed,
                              self.top_logprobs)

    def run_search(self, rm, tokenizer, seed: int, cancelled: Callable[[], bool] | None = None,
                   run_rows: Callable | None = None) -> "Decoded":
        """A searched request's candidates (one search over every answer's prompt; `run_rows`: see `search`)."""
        if self.search_config is None:
            raise ValueError("this request is best-of-k, not a search")
        prompts = [list(self.prompt_of(q)) for q in range(self.answers)]
        results = search(rm, tokenizer, prompts, self.search_config, self.temperature, self.top_p,
                         self.max_new_tokens, seed, cancelled=cancelled, run_rows=run_rows,
                         top_logprobs=self.top_logprobs)
        return Decoded([r.complete for r in results], sum(r.generated_tokens for r in results),
                       sum(r.stopped_rows for r in results))


@dataclass
class Decoded:
    """A request's candidates, one group per answer, and every token generated for them (a search's
    pruned and abandoned rows included)."""

    groups: list[list[Candidate]]
    generated_tokens: int
    stopped_rows: int = 0  # rows a search ended early (their tokens are what pruning saves)

    @classmethod
    def of_candidates(cls, request: AnswerRequest, candidates: Sequence[Candidate]) -> "Decoded":
        """Best-of-k candidates in row order (answer q's k candidates at q * k ...)."""
        k = request.k
        groups = [list(candidates[q * k:(q + 1) * k]) for q in range(request.answers)]
        return cls(groups, sum(c.num_generated_tokens for c in candidates))


@dataclass
class Choice:
    """One answer: the chosen candidate, its text (cut at a stop string), whether it ended (EOS or a stop
    string) rather than running out of tokens, and what chose it ("single" when k is 1)."""

    candidate: Candidate
    text: str
    finished: bool
    strategy: str
    group: list[Candidate]


def choose(request: AnswerRequest, decoded: Decoded, head_trained: bool = True, think_end: str | None = None,
           timeout_s: float | None = None) -> list[Choice]:
    """Each answer's choice among its candidates: texts cut at the stop strings first, then `select` with
    the request's strategy - or, where the head cannot choose (untrained, or no candidate has a scored
    step), with `choosing_strategy`'s named fallback."""
    choices = []
    for group in decoded.groups:
        cut = []
        for c in group:
            text, stopped = cut_at_stop(c.text, request.stop)
            cut.append(replace(c, text=text, finished=True, truncated=False) if stopped else c)
        strategy = choosing_strategy(request.selection, head_trained, cut)
        chosen = cut[0] if len(cut) == 1 else select(cut, strategy, think_end=think_end, timeout_s=timeout_s)
        choices.append(Choice(chosen, chosen.text, chosen.finished, strategy if request.k > 1 else "single", cut))
    return choices


def answer(rm, tokenizer, request: AnswerRequest, head_trained: bool | None = None,
           think_end: str | None = None) -> list[Choice]:
    """Answer `request` offline: decode its candidates (one batch) or run its search, then `choose`.
    `head_trained` defaults to what the model's head record says."""
    import torch

    seed = request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item())
    if request.search_config is not None:
        decoded = request.run_search(rm, tokenizer, seed)
    else:
        eos_ids = eos_token_ids(rm, tokenizer)
        at_stop = (lambda rows: stop_at_strings(rows, tokenizer, request.stop)) if request.stop else None
        with eval_mode(rm):
            rows = decode_rows(rm, request.rows(seed), eos_ids, pad_token_id(tokenizer, eos_ids),
                               after_token=at_stop, feature_tokens=rm.step_feature_tokens(tokenizer))
        decoded = Decoded.of_candidates(request, [row_candidate(rm, tokenizer, row, row.spec.tag[1]) for row in rows])
    trained = bool(rm.head_is_trained) if head_trained is None else head_trained
    return choose(request, decoded, trained, think_end)


def row_candidate(rm, tokenizer, row, sample_index: int) -> Candidate:
    """A decoded row as a Candidate (its sample_index: j of row (q, j)), with its top log-probs."""
    return to_candidate(rm, tokenizer, list(row.spec.prompt), row.tokens, row.finish == "eos", row.features,
                        row.signal_matrix(), sample_index=sample_index, top=row.top)

"""Where reasoning steps end: delimiter matching and the step mask (which positions the SPRM scores).

A delimiter is given as text (default ".\\n\\n"). Tokenizers differ in how they cut it: Qwen has one
token ".\\n\\n", GPT-2 writes "." + "\\n\\n", SmolLM2 writes "." + "\\n" + "\\n" in running text and
merges "." with what precedes it (")."). `delimiter_token_ids` therefore turns the text into a set of
*token patterns* read off the vocabulary:

- one token whose decoded text contains the delimiter, or
- a run of n >= 2 tokens that spells it across token boundaries: the first token's text *ends with*
  the first piece, middle tokens *are* the middle pieces, the last token's text *starts with* the
  last piece (so ")." + "\\n\\n\\n" matches ".\\n\\n").

A match is anchored at its first token: that is "the delimiter token" of the spec, and the scored
position is the one just before it (the hidden state that predicts the delimiter). The whole match
counts as delimiter for the "first of a consecutive run" rule, so ".\\n\\n.\\n\\n" is one step end
whichever way it was tokenized. Everything after that is vectorized torch on (B, T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch


@dataclass(frozen=True)
class Delimiter:
    """Token patterns that spell a delimiter text. Each pattern is a tuple of id sets, one per token.

        >>> from thinkscale.reflect import Delimiter
        >>> Delimiter(".\\n\\n", patterns=(((274,),), ((15,), (200,), (200,))))  # 1 token, or "." "\\n" "\\n"
        Delimiter(text='.\\n\\n', patterns=(((274,),), ((15,), (200,), (200,))))
    """

    text: str
    patterns: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        if not self.patterns or any(not p or any(not s for s in p) for p in self.patterns):
            raise ValueError(f"Delimiter {self.text!r} needs at least one pattern of non-empty id sets")


DelimiterIds = Union[Delimiter, int, Sequence[int], torch.Tensor]
# how think tags bound the scored region: thinkscale's (first think-start, last think-end of the
# response) or the MetaStone-S1 release scorer's (the single tag of each kind, else 0 / the end)
THINK_REGIONS = ("first_last", "single")


def _vocab_texts(tokenizer) -> dict[int, str]:
    """Decoded text of every non-special vocabulary token (special tokens never spell a delimiter)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return dict(zip(ids, texts))


def delimiter_token_ids(tokenizer, text: str, max_tokens: int = 4) -> Delimiter:
    """All ways `tokenizer` can write `text` in 1..max_tokens tokens, as a `Delimiter` (see module doc).

    Raises ValueError when no vocabulary token sequence spells the text.

        >>> from thinkscale.tasks.policy import tiny_policy
        >>> _, tokenizer = tiny_policy()
        >>> from thinkscale.reflect import delimiter_token_ids
        >>> delimiter = delimiter_token_ids(tokenizer, ".\\n\\n")
        >>> [[tokenizer.decode(ids[0]) for ids in pattern] for pattern in delimiter.patterns]  # 1 or 3 tokens
        [['.\\n\\n'], ['.', '\\n', '\\n']]
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"delimiter text must be a non-empty string, got {text!r}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    vocab = _vocab_texts(tokenizer)
    exact: dict[str, list[int]] = {}
    for i, t in vocab.items():
        exact.setdefault(t, []).append(i)

    patterns: list[tuple[tuple[int, ...], ...]] = []
    whole = tuple(sorted(i for i, t in vocab.items() if text in t))
    if whole:
        patterns.append((whole,))
    n = len(text)
    # prefix/suffix id sets, computed once per cut point
    ends_with = {j: tuple(sorted(i for i, t in vocab.items() if t.endswith(text[:j]))) for j in range(1, n)}
    starts_with = {j: tuple(sorted(i for i, t in vocab.items() if t.startswith(text[j:]))) for j in range(1, n)}

    def extend(cut: int, sets: list[tuple[int, ...]]) -> None:
        # `sets` spell text[:cut]; finish with a last token or continue with an exact middle token
        if starts_with[cut]:
            patterns.append(tuple(sets) + (starts_with[cut],))
        if len(sets) + 2 > max_tokens:
            return
        for nxt in range(cut + 1, n):
            middle = exact.get(text[cut:nxt])
            if middle:
                extend(nxt, sets + [tuple(sorted(middle))])

    if max_tokens >= 2:
        for j in range(1, n):
            if ends_with[j]:
                extend(j, [ends_with[j]])
    if not patterns:
        raise ValueError(
            f"the tokenizer cannot produce the step delimiter {text!r} in at most {max_tokens} tokens; "
            "choose a delimiter made of text the tokenizer can write"
        )
    return Delimiter(text, tuple(patterns))


def release_delimiter(tokenizer, text: str) -> Delimiter:
    """The MetaStone-S1 release's delimiter rule: every id the tokenizer encodes `text` to counts on its
    own (one pattern of one token). With a tokenizer that has `text` as one token (Qwen's ".\\n\\n") that is
    that token alone, where `delimiter_token_ids` also takes tokens that merely contain it (".\\n\\n\\n")."""
    ids = tuple(sorted(set(tokenizer.encode(text, add_special_tokens=False))))
    if not ids:
        raise ValueError(f"the tokenizer encodes the step delimiter {text!r} to no token")
    return Delimiter(text, ((ids,),))


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer writes it as exactly one token (e.g. a "<think>" tag), else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def _as_patterns(delimiter_ids: DelimiterIds, device: torch.device) -> list[list[torch.Tensor]]:
    if isinstance(delimiter_ids, Delimiter):
        raw = delimiter_ids.patterns
    else:
        ids = torch.as_tensor(delimiter_ids).flatten().tolist()
        if not ids:
            raise ValueError("delimiter_ids is empty: give at least one delimiter token id or a Delimiter")
        raw = ((tuple(ids),),)
    return [[torch.tensor(s, dtype=torch.long, device=device) for s in p] for p in raw]


def delimiter_starts(input_ids: torch.Tensor, delimiter_ids: DelimiterIds) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, covered), both (B, T) bool: where a delimiter match begins, and every token inside one."""
    B, T = input_ids.shape
    starts = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
    covered = torch.zeros_like(starts)
    for pattern in _as_patterns(delimiter_ids, input_ids.device):
        n = len(pattern)
        if n > T:
            continue
        width = T - n + 1
        match = torch.ones(B, width, dtype=torch.bool, device=input_ids.device)
        for k, id_set in enumerate(pattern):
            match &= torch.isin(input_ids[:, k : k + width], id_set)
        starts[:, :width] |= match
        for k in range(n):
            covered[:, k : k + width] |= match
    return starts, covered


def step_mask(
    input_ids: torch.Tensor,
    delimiter_ids: DelimiterIds,
    think_start_id: int | None = None,
    think_end_id: int | None = None,
    response_start: int | torch.Tensor = 0,
    attention_mask: torch.Tensor | None = None,
    think_region: str = "first_last",
) -> torch.Tensor:
    """Bool mask (B, T) of scored positions: position i is set when token i+1 ends a reasoning step.

    A delimiter match at position d counts when all hold:
    - it is the first of a consecutive run (the token before it is not part of another match);
    - the token before it is not `think_start_id`;
    - d >= response_start (int, or a (B,) tensor for right-padded batches whose prompts differ in length);
    - with `think_start_id`: some think-start occurs before d (anywhere, so a chat template that opens
      the think block in the prompt works); a row with no think-start at all is scored over its whole
      response, as the released training code does (first think-start, else position 0); with
      `think_end_id`: d is before the last think-end of the response (think-ends before
      `response_start` are ignored; none yet -> to the end);
    - `attention_mask[b, d]` is 1 when a mask is given.
    The counted delimiter mask is then shifted left by one.

    `think_region="single"` replaces the two think-tag conditions by the MetaStone-S1 release scorer's:
    the scored position d - 1 lies strictly between the think-start and the think-end, each taken
    only when the row holds exactly one of it (anywhere, prompt included), else position 0 / the end
    of the row. They differ when a tag is repeated (the release then counts steps before the first
    think-start or after the last think-end) and at position 0. One difference stays: only delimiters
    at or after `response_start` count here, while the release scorer, reading prompt + response as one
    text, also counts delimiters in a prompt when no single think-start comes after them.

    Padding: left-padded batches (generation) pass the padded prompt length as `response_start`;
    right-padded batches (training) pass per-row prompt lengths and `attention_mask` so that pad
    tokens never count, even when the pad id happens to be a delimiter.

    `input_ids` may also be 1-D (one sequence); the result then has shape (T,).

        >>> import torch
        >>> from thinkscale.reflect import step_mask
        >>> step_mask(torch.tensor([[5, 9, 7, 9, 9, 2]]), delimiter_ids=9)  # token 9 ends a step; "9 9" is one end
        tensor([[ True, False,  True, False, False, False]])
    """
    if think_region not in THINK_REGIONS:
        raise ValueError(f"think_region must be one of {', '.join(THINK_REGIONS)}, got {think_region!r}")
    if input_ids.dim() == 1:
        rs = response_start
        am = None if attention_mask is None else attention_mask[None]
        return step_mask(input_ids[None], delimiter_ids, think_start_id, think_end_id, rs, am, think_region)[0]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T) or (T,), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    device = input_ids.device
    pos = torch.arange(T, device=device)[None, :]  # (1, T)
    if isinstance(response_start, torch.Tensor):
        if response_start.shape not in ((B,), ()):
            raise ValueError(f"response_start must be an int or a ({B},) tensor, got shape {tuple(response_start.shape)}")
        rs = response_start.to(device).reshape(-1, 1)  # (B, 1) or (1, 1)
    else:
        if response_start < 0:
            raise ValueError(f"response_start must be >= 0, got {response_start}")
        rs = torch.tensor([[response_start]], device=device)
    in_response = pos >= rs  # (B, T)

    starts, covered = delimiter_starts(input_ids, delimiter_ids)
    prev_covered = torch.zeros_like(covered)
    prev_covered[:, 1:] = covered[:, :-1]
    counted = starts & ~prev_covered & in_response

    if think_start_id is not None:  # never the delimiter right after a think-start (both regions)
        prev_is_start = torch.zeros_like(counted)
        prev_is_start[:, 1:] = input_ids[:, :-1] == think_start_id
        counted &= ~prev_is_start
    if think_region == "single":
        counted &= _single_tag_region(input_ids, think_start_id, think_end_id, attention_mask)
    else:
        if think_start_id is not None:
            is_start = (input_ids == think_start_id).to(torch.int64)
            starts_before = torch.cumsum(is_start, dim=1) - is_start  # think-starts strictly before i
            no_start = is_start.sum(dim=1, keepdim=True) == 0  # no think block: the whole response counts
            counted &= (starts_before > 0) | no_start
        if think_end_id is not None:
            is_end = ((input_ids == think_end_id) & in_response).to(torch.int64)
            ends_from = torch.flip(torch.cumsum(torch.flip(is_end, [1]), dim=1), [1])  # ends at >= i
            ends_after = ends_from - is_end  # ends strictly after i
            counted &= (ends_after > 0) | (is_end.sum(dim=1, keepdim=True) == 0)
    if attention_mask is not None:
        counted &= attention_mask.to(torch.bool)

    scored = torch.zeros_like(counted)
    scored[:, :-1] = counted[:, 1:]
    return scored


def _single_tag_region(input_ids: torch.Tensor, start_id: int | None, end_id: int | None,
                       attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool over delimiter positions d: start < d - 1 < end, where start / end is the position of
    the row's only think-start / think-end tag, else 0 / T (the release scorer's region)."""
    B, T = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
    pos = torch.arange(T, device=input_ids.device)[None, :]

    def only(tag_id: int | None, otherwise: int) -> torch.Tensor:  # (B, 1)
        fallback = torch.full((B, 1), otherwise, device=input_ids.device)
        if tag_id is None:
            return fallback
        is_tag = (input_ids == tag_id) & real
        return torch.where(is_tag.sum(dim=1, keepdim=True) == 1, is_tag.long().argmax(dim=1, keepdim=True), fallback)

    scored_at = pos - 1
    return (scored_at > only(start_id, 0)) & (scored_at < only(end_id, T))

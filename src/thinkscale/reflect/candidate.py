"""The one record every sampler, selector and evaluator in `reflect` passes around."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Candidate:
    """One sampled trajectory for one prompt, with its SPRM scores.

    `step_scores` are per-step probabilities (sigmoid of the head's logit at each scored position);
    `score` is their geometric mean (0.0 when the trajectory has no step). `step_ends[j]` is the index in
    `token_ids` of step j's delimiter token. The `token_*` lists hold the free confidence signals of each
    generated token (see `reflect.confidence`); empty for candidates recorded before they existed.

        >>> from thinkscale.reflect import Candidate
        >>> c = Candidate(prompt_index=0, sample_index=3, text="2 + 2 = 4", token_ids=[7, 9, 11],
        ...               step_scores=[0.9, 0.6], score=0.73, finished=True, truncated=False,
        ...               num_prompt_tokens=5, num_generated_tokens=3, extra={"answer": "4"})
        >>> Candidate.from_dict(c.to_dict()) == c     # a line of `thinkscale eval`'s candidates.jsonl
        True
    """

    prompt_index: int
    sample_index: int
    text: str  # the completion only, special tokens kept out
    token_ids: list[int]  # completion token ids (prompt excluded, EOS included when generated)
    step_scores: list[float]
    score: float
    finished: bool  # stopped on EOS
    truncated: bool  # stopped at max_new_tokens without EOS
    num_prompt_tokens: int
    num_generated_tokens: int
    step_ends: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    token_confidences: list[float] = field(default_factory=list)
    token_certainties: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # e.g. extracted answer, correctness, set by evaluators

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        return cls(**data)

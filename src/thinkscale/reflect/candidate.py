"""The one record every sampler, selector and evaluator in `reflect` passes around."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Candidate:
    """One sampled trajectory for one prompt, with its SPRM scores.

    `step_scores` are per-step probabilities (sigmoid of the head's logit at each scored position);
    `score` is their geometric mean (0.0 when the trajectory has no step).
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
    extra: dict = field(default_factory=dict)  # e.g. extracted answer, correctness, set by evaluators

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        return cls(**data)

"""The quick checks that training stages share: how an answer is graded, and answers sampled and graded.

    is_right = outcome_grader(rm, task)                       # (completion text, example) -> bool
    groups, correct = sample_graded(rm, tokenizer, examples, is_right, k=8, temperature=0.6, ...)

`thinkscale eval` (reflect.evaluate) is the full harness: every selector at every k, files written and
resumable. These are the short checks a stage runs at its end: sft's pass@1, grpo's pass@1 and the
SPRM's best-of-k on a few questions, and the rollouts the head fits from.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..reflect.generate import encode_prompt
from ..tasks.jsonl import Example


def outcome_grader(rm, task: str | None) -> Callable[[str, Example], bool]:
    """grade(completion_text, example) -> bool: the task's grader, or math equivalence with the answer."""
    from ..tasks.grading import grade

    think_end = rm.config.think_tags[1] if rm.config.think_tags is not None else None
    if task is None:
        return lambda text, e: grade(text, e.answer, think_end=think_end)
    from ..tasks.registry import get_task

    chosen = get_task(task)
    return lambda text, e: chosen.grade(text, e.question, e.answer, think_end, meta=e.meta)


@torch.no_grad()
def sample_graded(rm, tokenizer, examples: Sequence[Example], is_right: Callable[[str, Example], bool], *, k: int,
                  temperature: float, top_p: float, max_new_tokens: int, seed: int | None = None,
                  score: bool = True) -> tuple[list[list], torch.Tensor]:
    """k answers per question from reflect's sampler (greedy at temperature 0) in the model's prompt format,
    and whether each is right: (candidate groups, (questions, k) bool tensor)."""
    from ..reflect import sample

    prompts = [encode_prompt(tokenizer, rm.format_prompt(e.question, tokenizer)) for e in examples]
    groups = sample(rm, tokenizer, prompts, k=k, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, seed=seed, batch_size=64, score=score)
    correct = torch.tensor([[bool(is_right(c.text, e)) for c in g] for g, e in zip(groups, examples)])
    return groups, correct

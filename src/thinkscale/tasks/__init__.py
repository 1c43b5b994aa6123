"""Reasoning tasks and the text format every policy in thinkscale reads and writes.

The format (one convention for the built-in task, user data, SFT and the reflective model):

    prompt     = PROMPT_TEMPLATE.format(question=...)      "What is 2 + 3 * 4?\\n<think>\\n"
    completion = one step per line, each ending with STEP_DELIMITER, then the think-end tag and the
                 final answer in \\boxed{}:                "3 * 4 = 12.\\n\\n2 + 12 = 14.\\n\\n</think>\\n\\boxed{14}"
    training target = completion + EOS (added by the tokenizer, see `tasks.tokenizer`).

The prompt ends inside the think block, so the model's first generated token is already reasoning;
the step delimiter directly after the think-start tag is therefore never produced (the reflect step
mask ignores it anyway).

Modules: `registry` (every task by name: `arithmetic` and `countdown`, seeded built-in tasks with step
checkers; `gym`, reasoning-gym datasets as `gym:NAME[:key=value,...]`), `grading` (answer extraction and
math equivalence), `splits` (seeded disjoint splits), `jsonl` (user data), `tokenizer` (a BPE trained on
the task text), `policy` (a small causal LM built from a config). Nothing here imports reflect, train,
serve, pipeline, commands or bench.
"""
from __future__ import annotations

from collections.abc import Sequence

THINK_START = "<think>"
THINK_END = "</think>"
STEP_DELIMITER = ".\n\n"
PROMPT_TEMPLATE = "{question}\n" + THINK_START + "\n"


def format_prompt(question: str) -> str:
    """The prompt the policy continues: the question, then an open think block."""
    return PROMPT_TEMPLATE.format(question=question)


def format_completion(steps: Sequence[str], answer: str) -> str:
    """The completion for `steps` (each without its delimiter) and the final `answer` (EOS not included)."""
    for step in steps:
        if STEP_DELIMITER in step or THINK_END in step:
            raise ValueError(f"a step must not contain the step delimiter or think-end tag: {step!r}")
    body = "".join(step + STEP_DELIMITER for step in steps)
    return f"{body}{THINK_END}\n\\boxed{{{answer}}}"


def completion_from_solution(solution: str, answer: str) -> str:
    """The training completion for a user-written `solution`.

    A solution already in the model's format (it contains the think-end tag) is used as is; otherwise it
    is taken as the reasoning text: it is closed with a step delimiter if it lacks one, then the
    think-end tag and the boxed answer are appended.
    """
    if THINK_END in solution:
        return solution
    text = solution.rstrip()
    if not text:
        raise ValueError("solution is empty")
    if not text.endswith("."):
        text += "."
    return f"{text}\n\n{THINK_END}\n\\boxed{{{answer}}}"


def completion_steps(text: str) -> list[str]:
    """The finished reasoning steps of a completion (text without the prompt), delimiters removed.

    Only the think part counts (before the first think-end tag, or all of it when there is none), and
    only text followed by a delimiter is a step: these line up one to one with the steps the SPRM scores
    (`reflect.step_mask` counts the same delimiters). A leading think-start tag is dropped.
    """
    think = text.split(THINK_END, 1)[0]
    if think.startswith(THINK_START):
        think = think[len(THINK_START):].lstrip("\n")
    return think.split(STEP_DELIMITER)[:-1]


def reflect_config() -> dict:
    """What the reflective model needs to know about this format (written as reflect_config.json)."""
    return {
        "prompt_template": PROMPT_TEMPLATE,
        "step_delimiter": STEP_DELIMITER,
        "think_tags": [THINK_START, THINK_END],
    }


__all__ = [
    "THINK_START",
    "THINK_END",
    "STEP_DELIMITER",
    "PROMPT_TEMPLATE",
    "format_prompt",
    "format_completion",
    "completion_from_solution",
    "completion_steps",
    "reflect_config",
]

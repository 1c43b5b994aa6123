"""The built-in tasks by name: what the demo, SFT, GRPO and eval need to know about each.

    task = get_task("countdown")
    splits = task.make_splits(task.demo_config, seed=0, n_train=20000, n_test=200, n_hard=100,
                              hard_config=task.demo_hard_config)
    task.grade(completion_text, question, reference)       # the outcome reward
    task.truth(question, completion_text)                   # per-step truth, or None
    task.equivalent                                         # answer equality for votes (None: math)

- arithmetic: one right answer per question (a number), graded by math equivalence; voting works.
- countdown: many right answers (any expression that uses the numbers once and hits the target),
  graded by exact evaluation; two answers vote together only when their normalized texts are equal,
  so majority voting cannot carry the answer (the setting a process reward model is for).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from . import THINK_END, arithmetic, completion_steps, countdown


@dataclass(frozen=True)
class Task:
    """A built-in task: data generation, outcome grading, answer equality for votes, step truth."""

    name: str
    description: str
    make_splits: Callable  # (config, seed, n_train, n_test, n_hard, hard_config) -> {split: [Problem]}
    demo_config: object
    demo_hard_config: object
    grade_answer: Callable[[str, str, str, "str | None"], bool]  # (completion, question, reference, think_end)
    step_truth: Callable[[str, Sequence[str]], list]  # (question, steps) -> per-step truth
    equivalent: Callable[[str, str], bool] | None = None  # None: math equivalence (reflect.grade)
    demo_num_train: int = 20000  # training questions of the demo (the task's space must hold that many)

    def grade(self, completion: str, question: str, reference: str, think_end: str | None = THINK_END) -> bool:
        """Whether a completion's final answer is right (never raises)."""
        return bool(self.grade_answer(completion, question, reference, think_end))

    def truth(self, question: str, completion: str) -> list[bool] | None:
        """Per-step truth of a completion's finished steps; None when the question is not this task's."""
        try:
            return list(self.step_truth(question, completion_steps(completion)))
        except ValueError:
            return None


def _math_grade(completion: str, question: str, reference: str, think_end: str | None) -> bool:
    from ..reflect.grade import grade

    return grade(completion, reference, think_end=think_end)


def _countdown_equal(a: str, b: str) -> bool:
    return countdown.normalize_answer(a) == countdown.normalize_answer(b)


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        name="arithmetic",
        description="2-4 additions and subtractions of one-digit numbers (hard: 5-6, longer than any training problem)",
        make_splits=arithmetic.make_splits,
        # Sized so a ~1M-parameter policy learns it in ~2 minutes on 2 cores and is right often but not
        # always (test-time scaling needs diversity).
        demo_config=arithmetic.ArithmeticConfig(min_ops=2, max_ops=4, min_digits=1, max_digits=1,
                                                operators=("+", "-"), max_value=99),
        demo_hard_config=arithmetic.ArithmeticConfig(min_ops=5, max_ops=6, min_digits=1, max_digits=1,
                                                     operators=("+", "-"), max_value=99),
        grade_answer=_math_grade,
        step_truth=arithmetic.step_truth,
    ),
    "countdown": Task(
        name="countdown",
        description="reach the target with 3 numbers and + - * / (hard: 4 numbers); many right answers",
        make_splits=countdown.make_splits,
        demo_config=countdown.CountdownConfig(),
        demo_hard_config=countdown.CountdownConfig().harder(),
        grade_answer=lambda completion, question, reference, think_end: countdown.grade(completion, question, think_end),
        step_truth=countdown.step_truth,
        equivalent=_countdown_equal,
        # ~10k distinct puzzles lie in the training pool of the default config: 8000 leaves room to draw
        demo_num_train=8000,
    ),
}


def get_task(name: str) -> Task:
    """The built-in task called `name`; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def names() -> list[str]:
    return list(TASKS)

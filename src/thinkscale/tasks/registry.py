"""Every task by name: what the demo, SFT, GRPO and eval need to know about each.

    task = get_task("countdown")                   # a built-in task
    task = get_task("gym:chain_sum:max_terms=3")   # a reasoning-gym dataset (tasks.gym; the `gym` extra)
    splits = task.make_splits(task.demo_config, seed=0, n_train=20000, n_test=200, n_hard=100,
                              hard_config=task.demo_hard_config)
    task.grade(completion_text, question, reference, meta=example.meta)   # the outcome reward
    task.truth(question, completion_text)          # per-step truth, or None (no step checker)
    task.equivalent                                # answer equality for votes (None: math equivalence)

Task names: `arithmetic`, `countdown`, or `gym:NAME[:key=value,...]` (read by `thinkscale.spec`; see
`tasks.gym` for the datasets and their options).

- arithmetic: one right answer per question (a number), graded by math equivalence; voting works.
- countdown: many right answers (any expression that uses the numbers once and hits the target),
  graded by exact evaluation; two answers vote together only when their normalized texts are equal,
  so majority voting cannot carry the answer (the setting a process reward model is for).
- gym:NAME: graded by the dataset's own `score_answer`; votes per dataset (`tasks.gym`); no step
  checker, so step AUC is reported as n/a.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

from . import THINK_END, arithmetic, completion_steps, countdown, gym
from ..spec import Registry
from .grading import grade as math_grade

GYM_NAMES = "gym:NAME[:key=value,...]"  # how the help texts write the reasoning-gym task names


@dataclass(frozen=True)
class Task:
    """A task: data generation, outcome grading, answer equality for votes, step truth (when it has a checker)."""

    name: str
    description: str
    make_splits: Callable  # (config, seed, n_train, n_test, n_hard, hard_config) -> {split: [Problem]}
    demo_config: object
    demo_hard_config: object
    # (completion, question, reference, think_end, meta) -> bool; meta: the example's other fields
    grade_answer: Callable[[str, str, str, "str | None", "dict | None"], bool]
    step_truth: Callable[[str, Sequence[str]], list] | None = None  # (question, steps) -> per-step truth
    equivalent: Callable[[str, str], bool] | None = None  # None: math equivalence (tasks.grading)
    demo_num_train: int = 20000  # training questions of the demo (the task's space must hold that many)
    check_examples: Callable[[Sequence, str], None] | None = None  # refuses data this task cannot grade

    def grade(self, completion: str, question: str, reference: str, think_end: str | None = THINK_END,
              meta: dict | None = None) -> bool:
        """Whether a completion's final answer is right (never raises). `meta`: the example's fields
        beyond question, answer and solution (`Example.meta`; gym tasks read their metadata there)."""
        return bool(self.grade_answer(completion, question, reference, think_end, meta))

    def truth(self, question: str, completion: str) -> list[bool] | None:
        """Per-step truth of a completion's finished steps; None when the task has no step checker or the
        question is not this task's."""
        if self.step_truth is None:
            return None
        try:
            return list(self.step_truth(question, completion_steps(completion)))
        except ValueError:
            return None

    def check(self, examples: Sequence, source: str = "data") -> None:
        """ValueError (one line) when `examples` (tasks.jsonl.Example) lack what this task grades with."""
        if self.check_examples is not None:
            self.check_examples(examples, source)


def _math_grade(completion: str, question: str, reference: str, think_end: str | None, meta: dict | None) -> bool:
    return math_grade(completion, reference, think_end=think_end)


def _countdown_grade(completion: str, question: str, reference: str, think_end: str | None, meta: dict | None) -> bool:
    return countdown.grade(completion, question, think_end)


def _countdown_equal(a: str, b: str) -> bool:
    return countdown.normalize_answer(a) == countdown.normalize_answer(b)


TASKS: Registry[Task] = Registry("task", {
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
        grade_answer=_countdown_grade,
        step_truth=countdown.step_truth,
        equivalent=_countdown_equal,
        # ~10k distinct puzzles lie in the training pool of the default config: 8000 leaves room to draw
        demo_num_train=8000,
    ),
})


def get_task(name: str) -> Task:
    """The task called `name`: a built-in one, or `gym:NAME[:key=value,...]`; an unknown name lists the
    valid ones (a bad gym name says what is wrong, in one line)."""
    if isinstance(name, str) and name.strip().startswith(gym.PREFIX):
        return _gym_task(name.strip())
    return TASKS.lookup(name, also=f"{GYM_NAMES} (reasoning-gym datasets)")


@functools.lru_cache(maxsize=64)
def _gym_task(name: str) -> Task:
    """A reasoning-gym dataset as a Task (built once per name: its scorer is created once)."""
    config = gym.parse(name)
    hard = gym.hard_config(config)
    return Task(
        name=name,
        description=gym.describe(config, hard),
        make_splits=gym.make_splits,
        demo_config=config,
        demo_hard_config=hard,
        grade_answer=gym.grader(config),
        step_truth=None,
        equivalent=gym.equivalence(config.dataset),
        demo_num_train=gym.DEMO_NUM_TRAIN,
        check_examples=gym.check_examples,
    )


def check_solutions(task: Task, config: object = None) -> None:
    """ValueError (one line) when `task` gives no worked solutions, SFT's targets (one problem is drawn
    with `config`, the task's demo config by default)."""
    config = task.demo_config if config is None else config
    problem = task.make_splits(config, 0, 1, 0, 0, hard_config=config)["train"][0]
    _ = problem.completion  # raises when the task has no solution text


def names() -> list[str]:
    """The built-in tasks' names (reasoning-gym datasets are named `gym:NAME`, see `help_text`)."""
    return list(TASKS)


def help_text() -> str:
    """What --task accepts, for every command's help."""
    built_in = "; ".join(f"{t.name}: {t.description}" for t in TASKS.values())
    return (f"{built_in}; or {GYM_NAMES}: a reasoning-gym dataset with options (e.g. gym:chain_sum, "
            "gym:gsm_symbolic, gym:countdown:min_numbers=3,max_numbers=4; needs pip install 'thinkscale[gym]')")


def file_name(name: str) -> str:
    """A task name as a file or folder name ("gym:chain_sum:max_terms=3" -> "gym-chain_sum-max_terms=3")."""
    return "".join(c if c.isalnum() or c in "_.=+-" else "-" for c in name)

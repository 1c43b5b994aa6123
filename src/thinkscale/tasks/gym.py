"""reasoning-gym datasets as thinkscale tasks: `gym:NAME` or `gym:NAME:key=value,...`.

    thinkscale data --task gym:chain_sum --out data/chain_sum
    thinkscale eval --task gym:chain_sum:min_terms=2,max_terms=3 --data data/chain_sum/test.jsonl --model M
    get_task("gym:countdown:min_numbers=3,max_numbers=4")      # tasks.registry builds the Task

An optional extra (`pip install 'thinkscale[gym]'`): nothing here imports reasoning_gym until a gym task
is used. NAME is a dataset of `reasoning_gym.factory.DATASETS`; the options are fields of its config
dataclass (typed by `thinkscale.spec` against the field types; `seed` and `size` are thinkscale's).

Questions: `reasoning_gym.create_dataset(NAME, size=CHUNK, seed=s, **options)`, entries read in order,
one dataset after another, with seeds hashed from (NAME, seed, split, chunk number): a split's questions
are a pure function of the task name, the seed and the sizes (reasoning-gym 0.1.25 generates the same
entries in every process, whatever PYTHONHASHSEED). The question text is the dataset's own.

Splits are disjoint by construction, with the built-in tasks' mechanism (`splits.take_distinct`): a hash
of the question text puts it in the training pool or the evaluation pool; train keeps the training
pool's questions, test and hard the evaluation pool's, hard skips test's, and repeats are dropped. So no
question is in two splits, for any seeds and sizes. (Seeds alone would not do it: many generators seed
entry i with seed + i, so datasets of nearby seeds share most of their entries.)

Hard split: where the question length has a knob (`HARDER`: terms, numbers, animals), hard questions
are longer than any training question: that count is drawn from [max + 1, max + 2], max being the
config's upper bound. Every other dataset has no such notion here, and its hard split is test-like: the
same config, other questions (the task's description says which).

Grading: the model writes the format of every thinkscale task (steps, the think-end tag, then
`\\boxed{answer}`); the answer is the last box after the think-end tag (`grading.extract_answer`, as for
the built-in tasks, so selection and votes read answers one way). It goes to the dataset's own
`score_answer` with the entry rebuilt from the record: {"question", "answer", "metadata"} (the metadata
is saved with every record, made JSON-ready); a score of 1.0 is correct, anything less (the partial
credit some scorers give) wrong, and so is a completion without an answer. reasoning-gym's own
`<answer>` tags are not read. Records without metadata are refused (`check_examples`) rather than
graded wrong in silence. The scorers run in this process without a time limit (countdown's and
puzzle24's evaluate the answer with sympy).

Votes (`vote_text`, the task's `equivalent`): two answers vote together when their vote texts are equal,
a refinement of the scorer (answers that vote together are graded alike):
- numbers by value, "4" = "4.0" = "4.00", for the datasets whose scorer compares values
  (`VOTE_BY_VALUE`: chain_sum, decimal_chain_sum, gsm_symbolic, products);
- expressions by their normalized text (`countdown.normalize_answer`: spaces and redundant parentheses
  dropped; `VOTE_BY_EXPRESSION`: countdown, puzzle24);
- every other dataset by exact text (stripped). This includes number answers whose scorer compares text:
  basic_arithmetic, leg_counting, gcd, lcm and simple_equations score "4.0" below 1 when the answer is "4".

Worked solutions for SFT: only where an entry carries one (`SOLUTION_FIELDS`: gsm_symbolic's
`answer_cot`); each of its lines becomes a step (a trailing period or colon replaced by the step
delimiter; the closing "#### answer" line dropped). SFT on any other dataset fails with one line
(`GymProblem.completion`); eval and grpo need no solution.

Datasets checked with reasoning-gym 0.1.25 (options: the config fields, defaults in brackets):
- chain_sum: min_terms [2], max_terms [6], min_digits [1], max_digits [4], allow_negation [false].
  "4 - 1 - 7 =" -> -4. Hard: more terms.
- basic_arithmetic: as chain_sum plus operators [+ - * /], allow_parentheses [true], format_style
  [simple], whitespace [single]. Hard: more terms.
- decimal_chain_sum: as chain_sum plus min/max_decimal_places [1, 4]. Hard: more terms.
- products: min_terms [2], max_terms [2], min_digits [1], max_digits [5], allow_negation. Hard: more terms.
- gsm_symbolic: difficulty [1.0, the only value it takes]; GSM8K-style word problems with a worked
  solution (SFT works). Hard: test-like.
- countdown: min_numbers [4], max_numbers [6], min_value [1], max_value [100], min_target [100],
  max_target [999], operators. Many right answers. Slow: ~13 ms per question (~50 ms at 7-8 numbers,
  the hard split), 10x that per test or hard question kept. Hard: more numbers.
- puzzle24: operators, min_value [1], max_value [10]; make 24, many right answers. ~50 ms per question.
  Hard: test-like.
- leg_counting: min_animals [3], max_animals [10, at most 37], min_instances [1], max_instances [15].
  Hard: more animals.
- gcd, lcm: min_numbers [2], max_numbers [2], min_value [1], max_value [1000 / 100]. Hard: more numbers.
- simple_equations: min_terms [2], max_terms [4], min_value, max_value, operators. Hard: more terms.
- prime_factorization (min_value, max_value), fraction_simplification, base_conversion, number_sorting,
  syllogism ("Yes"/"No"), knights_knaves: generate and grade; votes by exact text; hard test-like.
Refused: datasets whose entries have no reference answer (e.g. propositional_logic, graph_color,
rush_hour: their scorers check free-form answers), and those in `UNSUPPORTED` (time_intervals reads
today's date, so a seed does not fix its questions). Other datasets are untested: try them with
`thinkscale data`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from . import STEP_DELIMITER, THINK_END, format_completion, format_prompt, splits
from .countdown import normalize_answer as normalize_expression
from .grading import extract_answer, normalize_answer
from ..spec import field_types, split_spec, typed_options

logger = logging.getLogger(__name__)

PREFIX = "gym:"
INSTALL_HINT = "reasoning-gym is not installed: pip install 'thinkscale[gym]'"
CHUNK = 500  # entries per generated dataset (the library's default size)
DEMO_NUM_TRAIN = 2000  # training questions of `thinkscale data` / the demo by default
MAX_MISSES_IN_A_ROW = 200  # x10 for test and hard: some generators take 50 ms a question
HARDER: dict[str, tuple[str, str]] = {  # dataset -> (lower, upper) config fields of the count a hard question raises
    "chain_sum": ("min_terms", "max_terms"),
    "basic_arithmetic": ("min_terms", "max_terms"),
    "decimal_chain_sum": ("min_terms", "max_terms"),
    "products": ("min_terms", "max_terms"),
    "simple_equations": ("min_terms", "max_terms"),
    "leg_counting": ("min_animals", "max_animals"),
    "countdown": ("min_numbers", "max_numbers"),
    "gcd": ("min_numbers", "max_numbers"),
    "lcm": ("min_numbers", "max_numbers"),
}
VOTE_BY_VALUE = ("chain_sum", "decimal_chain_sum", "gsm_symbolic", "products")
VOTE_BY_EXPRESSION = ("countdown", "puzzle24")
SOLUTION_FIELDS = {"gsm_symbolic": "answer_cot"}  # dataset -> metadata field holding a worked solution
UNSUPPORTED = {"time_intervals": "its questions depend on today's date, so a seed does not fix them"}
_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
_GSM_FINAL = re.compile(r"^####\s")  # GSM8K's closing "#### 42" line


def library():
    """The reasoning_gym module; ValueError with the install hint when the extra is missing."""
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return reasoning_gym


def dataset_names() -> list[str]:
    """Every dataset reasoning-gym registers (sorted)."""
    library()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


# ---------------------------------------------------------------- configs

@dataclass(frozen=True)
class GymConfig:
    """A dataset and the options given for it (the rest keep the library's defaults)."""

    dataset: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        listed = ",".join(f"{k}={_show(v)}" for k, v in self.options)
        return f"{PREFIX}{self.dataset}" + (f":{listed}" if listed else "")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def create(self, size: int, seed: int):
        """The library's dataset for these options (ValueError, one line, when they are invalid)."""
        reasoning_gym = library()
        try:
            return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.kwargs)
        except (AssertionError, TypeError, ValueError) as error:  # the configs validate with assert
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"task {str(self)!r}: invalid options for reasoning-gym's {self.dataset}: {reason}") from None

    def defaults(self) -> dict[str, Any]:
        """Every config field's value: the library's default, or the option given."""
        from reasoning_gym.factory import DATASETS

        return {**_field_defaults(DATASETS[self.dataset][1]), **self.kwargs}

    def harder(self) -> "GymConfig":
        """Longer questions where `HARDER` names the count (see the module doc), else this config."""
        if self.dataset not in HARDER:
            return self
        lower, upper = HARDER[self.dataset]
        top = self.defaults()[upper]
        options = {**self.kwargs, lower: top + 1, upper: top + 2}
        return replace(self, options=tuple(options.items()))


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _field_defaults(cls) -> dict[str, Any]:
    found = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return found


def parse(name: str) -> GymConfig:
    """The config of a task name `gym:NAME[:key=value,...]`; one-line ValueError for a missing extra, an
    unknown dataset (the closest names) or a bad option (the valid ones)."""
    spec_name, items = split_spec(name, what="task", name_parts=2)
    if not spec_name.startswith(PREFIX):
        raise ValueError(f"not a reasoning-gym task: {name!r} (write gym:NAME[:key=value,...])")
    dataset = spec_name[len(PREFIX):]
    known = dataset_names()
    if dataset not in known:
        close = difflib.get_close_matches(dataset, known, n=5, cutoff=0.5)
        listed = f"closest: {', '.join(close)}" if close else f"available: {', '.join(known)}"
        raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; {listed}")
    if dataset in UNSUPPORTED:
        raise ValueError(f"reasoning-gym's {dataset} is not supported: {UNSUPPORTED[dataset]}")
    from reasoning_gym.factory import DATASETS

    types = field_types(DATASETS[dataset][1], exclude=("seed", "size"))
    options = typed_options(spec_name, items, what="task", types=types)
    config = GymConfig(dataset, tuple(options.items()))
    config.create(size=1, seed=0)  # bad values fail now, in one line
    return config


def hard_config(config: GymConfig) -> GymConfig:
    """`config.harder()` when the library accepts it, else `config` (a test-like hard split, logged)."""
    harder = config.harder()
    if harder == config:
        return config
    try:
        harder.create(size=1, seed=0)
    except ValueError as error:
        logger.warning("%s; its hard split is test-like instead", error)
        return config
    return harder


def describe(config: GymConfig, hard: GymConfig) -> str:
    """One line for --help and logs: the dataset, its options and what its hard split is."""
    harder = "test-like" if hard == config else ", ".join(f"{k}={v}" for k, v in hard.options
                                                          if dict(config.options).get(k) != v)
    return f"reasoning-gym {config.dataset}{' (' + str(config) + ')' if config.options else ''}; hard: {harder}"


# ---------------------------------------------------------------- problems

@dataclass(frozen=True)
class GymProblem:
    """One entry: the question, its reference answer, the metadata its scorer reads, a worked solution
    (formatted as a completion) when the dataset gives one."""

    question: str
    answer: str
    metadata: dict = field(default_factory=dict, compare=False)
    solution: str | None = None
    dataset: str = ""

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def completion(self) -> str:
        """The SFT target; ValueError (one line) when the dataset gives no worked solution."""
        if self.solution is None:
            raise ValueError(no_solution_message(self.dataset))
        return self.solution

    def to_record(self) -> dict:
        """A JSONL record in the format `tasks.jsonl` reads; the metadata travels for the scorer."""
        record = {"question": self.question, "answer": self.answer, "metadata": self.metadata}
        if self.solution is not None:
            record["solution"] = self.solution
        return record


def no_solution_message(dataset: str) -> str:
    with_solutions = ", ".join(f"{PREFIX}{d}" for d in SOLUTION_FIELDS)
    return (f"reasoning-gym's {dataset} gives no worked solutions and SFT needs one per question "
            f"(datasets with solutions: {with_solutions}; eval and grpo need none)")


def solution_steps(text: str) -> list[str]:
    """The steps of a worked solution: one per non-empty line, stripped, a trailing period or colon
    dropped (the step delimiter ends it), GSM8K's closing "#### answer" line left out."""
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if not line or _GSM_FINAL.match(line):
            continue
        step = line.rstrip(".:").rstrip()
        if step and STEP_DELIMITER not in step and THINK_END not in step:
            steps.append(step)
    return steps


def problem_from_entry(dataset: str, entry: dict) -> GymProblem:
    """A GymProblem of one library entry; ValueError for an entry without a reference answer."""
    answer = entry.get("answer")
    if answer is None or not str(answer).strip():
        raise ValueError(f"reasoning-gym's {dataset} entries have no reference answer (its scorer checks "
                         "free-form answers); thinkscale tasks need one")
    answer = str(answer)
    metadata = jsonable(entry.get("metadata") or {})
    worked = metadata.get(SOLUTION_FIELDS.get(dataset, ""))
    steps = solution_steps(worked) if isinstance(worked, str) else []
    solution = format_completion(steps, answer) if steps else None
    return GymProblem(question=str(entry["question"]), answer=answer, metadata=metadata, solution=solution,
                      dataset=dataset)


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, numpy scalars numbers, sets sorted lists)."""
    def plain(x: Any) -> Any:
        if hasattr(x, "item"):  # numpy scalars
            return x.item()
        if isinstance(x, (set, frozenset)):
            return sorted(x, key=str)
        return str(x)

    return json.loads(json.dumps(value, default=plain))


def stream_seed(*parts: object) -> int:
    """A 31-bit seed that is a stable hash of `parts` (the same in every process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def entries(config: GymConfig, stream: str) -> Iterator[dict]:
    """The endless entries of one stream: datasets of CHUNK entries, the c-th seeded by (stream, c)."""
    for chunk in itertools.count():
        dataset = config.create(size=CHUNK, seed=stream_seed("thinkscale-gym", stream, chunk))
        for i in range(CHUNK):
            yield dataset[i]


def generate(config: GymConfig, n: int, seed: int, split: str = "train",
             exclude: frozenset[str] | set[str] = frozenset()) -> list[GymProblem]:
    """`n` distinct problems for `split`, deterministic for (config, n, seed, split, exclude)."""
    stream = entries(config, f"{config}:{seed}:{split}")
    problems = (problem_from_entry(config.dataset, entry) for entry in stream)
    return splits.take_distinct(problems, n, split, exclude, space=str(config),
                                hint="widen the dataset's options (more terms, digits or numbers)",
                                max_misses_in_a_row=MAX_MISSES_IN_A_ROW)


def make_splits(config: GymConfig, seed: int, n_train: int, n_test: int, n_hard: int = 0,
                hard_config: GymConfig | None = None) -> dict[str, list[GymProblem]]:
    """Train, test and hard splits with pairwise disjoint questions (hard: `config.harder()` by default)."""
    return splits.make_splits(generate, config, seed, n_train, n_test, n_hard, hard_config)


# ---------------------------------------------------------------- grading and votes

def grader(config: GymConfig) -> Callable[..., bool]:
    """grade(completion, question, reference, think_end, meta) -> bool with the dataset's `score_answer`
    (see the module doc); never raises."""
    score_answer = config.create(size=1, seed=0).score_answer

    def grade(completion: str, question: str, reference: str, think_end: str | None, meta: dict | None) -> bool:
        answer = extract_answer(completion, think_end=think_end)
        if answer is None:
            return False
        entry = {"question": question, "answer": reference, "metadata": (meta or {}).get("metadata") or {}}
        try:
            return float(score_answer(answer, entry)) >= 1.0
        except Exception:  # a reward: a scorer's bug on odd text must not kill a training run
            logger.warning("%s: score_answer failed on %r; counted as wrong", config, answer, exc_info=True)
            return False

    return grade


def vote_text(dataset: str, answer: str) -> str:
    """The text an answer votes with (see the module doc)."""
    text = answer.strip()
    if dataset in VOTE_BY_VALUE and _DECIMAL.fullmatch(text):
        return normalize_answer(text)  # canonical decimal: 4.0 -> 4, 0.50 -> 0.5
    if dataset in VOTE_BY_EXPRESSION:
        return normalize_expression(text)
    return text


def equivalence(dataset: str) -> Callable[[str, str], bool]:
    """Answer equality for votes on `dataset`."""
    return functools.partial(_same_vote, dataset)


def _same_vote(dataset: str, a: str, b: str) -> bool:
    return vote_text(dataset, a) == vote_text(dataset, b)


def check_examples(examples: Sequence, source: str = "data") -> None:
    """Refuse examples without the metadata the scorer reads (written by `thinkscale data --task gym:...`)."""
    for number, example in enumerate(examples, start=1):
        if not isinstance(example.meta.get("metadata"), dict):
            raise ValueError(f"{source}: example {number} has no 'metadata' object; reasoning-gym tasks grade "
                             "with the entry's metadata, as `thinkscale data --task gym:NAME` writes it")

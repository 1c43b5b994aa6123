"""User data as JSONL: one {"question", "answer"[, "solution"]} object per line, and an atomic writer.

    {"question": "What is 2 + 3?", "answer": 5}
    {"question": "What is 2 * 3?", "answer": "6", "solution": "2 * 3 = 6."}

- `answer`: a non-empty string or a number (numbers become strings: 5 -> "5").
- `solution` (optional, needed for SFT): either a full completion in the model's format (steps, then
  "</think>" and "\\boxed{...}") or just the reasoning text; see `tasks.completion_from_solution`.
- other fields are kept in `Example.meta`; blank lines are skipped.
Every problem raises ValueError naming the file, the line number and what is wrong.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("question", "answer")


@dataclass(frozen=True)
class Example:
    """One question with its reference answer and, optionally, a worked solution."""

    question: str
    answer: str
    solution: str | None = None
    meta: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        record = {**self.meta, "question": self.question, "answer": self.answer}
        if self.solution is not None:
            record["solution"] = self.solution
        return record


def example_from_record(record: object, where: str = "record") -> Example:
    """Validate one decoded JSON value; `where` (e.g. "data.jsonl:3") prefixes every error message."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with {list(REQUIRED_FIELDS)}, got {type(record).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (required: {list(REQUIRED_FIELDS)})")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    answer = record["answer"]
    # bool is an int subclass, but true/false is not a numeric answer.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: field 'answer' must be a non-empty string or a number, got {record['answer']!r}")
    solution = record.get("solution")
    if solution is not None and (not isinstance(solution, str) or not solution.strip()):
        raise ValueError(f"{where}: field 'solution' must be a non-empty string when present, got {solution!r}")
    meta = {k: v for k, v in record.items() if k not in ("question", "answer", "solution")}
    return Example(question=question, answer=answer, solution=solution, meta=meta)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) for each non-blank line; ValueError with file:line on bad JSON."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({e.msg} at column {e.colno})") from None


def read_examples(path: str | os.PathLike) -> list[Example]:
    """All examples in a JSONL file; ValueError if the file holds none."""
    examples = [example_from_record(value, f"{path}:{n}") for n, value in iter_jsonl(path)]
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write `records` one per line, atomically: a reader sees the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

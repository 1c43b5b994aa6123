"""User data as JSONL: one {"question", "answer"[, "solution"]} object per line, and an atomic writer.

    {"question": "What is 2 + 3?", "answer": 5}
    {"question": "What is 2 * 3?", "answer": "6", "solution": "2 * 3 = 6."}

- `answer`: a non-empty string or a number (numbers become strings: 5 -> "5").
- `solution` (optional, needed for SFT): either a full completion in the model's format (steps, then
  "</think>" and "\\boxed{...}") or just the reasoning text; see `tasks.completion_from_solution`.
- other fields are kept in `Example.meta`; blank lines are skipped.
Every problem raises ValueError naming the file, the line number and what is wrong (bad JSON, not UTF-8,
a missing field or a wrong type, a line over MAX_LINE_BYTES), quoting at most a short part of the value.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("question", "answer")
MAX_LINE_BYTES = 64 * 2**20  # longer is no question but a wrong file (a binary blob without newlines)


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
        raise ValueError(f"{where}: field 'question' must be a non-empty string, got {_short(question)}")
    answer = record["answer"]
    # bool is an int subclass, but true/false is not a numeric answer.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: field 'answer' must be a non-empty string or a number, got {_short(record['answer'])}")
    solution = record.get("solution")
    if solution is not None and (not isinstance(solution, str) or not solution.strip()):
        raise ValueError(f"{where}: field 'solution' must be a non-empty string when present, got {_short(solution)}")
    meta = {k: v for k, v in record.items() if k not in ("question", "answer", "solution")}
    return Example(question=question, answer=answer, solution=solution, meta=meta)


def _short(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: an error message quotes a value, not a whole line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) for each non-blank line; ValueError with file:line on a line that is
    not UTF-8, too long, or not JSON."""
    with open(path, "rb") as f:  # bytes: a decoding error then knows its line
        line_number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            line_number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{line_number}: line longer than {MAX_LINE_BYTES // 2**20} MiB "
                                 "(expected one JSON object per line)")
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                 f"{e.start + 1} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{path}:{line_number}: JSON nested too deeply") from None


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

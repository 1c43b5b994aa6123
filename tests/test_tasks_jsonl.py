"""User JSONL data: validation with file:line errors, number coercion, atomic writes."""
import json
import os

import pytest

from thinkscale.tasks import completion_from_solution
from thinkscale.tasks.jsonl import Example, read_examples, write_jsonl


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_examples_coerces_numbers_and_keeps_extra_fields(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        '{"question": "What is 2 + 3?", "answer": 5}',
        "",
        '{"question": "Half of 3?", "answer": 1.5, "solution": "3 / 2 = 1.5.", "id": "q7"}',
        '{"question": "Name?", "answer": "x", "solution": null}',
    ])
    assert read_examples(path) == [
        Example("What is 2 + 3?", "5"),
        Example("Half of 3?", "1.5", "3 / 2 = 1.5.", {"id": "q7"}),
        Example("Name?", "x"),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "answer": 1', r"d\.jsonl:2: malformed JSON"),
        ('["q", 1]', r"d\.jsonl:2: expected a JSON object"),
        ('{"answer": 1}', r"d\.jsonl:2: missing field 'question'"),
        ('{"question": "q"}', r"d\.jsonl:2: missing field 'answer'"),
        ('{"question": "q", "answer": ""}', r"d\.jsonl:2: field 'answer'"),
        ('{"question": "q", "answer": true}', r"d\.jsonl:2: field 'answer'"),
        ('{"question": "q", "answer": [1]}', r"d\.jsonl:2: field 'answer'"),
        ('{"question": 3, "answer": "1"}', r"d\.jsonl:2: field 'question'"),
        ('{"question": "q", "answer": "1", "solution": 4}', r"d\.jsonl:2: field 'solution'"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path / "d.jsonl", ['{"question": "ok", "answer": 1}', line])
    with pytest.raises(ValueError, match=message):
        read_examples(path)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        read_examples(write_lines(tmp_path / "e.jsonl", ["", "  "]))


def test_write_then_read_round_trip_and_no_temp_files_left(tmp_path):
    examples = [Example("Q1 ü?", "1", "s."), Example("Q2", "2", meta={"id": 2})]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, (e.to_record() for e in examples))
    assert read_examples(path) == examples
    assert os.listdir(path.parent) == ["out.jsonl"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"question": "old", "answer": "1"}])

    def records():
        yield {"question": "new", "answer": "2"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert [json.loads(l)["question"] for l in path.read_text().splitlines()] == ["old"]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_completion_from_solution():
    full = "1 + 1 = 2.\n\n</think>\n\\boxed{2}"
    assert completion_from_solution(full, "2") == full
    assert completion_from_solution("1 + 1 = 2", "2") == full
    assert completion_from_solution("1 + 1 = 2.\n", "2") == full

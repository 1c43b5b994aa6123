"""The task registry: every built-in task grades, votes and labels steps its own way."""
import pytest

from thinkscale.tasks.registry import TASKS, get_task


def test_lookup():
    assert list(TASKS) == ["arithmetic", "countdown"]
    with pytest.raises(ValueError, match="unknown task 'chess'; valid: arithmetic, countdown"):
        get_task("chess")


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_reference_solutions_grade_right_and_are_on_track(name):
    task = get_task(name)
    splits = task.make_splits(task.demo_config, 0, 50, 20, 5, hard_config=task.demo_hard_config)
    assert {len(splits[s]) for s in ("train", "test")} == {50, 20} and len(splits["hard"]) == 5
    for p in splits["test"] + splits["hard"]:
        assert task.grade(p.completion, p.question, p.answer)
        assert task.truth(p.question, p.completion) == [True] * len(p.steps)
    p = splits["test"][0]
    assert not task.grade("1 + 1 = 2.\n\n</think>\n\\boxed{-12345}", p.question, p.answer)
    assert task.truth("not a question of this task", "x.\n\n") is None


def test_answer_equality_for_votes():
    assert get_task("arithmetic").equivalent is None  # math equivalence: 7 and 7.0 vote together
    same = get_task("countdown").equivalent
    assert same("(8 - 5) * 8", "(8-5)*8") and not same("8 * (8 - 5)", "(8 - 5) * 8")


def test_data_command_writes_disjoint_splits(tmp_path, capsys):
    import json

    from thinkscale.cli import main

    assert main(["data", "--task", "countdown", "--out", str(tmp_path / "a"), "--train", "30", "--test", "20",
                 "--hard", "5"]) == 0
    first = [json.loads(line)["question"] for line in (tmp_path / "a" / "test.jsonl").open()]
    assert len(first) == 20 and all(q.startswith("Make ") for q in first)
    # a second test set with another seed, excluding the first one's questions
    assert main(["data", "--task", "countdown", "--seed", "1", "--train", "0", "--hard", "0", "--test", "20",
                 "--exclude", str(tmp_path / "a" / "test.jsonl"), "--out", str(tmp_path / "b")]) == 0
    second = [json.loads(line)["question"] for line in (tmp_path / "b" / "test.jsonl").open()]
    assert len(second) == 20 and not set(first) & set(second)
    assert main(["data", "--out", str(tmp_path / "c"), "--exclude", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

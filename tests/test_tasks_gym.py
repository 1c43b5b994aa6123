"""reasoning-gym datasets as tasks (tasks/gym.py): seeded generation, disjoint splits, grading with the
dataset's own scorer, votes, worked solutions, step AUC n/a, and the CLI as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from thinkscale.reflect.candidate import Candidate
from thinkscale.reflect.evaluate import EvalConfig, evaluate
from thinkscale.reflect.report import markdown_table
from thinkscale.reflect.select import select
from thinkscale.tasks import gym
from thinkscale.tasks.jsonl import Example, example_from_record
from thinkscale.tasks.registry import check_solutions, get_task
from thinkscale.tasks.splits import in_eval_pool

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SHORT = "gym:chain_sum:min_terms=2,max_terms=3"


def boxed(answer, think_end="</think>"):
    return f"a step.\n\n{think_end}\n\\boxed{{{answer}}}"


def splits_of(name, seed=0, n_train=60, n_test=20, n_hard=10):
    task = get_task(name)
    return task.make_splits(task.demo_config, seed, n_train, n_test, n_hard, hard_config=task.demo_hard_config)


# ---------------------------------------------------------------- generation and splits

def test_generation_is_seeded_and_deterministic():
    first, again, other = splits_of(SHORT), splits_of(SHORT), splits_of(SHORT, seed=1)
    for split in ("train", "test", "hard"):
        assert [p.to_record() for p in first[split]] == [p.to_record() for p in again[split]]
    assert [p.question for p in first["test"]] != [p.question for p in other["test"]]
    p = first["test"][0]
    assert p.question.startswith("State the final answer to the following arithmetic problem: ")
    assert p.metadata["source_dataset"] == "chain_sum" and p.answer == str(eval(p.metadata["expression"]))


def test_splits_are_disjoint_for_any_seed():
    a, b = splits_of(SHORT, seed=0), splits_of(SHORT, seed=1)
    questions = {split: {p.question for p in a[split]} for split in a}
    assert [len(questions[s]) for s in ("train", "test", "hard")] == [60, 20, 10]  # no repeats within a split
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["hard"]
    assert not questions["test"] & questions["hard"]
    # by the question's hash: no test or hard question is in any seed's training split
    assert all(in_eval_pool(q) for q in questions["test"] | questions["hard"])
    assert not any(in_eval_pool(p.question) for p in a["train"] + b["train"])
    assert not {p.question for p in b["train"]} & (questions["test"] | questions["hard"])


def test_hard_split_has_more_terms_where_the_dataset_has_a_count():
    split = splits_of(SHORT)
    assert {p.metadata["num_terms"] for p in split["train"]} == {2, 3}
    assert {p.metadata["num_terms"] for p in split["hard"]} <= {4, 5}
    task = get_task(SHORT)
    assert task.demo_hard_config.kwargs == {"min_terms": 4, "max_terms": 5}
    assert "hard: min_terms=4, max_terms=5" in task.description
    default = get_task("gym:chain_sum").demo_hard_config.kwargs  # the library's max_terms is 6
    assert default == {"min_terms": 7, "max_terms": 8}
    gsm = get_task("gym:gsm_symbolic")  # no difficulty knob: the hard split is test-like
    assert gsm.demo_hard_config == gsm.demo_config and gsm.description.endswith("hard: test-like")


def test_a_space_too_small_is_one_line_not_a_hang():
    # 1-digit products of two terms: 81 questions, ~8 in the evaluation pool
    task = get_task("gym:products:min_terms=2,max_terms=2,min_digits=1,max_digits=1")
    with pytest.raises(ValueError, match=r"found only \d+ of 30 distinct test problems; the problem space of "
                                         r"gym:products:.* is too small"):
        task.make_splits(task.demo_config, 0, 0, 30, 0)


# ---------------------------------------------------------------- grading

def test_grading_uses_the_datasets_score_answer():
    chain = get_task("gym:chain_sum")
    q, meta = "State the final answer to the following arithmetic problem: 4 - 1 - 7 =", {"metadata": {}}
    assert chain.grade(boxed("-4"), q, "-4", meta=meta)
    assert chain.grade(boxed("-4.0"), q, "-4", meta=meta)  # chain_sum's scorer compares values
    assert not chain.grade(boxed("4"), q, "-4", meta=meta)
    assert chain.grade(boxed("-4", think_end=""), q, "-4", think_end=None, meta=meta)  # a model without think tags
    for unparseable in ["the answer is -4", "-4.\n\n</think>\nno box", "\\boxed{-4} but no think-end tag",
                        "</think>\n\\boxed{-4", "</think>\n\\boxed{}", "", None]:
        assert not chain.grade(unparseable, q, "-4", meta=meta), unparseable
    # partial credit is wrong: basic_arithmetic scores "-4.0" 0.5 against "-4"
    assert not get_task("gym:basic_arithmetic").grade(boxed("-4.0"), "Calculate 5 - 3 - 6.", "-4", meta=meta)


def test_countdown_grades_any_right_expression_from_the_metadata():
    task = get_task("gym:countdown")
    meta = {"metadata": {"numbers": [6, 61, 94, 4], "target": 309}}
    q, reference = "Calculate 309 using all of these numbers: 6, 61, 94, 4.", "94*4 - 61 - 6"
    assert task.grade(boxed("94*4 - 61 - 6"), q, reference, meta=meta)  # 376 - 61 - 6 = 309
    assert task.grade(boxed("4 * 94 - (6 + 61)"), q, reference, meta=meta)  # another right text
    assert not task.grade(boxed("94*4 - 61"), q, reference, meta=meta)  # 315, and 6 unused (scored 0.05)
    assert not task.grade(boxed("94*4 - 61 - 6 + 4 - 4"), q, reference, meta=meta)  # 4 used twice
    # the record's metadata is what makes a right answer right: data without it is refused up front
    assert not task.grade(boxed("94*4 - 61 - 6"), q, reference, meta={})
    with pytest.raises(ValueError, match="test.jsonl: example 2 has no 'metadata' object"):
        task.check([Example(q, reference, meta=meta), Example(q, reference)], "test.jsonl")


def test_records_round_trip_through_jsonl_and_still_grade():
    for name in ("gym:countdown:min_numbers=3,max_numbers=4", "gym:gsm_symbolic", "gym:leg_counting",
                 "gym:knights_knaves", "gym:fraction_simplification"):
        task = get_task(name)
        for p in splits_of(name, n_train=0, n_test=3, n_hard=0)["test"]:
            e = example_from_record(json.loads(json.dumps(p.to_record())))
            assert task.grade(boxed(e.answer), e.question, e.answer, meta=e.meta), (name, e.answer)
            assert task.truth(e.question, boxed(e.answer)) is None  # no step checker


# ---------------------------------------------------------------- votes

def test_votes_group_answers_per_dataset():
    chain, basic = get_task("gym:chain_sum").equivalent, get_task("gym:basic_arithmetic").equivalent
    assert chain("4", "4.0") and chain("4", " 4.00 ") and chain("-0.50", "-0.5") and not chain("4", "5")
    assert not chain("1,000", "1000") and not chain(".5", "0.5")  # not plain decimals: exact text
    assert not basic("4", "4.0") and basic("4", " 4 ")  # basic_arithmetic's scorer compares text
    countdown = get_task("gym:countdown").equivalent
    assert countdown("(8-5)*8", "(8 - 5) * 8") and not countdown("8 * (8 - 5)", "(8 - 5) * 8")
    syllogism = get_task("gym:syllogism").equivalent
    assert syllogism("Yes", "Yes") and not syllogism("Yes", "yes")


@pytest.mark.parametrize("dataset", gym.VOTE_BY_VALUE)
def test_value_votes_refine_the_scorer(dataset):
    # answers that vote together are graded alike: the scorer accepts every spelling of the value
    task = get_task(f"{gym.PREFIX}{dataset}")
    for p in splits_of(task.name, n_train=0, n_test=3, n_hard=0)["test"]:
        spellings = [p.answer, p.answer + ".0", p.answer + ".00"] if "." not in p.answer else [p.answer, p.answer + "0"]
        assert len({gym.vote_text(dataset, s) for s in spellings}) == 1
        assert all(task.grade(boxed(s), p.question, p.answer, meta={"metadata": p.metadata}) for s in spellings)


def test_majority_vote_with_the_tasks_equivalence():
    def cand(i, answer):
        return Candidate(prompt_index=0, sample_index=i, text=boxed(answer), token_ids=[0], step_scores=[0.5],
                         score=0.5, finished=True, truncated=False, num_prompt_tokens=1, num_generated_tokens=1)

    pool = [cand(0, "5"), cand(1, "4"), cand(2, "4.0"), cand(3, "5.00"), cand(4, "4.00")]
    chain = get_task("gym:chain_sum").equivalent
    assert select(pool, "majority", think_end="</think>", equivalent=chain).sample_index == 1  # 4: three votes
    basic = get_task("gym:basic_arithmetic").equivalent  # exact text: every class has one vote; first seen wins
    assert select(pool, "majority", think_end="</think>", equivalent=basic).sample_index == 0


# ---------------------------------------------------------------- worked solutions

def test_worked_solutions_only_where_the_dataset_has_them():
    assert gym.solution_steps("Let's solve this step by step:\n\n1. Totals:\n   • 35 × 3 = 105 kiwi\n"
                              "So the answer is 288.\n#### 288") == \
        ["Let's solve this step by step", "1. Totals", "• 35 × 3 = 105 kiwi", "So the answer is 288"]
    p = splits_of("gym:gsm_symbolic", n_train=1, n_test=0, n_hard=0)["train"][0]
    assert p.completion.endswith(f".\n\n</think>\n\\boxed{{{p.answer}}}") and p.completion.count(".\n\n") >= 2
    assert p.to_record()["solution"] == p.completion
    check_solutions(get_task("gym:gsm_symbolic"))
    chain = splits_of(SHORT, n_train=1, n_test=0, n_hard=0)["train"][0]
    assert "solution" not in chain.to_record()
    with pytest.raises(ValueError, match="reasoning-gym's chain_sum gives no worked solutions and SFT needs one"):
        chain.completion
    with pytest.raises(ValueError, match="no worked solutions"):
        check_solutions(get_task(SHORT))


def test_training_stages_take_gym_tasks(tmp_path):
    from types import SimpleNamespace

    from thinkscale.train import grpo, sft
    from thinkscale.train.evaluation import outcome_grader

    train, evaluation, splits = sft.load_data(sft.SFTOptions(out=str(tmp_path), task_name="gym:gsm_symbolic",
                                                             num_train=4, num_test=2, num_hard=1))
    assert [len(splits[s]) for s in ("train", "test", "hard")] == [4, 2, 1] and evaluation == splits["test"]
    assert all(e.solution.endswith(f"</think>\n\\boxed{{{e.answer}}}") for e in train)
    assert all(isinstance(e.meta["metadata"], dict) for e in train + evaluation)
    with pytest.raises(ValueError, match="reasoning-gym's chain_sum gives no worked solutions"):
        sft.load_data(sft.SFTOptions(out=str(tmp_path), task_name=SHORT, num_train=4, num_test=2, num_hard=1))
    # GRPO's reward is the task's grader, reading each record's metadata; records without it are refused
    rm = SimpleNamespace(config=SimpleNamespace(think_tags=("<think>", "</think>")))
    is_right = outcome_grader(rm, "gym:countdown")
    e = Example("Calculate 309 using all of these numbers: 6, 61, 94, 4.", "94*4 - 61 - 6",
                meta={"metadata": {"numbers": [6, 61, 94, 4], "target": 309}})
    assert is_right(boxed("4 * 94 - (6 + 61)"), e) and not is_right(boxed("94*4 - 61"), e)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="plain.jsonl: example 1 has no 'metadata' object"):
        grpo.load_data(grpo.GRPOOptions(model=str(tmp_path), out=str(tmp_path / "o"), data=str(plain),
                                        task="gym:chain_sum"))


# ---------------------------------------------------------------- step AUC n/a

def test_a_task_without_step_checker_reports_step_auc_na(tmp_path):
    task = get_task(SHORT)
    p = splits_of(SHORT, n_train=0, n_test=1, n_hard=0)["test"][0]
    texts = [boxed(p.answer), boxed("99999")]

    def sampler(prompts, k, seed):
        return [[Candidate(prompt_index=0, sample_index=j, text=texts[j % 2], token_ids=[0] * 4,
                           step_scores=[0.9 - 0.5 * (j % 2)], score=0.9 - 0.5 * (j % 2), finished=True,
                           truncated=False, num_prompt_tokens=4, num_generated_tokens=4, step_ends=[1])
                 for j in range(k)] for _ in prompts]

    example = example_from_record(p.to_record())
    report = evaluate([example], sampler, EvalConfig(ks=(2,), task=task.name), tmp_path, progress=False, plots=False)
    assert report["pass@1"] == 0.5 and report["by_k"]["2"]["accuracy"]["sprm"] == 1.0
    assert report["scorers"]["labelled_candidates"] == 0 and report["scorers"]["steps"] == {}
    assert "step AUC n/a (none of the 2 candidates has step truth" in markdown_table(report)
    with pytest.raises(ValueError, match="example 1 has no 'metadata'"):
        evaluate([Example(p.question, p.answer)], sampler, EvalConfig(ks=(2,), task=task.name), tmp_path / "x",
                 progress=False, plots=False)


def test_demo_report_prints_na_for_a_missing_step_auc():
    from thinkscale.pipeline.report import _num

    assert _num(None, missing="n/a") == "n/a" and _num(0.8125) == "0.812"


# ---------------------------------------------------------------- bad names and options

@pytest.mark.parametrize("name, message", [
    ("gym:chain_sums", "unknown reasoning-gym dataset 'chain_sums'; closest: chain_sum, decimal_chain_sum"),
    ("gym:chain_sum:foo=1", "bad option 'foo=1': task 'gym:chain_sum' has no option 'foo'; valid: min_terms, "
                            "max_terms, min_digits, max_digits, allow_negation"),
    ("gym:chain_sum:seed=3", "task 'gym:chain_sum' has no option 'seed'"),  # thinkscale owns seed and size
    ("gym:chain_sum:min_terms=two", "task 'gym:chain_sum': option min_terms must be an integer, got 'two'"),
    ("gym:chain_sum:min_terms=5,max_terms=2", "invalid options for reasoning-gym's chain_sum: max_terms must be >= min_terms"),
    ("gym:propositional_logic", "reasoning-gym's propositional_logic entries have no reference answer"),
    ("gym:time_intervals", "reasoning-gym's time_intervals is not supported: its questions depend on today's date"),
    ("gym:", "task 'gym:': the name must have 2 non-empty part(s)"),
    ("chess", "unknown task 'chess'; valid: arithmetic, countdown, gym:NAME[:key=value,...]"),
])
def test_bad_task_names_are_one_line(name, message):
    with pytest.raises(ValueError) as info:
        task = get_task(name)
        task.make_splits(task.demo_config, 0, 1, 0, 0)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_dataset_without_a_close_name_lists_them_all():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'qqqq'; available: ab, acre, .*chain_sum"):
        get_task("gym:qqqq")


# ---------------------------------------------------------------- the CLI

def thinkscale(*args, env=None, prelude=""):
    code = prelude + "import sys; from thinkscale.cli import run; sys.argv = ['thinkscale'] + sys.argv[1:]; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=env or ENV)


def test_data_command_writes_the_splits(tmp_path):
    args = ["data", "--task", SHORT, "--train", "30", "--test", "10", "--hard", "5"]
    a = thinkscale(*args, "--out", str(tmp_path / "a"), env={**ENV, "PYTHONHASHSEED": "1"})
    assert a.returncode == 0, a.stderr
    assert f"test.jsonl: 10 {SHORT} questions" in a.stdout
    b = thinkscale(*args, "--out", str(tmp_path / "b"), env={**ENV, "PYTHONHASHSEED": "2"})
    assert b.returncode == 0, b.stderr
    for split, size in (("train", 30), ("test", 10), ("hard", 5)):
        text = (tmp_path / "a" / f"{split}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{split}.jsonl").read_text()  # same files in another process
        records = [json.loads(line) for line in text.splitlines()]
        assert len(records) == size and all(set(r) == {"question", "answer", "metadata"} for r in records)
    bad = thinkscale("data", "--task", "gym:chainsum", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == ("thinkscale data: error: unknown reasoning-gym dataset 'chainsum'; "
                          "closest: chain_sum, decimal_chain_sum\n")
    assert bad.stderr.count("\n") == 1 and not (tmp_path / "c").exists()


def test_a_missing_extra_is_one_line(tmp_path):
    out = thinkscale("data", "--task", "gym:chain_sum", "--out", str(tmp_path),
                     prelude="import sys; sys.modules['reasoning_gym'] = None; ")  # import fails as if absent
    assert out.returncode == 2
    assert out.stderr == "thinkscale data: error: reasoning-gym is not installed: pip install 'thinkscale[gym]'\n"


@pytest.mark.parametrize("argv, message", [
    (["data", "--task", "gym:chain_sum:foo=1"], "thinkscale data: error: bad option 'foo=1': task 'gym:chain_sum' "
                                                "has no option 'foo'; valid: min_terms, max_terms,"),
    (["sft", "--task", "gym:chain_sum"], "thinkscale sft: error: reasoning-gym's chain_sum gives no worked "
                                         "solutions and SFT needs one per question"),
    (["demo", "--task", "gym:leg_counting", "--quick"], "thinkscale demo: error: reasoning-gym's leg_counting "
                                                        "gives no worked solutions"),
    (["grpo", "--model", "m", "--task", "gym:nope"], "thinkscale grpo: error: unknown reasoning-gym dataset 'nope'"),
    (["eval", "--model", "m", "--task", "gym:chain_sum"], "thinkscale eval: error: {data}: example 1 has no "
                                                          "'metadata' object"),
])
def test_commands_refuse_bad_gym_input_in_one_line(argv, message, tmp_path, capsys):
    from thinkscale.cli import main

    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    extra = ["--data", str(data)] if argv[0] == "eval" else []
    assert main(argv + extra + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(data=data)) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_every_task_option_names_the_gym_tasks(capsys):
    from thinkscale.cli import main

    for command in ("data", "sft", "grpo", "eval", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "--task TASK" in text and "gym:NAME[:key=value,...]: a reasoning-gym dataset" in text, command

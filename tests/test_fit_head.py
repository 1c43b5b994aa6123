"""`thinkscale fit-head` as a user runs it: on a tiny policy and the built-in arithmetic task it writes a head
folder that from_pretrained, eval and serve load with its policy; a run interrupted after its first shard
continues to the uninterrupted result; bad input is one line."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from reflect_util import fit_format
from thinkscale.cli import main
from thinkscale.commands.fit_head import training_questions
from thinkscale.reflect import ReflectiveModel
from thinkscale.reflect.model import HEAD_NAME
from thinkscale.reflect.provenance import RECORD_NAME, policy_fingerprint, read_record
from thinkscale.tasks import reflect_config
from thinkscale.tasks.arithmetic import ArithmeticConfig, generate
from thinkscale.tasks.jsonl import write_jsonl
from thinkscale.tasks.policy import PolicyConfig, build_policy
from thinkscale.tasks.tokenizer import train_tokenizer

EASY = ArithmeticConfig(min_ops=1, max_ops=1, max_digits=1, operators=("+",))  # a format-aware guess is right at times
QUESTIONS, SAMPLES, PER_BATCH = 16, 4, 4  # 4 questions x 4 samples = one shard of 16 rows; 4 shards


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny policy fitted briefly to the task's format, with its tokenizer and reflect config, and data."""
    root = tmp_path_factory.mktemp("policy")
    train = generate(EASY, QUESTIONS, seed=0)
    tokenizer = train_tokenizer(p.prompt + p.completion for p in train)
    model = fit_format(build_policy(PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                                    tokenizer, seed=0), tokenizer, train)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    (root / "reflect_config.json").write_text(json.dumps(reflect_config()))
    write_jsonl(root / "train.jsonl", (p.to_record() for p in train))
    write_jsonl(root / "test.jsonl", (p.to_record() for p in generate(EASY, 2, seed=0, split="test")))
    return root


def fit_args(policy_dir, out, *extra):
    return ["fit-head", "--model", str(policy_dir), "--task", "arithmetic", "--data", str(policy_dir / "train.jsonl"),
            "--out", str(out), "--questions", str(QUESTIONS), "--samples", str(SAMPLES), "--batch-size",
            str(PER_BATCH * SAMPLES), "--max-new-tokens", "32", "--temperature", "1.0", "--epochs", "4",
            "--val-fraction", "0.25", *extra]


@pytest.fixture(scope="module")
def fitted(policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "head"
    assert main(fit_args(policy_dir, out)) == 0
    return out


def test_writes_a_head_folder_with_its_record_and_rollout_shards(policy_dir, fitted, capsys):
    assert sorted(p.name for p in fitted.iterdir()) == ["reflect_config.json", "rollouts", RECORD_NAME, HEAD_NAME]
    shards = sorted(p.name for p in (fitted / "rollouts").iterdir())
    assert shards == ["plan.json"] + [f"shard-{i:05d}.pt" for i in range(QUESTIONS // PER_BATCH)]
    shard = torch.load(fitted / "rollouts" / "shard-00000.pt", weights_only=True)
    assert shard["question"].tolist() == [q for q in range(PER_BATCH) for _ in range(SAMPLES)]
    assert shard["features"].dtype == torch.float16 and shard["features"].shape == (int(shard["steps"].sum()), 32)
    assert shard["confidence"].shape == (int(shard["steps"].sum()), 4)

    record = read_record(fitted / RECORD_NAME)
    policy = ReflectiveModel.from_pretrained(str(policy_dir)).policy
    assert record.trained and record.origin == "fit-head"
    assert record.policy == os.path.relpath(policy_dir, fitted)  # relative: the pair can move together
    assert record.policy_fingerprint == policy_fingerprint(policy) and record.inputs == "features"
    assert record.task == f"arithmetic ({policy_dir / 'train.jsonl'})" and record.step_delimiter == ".\n\n"
    fit = record.fit
    assert fit["rollouts"] == QUESTIONS * SAMPLES and fit["questions"] == QUESTIONS
    assert 0 < fit["correct_fraction"] < 1 and fit["train_rollouts"] <= QUESTIONS * SAMPLES
    assert fit["aggregation"] == record.aggregation and 1 <= fit["best_epoch"] <= fit["epochs_run"] <= 4


def test_from_pretrained_eval_and_serve_load_the_pair(policy_dir, fitted, tmp_path, capsys, monkeypatch):
    from thinkscale.serve.app import Served

    monkeypatch.chdir(tmp_path)  # the record's relative policy path is read from the head folder, not the cwd
    rm = ReflectiveModel.from_pretrained(str(fitted))
    assert rm.head_is_trained and rm.config.score_aggregation == read_record(fitted / RECORD_NAME).aggregation
    saved = load_file(fitted / HEAD_NAME)
    assert all(torch.equal(rm.head.state_dict()[k], v) for k, v in saved.items())
    served = Served.load(fitted)
    assert served.name == "head" and served.rm.head_is_trained and len(served.tokenizer) > 0

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(fitted), "--data", str(policy_dir / "test.jsonl"), "--k", "1,2",
                 "--max-new-tokens", "16", "--out", str(out), "--no-plots"]) == 0
    assert "untrained" not in capsys.readouterr().err
    assert (out / "candidates.jsonl").is_file()


def test_an_interrupted_run_continues_to_the_uninterrupted_result(policy_dir, fitted, tmp_path, monkeypatch, capsys):
    import thinkscale.train.evaluation as evaluation

    real = evaluation.outcome_grader

    def stop_in_the_second_batch(rm, task):  # as if the run were killed after its first shard
        grade, calls = real(rm, task), []

        def graded(text, example):
            calls.append(1)
            if len(calls) > PER_BATCH * SAMPLES:
                raise KeyboardInterrupt
            return grade(text, example)
        return graded

    out = tmp_path / "again"
    monkeypatch.setattr(evaluation, "outcome_grader", stop_in_the_second_batch)
    assert main(fit_args(policy_dir, out)) == 130
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == ["plan.json", "shard-00000.pt"]
    assert not (out / HEAD_NAME).exists()
    monkeypatch.setattr(evaluation, "outcome_grader", real)
    assert main(fit_args(policy_dir, out)) == 0

    for shard in sorted((fitted / "rollouts").glob("shard-*.pt")):
        a, b = (torch.load(d / "rollouts" / shard.name, weights_only=True) for d in (fitted, out))
        assert all(torch.equal(a[k], b[k]) for k in a), shard.name
    a, b = load_file(fitted / HEAD_NAME), load_file(out / HEAD_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    first, second = read_record(fitted / RECORD_NAME), read_record(out / RECORD_NAME)
    times = ("sample_time_s", "fit_time_s")
    assert {k: v for k, v in first.fit.items() if k not in times} == {k: v for k, v in second.fit.items() if k not in times}

    # other sampling settings into the same folder are refused, not mixed in; --overwrite starts afresh
    assert main(fit_args(policy_dir, out, "--temperature", "0.7")) == 2
    assert "holds rollouts sampled otherwise (temperature 1.0 -> 0.7)" in capsys.readouterr().err


def one_line_error(args, capsys) -> str:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("thinkscale fit-head: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0].removeprefix("thinkscale fit-head: error: ")


def test_bad_input_is_one_line(policy_dir, tmp_path, capsys):
    base = ["fit-head", "--model", str(policy_dir), "--out", str(tmp_path / "x")]
    assert one_line_error(base, capsys) == "give --task NAME (its training questions and grader) or --data FILE"
    assert one_line_error(base + ["--task", "sudoku"], capsys).startswith("unknown task 'sudoku'; valid: arithmetic")
    assert "does not exist" in one_line_error(["fit-head", "--model", str(tmp_path / "none"), "--task", "arithmetic",
                                               "--out", str(tmp_path / "x")], capsys)
    assert one_line_error(base + ["--task", "arithmetic", "--samples", "1"], capsys).startswith("--samples must be >= 2")
    assert "temperature" in one_line_error(base + ["--task", "arithmetic", "--temperature", "-1"], capsys)
    assert "argument --questions" in one_line_error(base + ["--task", "arithmetic", "--questions", "0"], capsys)
    assert "argument --inputs" in one_line_error(base + ["--task", "arithmetic", "--inputs", "words"], capsys)
    assert one_line_error(["fit-head", "--model", str(policy_dir), "--task", "arithmetic", "--out", str(policy_dir)],
                          capsys).endswith("holds a model; fit-head writes a head folder beside its policy: choose another")
    # a gym task grades with the metadata its records carry: plain records are refused before sampling
    assert "metadata" in one_line_error(["fit-head", "--model", str(policy_dir), "--task", "gym:chain_sum", "--data",
                                         str(policy_dir / "train.jsonl"), "--out", str(tmp_path / "x")], capsys)
    # a policy that is never right (untrained): nothing to learn from, said in one line
    never = tmp_path / "never"
    tokenizer = train_tokenizer(p.prompt + p.completion for p in generate(EASY, QUESTIONS, seed=0))
    build_policy(PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer,
                 seed=1).save_pretrained(never)
    tokenizer.save_pretrained(never)
    args = ["fit-head", "--model", str(never), "--task", "arithmetic", "--out", str(tmp_path / "wrong"),
            "--questions", "4", "--samples", "2", "--max-new-tokens", "8"]  # the task's own train split
    assert one_line_error(args, capsys).startswith("head refit: the rollouts need both correct and wrong outcomes "
                                                   "to learn from (0 of ")


def test_training_questions_come_from_the_tasks_train_split():
    from thinkscale.tasks.registry import get_task
    from thinkscale.tasks.splits import in_eval_pool

    questions = training_questions("arithmetic", None, 5, seed=0)
    task = get_task("arithmetic")
    assert [q.question for q in questions] == [
        p.question for p in task.make_splits(task.demo_config, 0, 5, 0, 0, hard_config=task.demo_hard_config)["train"]]
    assert not any(in_eval_pool(q.question) for q in questions)  # never a test or hard question


def test_an_instruction_line_travels_in_the_head_folders_config(fitted, policy_dir, tmp_path, capsys):
    import json
    import shutil

    from thinkscale.reflect.loading import load_model

    line = "Give the final answer as \\boxed{...}."
    rm, tok = load_model(str(fitted), instruction=line)  # --instruction on eval/serve/fit-head
    assert rm.format_prompt("What is 2 + 2?", tok).startswith(f"What is 2 + 2?\n{line}")
    folder = tmp_path / "with-instruction"
    shutil.copytree(fitted, folder)
    config = json.loads((folder / "reflect_config.json").read_text())
    (folder / "reflect_config.json").write_text(json.dumps({**config, "instruction": line}))
    assert load_model(str(folder))[0].config.instruction == line  # what fit-head saved is what eval uses
    assert load_model(str(fitted))[0].config.instruction is None
    assert one_line_error(fit_args(policy_dir, tmp_path / "x", "--instruction", " "), capsys) == \
        "--instruction must not be empty"


def test_a_head_on_another_layer_is_saved_with_it_and_its_rollouts_are_its_own(policy_dir, tmp_path, capsys):
    out = tmp_path / "layer1"
    assert main(fit_args(policy_dir, out, "--feature-layer", "1")) == 0
    assert json.loads((out / "reflect_config.json").read_text())["feature_layer"] == 0  # an index: the first layer
    from thinkscale.reflect.loading import load_model

    rm, _ = load_model(str(out))
    assert rm.config.feature_layer == 0 and rm.feature_layer is rm.policy.model.layers[0]
    capsys.readouterr()
    # its cached features are layer 1's: a fit of the default layer into the same folder is refused
    assert main(fit_args(policy_dir, out)) == 2
    assert "feature_layer 0 -> None" in capsys.readouterr().err

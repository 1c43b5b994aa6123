"""SFT: completion-only labels, batching, sharding, schedule, and short end-to-end runs (1 and 2 ranks)."""
import json
import math
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkscale.cli import main
from thinkscale.reflect import ReflectiveModel
from thinkscale.tasks import format_prompt
from thinkscale.tasks.arithmetic import ArithmeticConfig, generate
from thinkscale.tasks.jsonl import write_jsonl
from thinkscale.tasks.policy import PolicyConfig, build_policy
from thinkscale.tasks.tokenizer import train_tokenizer
from thinkscale.train import checkpoint
from thinkscale.train.launch import launch
from thinkscale.train.sft import IGNORE_INDEX, SFTOptions, collate, encode_example, lr_factor, run_sft, shard

TINY_POLICY = PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def problems():
    return generate(ArithmeticConfig(), 64, seed=0)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer(p.prompt + p.completion for p in problems)


def test_labels_cover_the_completion_and_eos_only(tokenizer, problems):
    p = problems[0]
    ids, labels = encode_example(tokenizer, p.question, p.completion)
    n_prompt = len(tokenizer.encode(format_prompt(p.question)))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == p.completion
    assert tokenizer.decode(ids[:n_prompt]) == p.prompt


def test_collate_right_pads_with_ignored_labels():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_loss_is_the_mean_over_completion_tokens(tokenizer, problems):
    model = build_policy(TINY_POLICY, tokenizer, seed=0)
    batch = collate([encode_example(tokenizer, p.question, p.completion) for p in problems[:3]], tokenizer.pad_token_id)
    loss = model(**batch).loss
    # reference: token i predicts token i+1; average over targets that are completion tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[:, :-1][keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-5)


def test_shards_are_disjoint_and_equal_sized():
    items = list(range(11))
    shards = [shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert shard(items, 0, 1) == items


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_factor(s, warmup_steps=2, total_steps=6, min_ratio=0.1) for s in range(7)]
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55,
                0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.1]
    assert values == pytest.approx(expected)


def tiny_options(out, **overrides):
    base = dict(out=str(out), num_train=256, num_test=8, num_hard=4, policy=TINY_POLICY, steps=6, batch_size=8,
                lr=3e-3, warmup_steps=2, log_every=3, eval_questions=4, eval_max_new_tokens=16)
    return SFTOptions(**{**base, **overrides})


def test_single_process_run_writes_a_loadable_reflect_ready_directory(tmp_path):
    out = tmp_path / "sft"
    summary = run_sft(tiny_options(out, steps=30, lr=1e-2))
    assert summary["steps"] == 30 and summary["world_size"] == 1
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert 0.0 <= summary["eval"]["pass@1"] <= 1.0 and summary["eval"]["questions"] == 4
    assert checkpoint.is_done(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32
    # the task format only (ReflectConfig.save with fields): a release head put on this folder keeps its rules
    assert json.loads((out / "reflect_config.json").read_text()) == {
        "prompt_template": "{question}\n<think>\n", "step_delimiter": ".\n\n", "think_tags": ["<think>", "</think>"],
    }
    reflective = ReflectiveModel.from_pretrained(out)
    assert reflective.format_prompt("What is 1 + 1?", tokenizer) == "What is 1 + 1?\n<think>\n"
    state = checkpoint.load_state(out)
    assert state["steps"] == 30 and state["options"]["policy"]["hidden_size"] == 32
    lines = {name: (out / "data" / f"{name}.jsonl").read_text().splitlines() for name in ("train", "test", "hard")}
    assert [len(v) for v in lines.values()] == [256, 8, 4]


def test_two_ranks_train_on_their_own_shards(tmp_path):
    out = tmp_path / "sft2"
    summary = launch(run_sft, args=(tiny_options(out, algorithm="gradient_allreduce"),), nproc=2, timeout_s=120)
    assert summary["world_size"] == 2 and summary["examples_seen"] == 6 * 8 * 2
    assert checkpoint.is_done(out)
    AutoModelForCausalLM.from_pretrained(out)


def test_user_jsonl_needs_solutions(tmp_path):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"question": "What is 1 + 1?", "answer": 2, "solution": "1 + 1 = 2."},
                       {"question": "What is 2 + 2?", "answer": 4}])
    with pytest.raises(ValueError, match="solution.*first: example 2"):
        run_sft(tiny_options(tmp_path / "out", data=str(data)))


def test_user_jsonl_trains_with_solutions_in_either_form(tmp_path, problems):
    data = tmp_path / "train.jsonl"
    records = [p.to_record() for p in problems[:32]]
    for r in records[::2]:  # half of them give only the reasoning text
        r["solution"] = r["solution"].split(".\n\n</think>")[0]
    write_jsonl(data, records)
    summary = run_sft(tiny_options(tmp_path / "out", data=str(data), steps=2, batch_size=4))
    assert summary["steps"] == 2 and "eval" not in summary  # no --eval-data given


def test_cli_skips_a_finished_run_and_rejects_unknown_algorithms(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["sft", "--out", str(out), "--num-train", "64", "--num-test", "4", "--num-hard", "0", "--steps", "2",
            "--batch-size", "8", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--eval-questions", "2"]
    assert main(args) == 0
    assert "model saved to" in capsys.readouterr().out
    assert main(args) == 0
    assert "already holds a finished SFT run" in capsys.readouterr().out
    assert main(args + ["--overwrite", "--algorithm", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown algorithm 'nope'" in err and "gradient_allreduce" in err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    for option in ("--data", "--model", "--out", "--nproc", "--algorithm", "--steps", "--epochs", "--batch-size",
                   "--lr", "--seed", "--max-len"):
        assert option in text

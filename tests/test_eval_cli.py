"""`thinkscale eval` end to end on a tiny model directory built here (random Llama + trained BPE + head)."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from thinkscale.commands import eval as eval_command
from thinkscale.reflect.evaluate import load_records, summarize
from thinkscale.tasks.jsonl import Example

CORPUS = ["What is 2 + 3?\n<think>\n2 + 3 = 5.\n\n</think>\n\\boxed{5}",
          "What is 4 * 2?\n<think>\n4 * 2 = 8.\n\nSo 8.\n\n</think>\n\\boxed{8}"] * 10
QUESTIONS = [Example("What is 2 + 3?", "5"), Example("What is 4 * 2?", "8"), Example("What is 1 + 1?", "2")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from thinkscale.reflect.model import ReflectiveModel

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    # Think tags as single, non-special tokens: decoding keeps them, so grading can find "</think>".
    tokenizer.add_tokens(["<think>", "</think>"])

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    rm = ReflectiveModel(LlamaForCausalLM(config).eval())
    path = tmp_path_factory.mktemp("tiny_model")
    rm.save_pretrained(path, tokenizer=tokenizer)  # policy + sprm_head.safetensors + reflect_config.json
    return path


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "thinkscale.cli", "eval", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_eval_command_end_to_end_and_resume(model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(e.to_record()) + "\n" for e in QUESTIONS))
    out = tmp_path / "out"
    args = ["--model", model_dir, "--data", data, "--k", "1,2", "--max-new-tokens", "12", "--seed", "3",
            "--out", out, "--device", "cpu"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "| strategy | k=1 | k=2 |" in first.stdout and "| logprob@k |" in first.stdout

    records = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    for record in records:
        assert [c["sample_index"] for c in record["candidates"]] == [0, 1]
        for c in record["candidates"]:
            assert 1 <= c["num_generated_tokens"] <= 12
            assert 0.0 <= c["score"] <= 1.0
            assert all(0.0 <= s <= 1.0 for s in c["step_scores"])
            assert set(c["extra"]) >= {"answer", "correct"}
            # the model's format has think tags: the answer must come after </think>
            if "</think>" not in c["text"]:
                assert c["extra"]["answer"] is None and c["extra"]["correct"] is False

    report = json.loads((out / "report.json").read_text())
    assert report["config"]["think_end"] == "</think>"
    assert report["config"]["ks"] == [1, 2] and report["samples_per_question"] == 2
    questions = [load_records(out / "candidates.jsonl")[i] for i in range(3)]
    expected = summarize(questions, [1, 2])  # the report is what the graded candidates give
    assert report["by_k"] == expected["by_k"] and report["pass@1"] == expected["pass@1"]
    for name in ("report.md", "accuracy_vs_k.png", "accuracy_vs_tokens.png"):
        assert (out / name).stat().st_size > 0

    # A rerun into the same folder samples nothing and reproduces the report.
    lines_before = (out / "candidates.jsonl").read_text()
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming: 3 of 3" in again.stderr
    assert (out / "candidates.jsonl").read_text() == lines_before
    assert json.loads((out / "report.json").read_text()) == report


def test_eval_command_bad_data(model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "a", "answer": "1"}\n{"question": "b"}\n')
    result = run_cli("--model", model_dir, "--data", data, "--mode", "low", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.jsonl:2" in result.stderr and "'answer'" in result.stderr


def test_every_option_has_help_and_modes_map_to_k():
    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"model", "data", "mode", "k", "out", "temperature", "top_p",
                                         "max_new_tokens", "batch_size", "seed", "head"}
    assert all(a.help for a in options)
    assert eval_command.ks_for_effort(2) == (1, 2)
    assert eval_command.ks_for_effort(8) == (1, 2, 4, 8)
    assert eval_command.ks_for_effort(32) == (1, 2, 4, 8, 16, 32)
    assert eval_command.ks_for_effort(12) == (1, 2, 4, 8, 12)
    args = parser.parse_args(["--model", "m", "--data", "d.jsonl", "--k", "8,2,2,1"])
    assert args.k == (1, 2, 8) and args.temperature == 0.6 and args.top_p == 0.95 and args.seed == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--data", "d", "--k", "0,2"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--data", "d", "--mode", "low", "--k", "2"])
    assert str(eval_command.default_out_dir("/x/my-model", "sets/aime24.jsonl", 32)) == "runs/eval/my-model-aime24-k32"


def test_eval_search_end_to_end_resume_and_bad_options(model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(e.to_record()) + "\n" for e in QUESTIONS))
    out = tmp_path / "search"
    args = ["--model", model_dir, "--data", data, "--k", "2,4", "--max-new-tokens", "16", "--seed", "3", "--out", out,
            "--device", "cpu", "--search", "prune:warmup=1,keep=50", "--search", "beam:width=2", "--no-plots"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    methods = ["best_of_n", "prune:warmup=1,keep=50", "beam:width=2"]  # best_of_n joins as the baseline
    assert sorted((r["method"], r["k"], r["index"]) for r in records) == sorted(
        (m, k, i) for m in methods for k in (2, 4) for i in range(3))
    for r in records:
        assert set(r["picks"]) == {"sprm", "majority", "deepconf"}
        assert r["generated_tokens"] == sum(c["generated_tokens"] for c in r["candidates"]) or r["method"] == "beam:width=2"
        if r["method"] == "best_of_n":
            assert len(r["candidates"]) == r["k"] and r["rows"] == r["k"]
    report = json.loads((out / "search.json").read_text())
    cell = next(c for c in report["cells"] if c["method"] == "best_of_n" and c["k"] == 4)
    mine = [r for r in records if r["method"] == "best_of_n" and r["k"] == 4]
    assert cell["tokens"] == sum(r["generated_tokens"] for r in mine) / 3
    assert cell["accuracy"]["majority"] == 100.0 * sum(r["picks"]["majority"] for r in mine) / 3
    assert "| best_of_n | 2 |" in first.stdout
    again = run_cli(*args, cwd=tmp_path)  # resumes: nothing is decoded again
    assert again.returncode == 0 and "resuming: 18 of 18" in again.stderr
    assert json.loads((out / "search.json").read_text())["cells"] == report["cells"]
    bad = run_cli("--model", model_dir, "--data", data, "--search", "beam:depth=2", cwd=tmp_path)
    assert bad.returncode == 2 and "bad option 'depth=2'" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("--model", model_dir, "--data", data, "--search", "beam", "--k", "6", cwd=tmp_path)
    assert bad.returncode == 2 and "multiple of width" in bad.stderr

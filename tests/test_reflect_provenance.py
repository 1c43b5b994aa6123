"""Head records: the policy fingerprint (by hand), the trained flag read from the record and not from a
file's presence, a head refused on other weights unless forced, old heads without a record, fitted-head
folders as `--model`, and the loader's one-line errors."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch
from torch import nn

from reflect_util import bpe_tokenizer, tiny_policy
from thinkscale.cli import main
from thinkscale.reflect import ReflectiveModel
from thinkscale.reflect.loading import SMOLLM2_DESCRIPTION, check_model_arg, describe_model, load_model
from thinkscale.reflect.model import HEAD_NAME
from thinkscale.reflect.provenance import RECORD_NAME, HeadRecord, policy_fingerprint, read_record, write_record


def test_fingerprint_by_hand_and_what_changes_it(tmp_path):
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.bias.fill_(0.5)
    digest = hashlib.sha256()
    for name, values in (("bias", [0.5]), ("weight", [1.0, -2.0])):  # name order; dtype, shape, bytes
        shape = (1,) if name == "bias" else (1, 2)
        digest.update(f"{name}|torch.float32|{shape}|".encode())
        digest.update(torch.tensor(values, dtype=torch.float32).numpy().tobytes())
    assert policy_fingerprint(layer) == "sha256:" + digest.hexdigest()

    policy = tiny_policy("llama", seed=0)
    policy.save_pretrained(tmp_path)
    reloaded = type(policy).from_pretrained(tmp_path)
    assert policy_fingerprint(reloaded) == policy_fingerprint(policy)  # a save/load round trip keeps it
    assert policy_fingerprint(tiny_policy("llama", seed=1)) != policy_fingerprint(policy)
    with torch.no_grad():
        reloaded.lm_head.weight[0, 0] += 1e-6  # one weight, a tiny change
    assert policy_fingerprint(reloaded) != policy_fingerprint(policy)


def saved_model(path, trained: bool, seed: int = 0):
    rm = ReflectiveModel(tiny_policy("qwen2", seed=seed), head_is_trained=False)
    if trained:
        rm.head_is_trained = True
        rm.head_provenance = {"origin": "grpo", "task": "arithmetic", "fit": {"val_pair_accuracy": 0.8}}
    rm.save_pretrained(path, tokenizer=bpe_tokenizer())
    return rm


def test_trained_comes_from_the_record_not_from_the_file(tmp_path, caplog):
    saved_model(tmp_path / "fresh", trained=False)
    assert (tmp_path / "fresh" / HEAD_NAME).is_file()  # the file exists, yet the head never trained
    fresh = ReflectiveModel.from_pretrained(str(tmp_path / "fresh"))
    assert not fresh.head_is_trained and fresh.head_provenance["origin"] == "fresh"

    rm = saved_model(tmp_path / "trained", trained=True)
    record = read_record(tmp_path / "trained" / RECORD_NAME)
    assert record.trained and record.policy == "." and record.origin == "grpo" and record.task == "arithmetic"
    assert record.policy_fingerprint == policy_fingerprint(rm.policy) and record.hidden_size == 32
    assert (record.inputs, record.aggregation, record.step_delimiter) == ("features", "geomean", ".\n\n")
    loaded = ReflectiveModel.from_pretrained(str(tmp_path / "trained"))
    assert loaded.head_is_trained and loaded.head_provenance["fit"] == {"val_pair_accuracy": 0.8}

    # a head saved before records existed: loads as before (trained), and says so
    (tmp_path / "trained" / RECORD_NAME).unlink()
    with caplog.at_level(logging.INFO, logger="thinkscale.reflect.model"):
        old = ReflectiveModel.from_pretrained(str(tmp_path / "trained"))
    assert old.head_is_trained and "saved before head records" in caplog.text


def test_a_head_on_other_weights_is_refused_unless_forced(tmp_path, caplog, capsys):
    saved_model(tmp_path / "a", trained=True, seed=0)
    saved_model(tmp_path / "b", trained=True, seed=1)  # same width, other weights
    with pytest.raises(ValueError, match=r"was fitted to the policy .*/a \(weights [0-9a-f]{12}\), not to this one"):
        ReflectiveModel.from_pretrained(str(tmp_path / "b"), head=tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="thinkscale.reflect.model"):
        forced = ReflectiveModel.from_pretrained(str(tmp_path / "b"), head=tmp_path / "a", force_head=True)
    assert forced.head_is_trained and "using it anyway (forced)" in caplog.text
    head_a = ReflectiveModel.from_pretrained(str(tmp_path / "a")).head
    assert torch.equal(forced.head.net[0].weight, head_a.net[0].weight)

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    args = ["eval", "--model", str(tmp_path / "b"), "--head", str(tmp_path / "a"), "--data", str(data), "--k", "1",
            "--max-new-tokens", "4", "--out", str(tmp_path / "eval"), "--no-plots"]
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("thinkscale")]
    assert len(lines) == 1 and lines[0].startswith("thinkscale eval: error: the SPRM head") and "--force-head" in lines[0]
    assert main(args + ["--force-head"]) == 0


def test_a_fitted_head_folder_is_a_model(tmp_path):
    rm = saved_model(tmp_path / "policy", trained=False)
    rm.head_is_trained = True
    with torch.no_grad():
        rm.head.net[3].bias.fill_(0.75)
    rm.config.score_aggregation = "min"
    rm.head_provenance = {"origin": "fit-head", "task": "countdown", "fit": {"rollouts": 8}}
    fitted = tmp_path / "fitted"
    rm.save_head(fitted, policy_reference=str(tmp_path / "policy"))
    assert sorted(p.name for p in fitted.iterdir()) == ["reflect_config.json", RECORD_NAME, HEAD_NAME]
    assert check_model_arg(fitted).head_folder == str(fitted)

    loaded, tokenizer = load_model(fitted)
    assert loaded.head_is_trained and loaded.config.score_aggregation == "min"
    assert loaded.head.net[3].bias.item() == 0.75 and tokenizer.name_or_path == str(tmp_path / "policy")
    assert policy_fingerprint(loaded.policy) == policy_fingerprint(rm.policy)
    assert ReflectiveModel.from_pretrained(str(fitted)).head_provenance["task"] == "countdown"

    # the policy it names changed: refused (the record's fingerprint), or gone: one line naming both
    ReflectiveModel(tiny_policy("qwen2", seed=7)).save_pretrained(tmp_path / "policy", tokenizer=bpe_tokenizer())
    with pytest.raises(ValueError, match="was fitted to the policy"):
        load_model(fitted)
    shutil.rmtree(tmp_path / "policy")
    with pytest.raises(ValueError, match=r"fitted: its head was fitted to .*/policy, which does not load \(model "
                                         r"directory .* does not exist\); pass --model POLICY --head"):
        check_model_arg(fitted)


def test_loader_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model in"):
        check_model_arg(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        check_model_arg(tmp_path / "nowhere")
    folder = tmp_path / "bad_record"
    folder.mkdir()
    (folder / RECORD_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"sprm_head.json: not a valid head record"):
        check_model_arg(folder)
    (folder / RECORD_NAME).write_text(json.dumps({"trained": True}))
    with pytest.raises(ValueError, match=r"not a head record \(missing aggregation, hidden_size, inputs, step_delimiter\)"):
        check_model_arg(folder)
    write_record(folder / RECORD_NAME, HeadRecord(True, 32, "features", "geomean", "\n", policy="."))
    with pytest.raises(ValueError, match="names no policy"):
        check_model_arg(folder)
    assert "4-bit (Q4_1) GGUF round trip" in describe_model("smollm2") == SMOLLM2_DESCRIPTION


def test_head_width_still_checked_before_the_record(tmp_path):
    saved_model(tmp_path / "a", trained=True)
    policy = tiny_policy("qwen2", hidden=64)
    with pytest.raises(ValueError, match="hidden size 32, the policy has 64"):
        ReflectiveModel.from_pretrained(policy, head=tmp_path / "a", force_head=True)

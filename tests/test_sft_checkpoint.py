"""train.checkpoint: a stage directory is complete (with its done marker) or absent."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkscale.tasks.policy import PolicyConfig, build_policy
from thinkscale.tasks.tokenizer import train_tokenizer
from thinkscale.train.checkpoint import DONE_MARKER, is_done, load_state, save_stage


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["What is 1 + 2?\n<think>\n1 + 2 = 3.\n\n</think>\n\\boxed{3}"])


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_policy(PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer, seed=0)


def test_save_and_load_round_trip(tmp_path, model, tokenizer):
    out = tmp_path / "stage"
    assert not is_done(out)
    save_stage(out, model, tokenizer, state={"step": 7}, extra_json={"extra.json": {"a": [1, 2]}})
    assert is_done(out)
    assert load_state(out) == {"step": 7}
    assert json.loads((out / "extra.json").read_text()) == {"a": [1, 2]}
    # plain transformers loading reads the stage directory
    loaded, loaded_tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded_tokenizer.encode("1 + 2 = 3.\n\n") == tokenizer.encode("1 + 2 = 3.\n\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temporaries left


def test_overwrite_replaces_the_old_stage(tmp_path, model):
    out = tmp_path / "stage"
    save_stage(out, state={"v": 1}, write_extra=lambda d: (d / "old_only.txt").write_text("x"))
    save_stage(out, model, state={"v": 2})
    assert load_state(out) == {"v": 2}
    assert not (out / "old_only.txt").exists()
    assert (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_a_failed_save_leaves_the_previous_stage_untouched(tmp_path):
    out = tmp_path / "stage"
    save_stage(out, state={"v": 1})

    def crash(_directory):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_stage(out, state={"v": 2}, write_extra=crash)
    assert load_state(out) == {"v": 1}
    with pytest.raises(RuntimeError):
        save_stage(tmp_path / "new", state={}, write_extra=crash)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_unfinished_directories_are_not_done(tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "stage_state.json").write_text("{}")
    assert not is_done(partial)
    with pytest.raises(FileNotFoundError, match="not a finished stage"):
        load_state(partial)
    (partial / DONE_MARKER).write_text("{}")
    assert is_done(partial)


def test_stale_temporaries_of_an_interrupted_save_are_cleaned(tmp_path):
    stale = tmp_path / ".stage.tmp-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half written")
    save_stage(tmp_path / "stage", state={})
    assert sorted(os.listdir(tmp_path)) == ["stage"]


def test_a_checkpoint_from_before_an_option_existed_resumes_with_its_old_value(tmp_path):
    from thinkscale.train.checkpoint import STATE_FILE, check_resumable

    path = tmp_path / "step-00000002"
    path.mkdir()
    (path / STATE_FILE).write_text(json.dumps({"world_size": 1, "step": 2, "options": {"lr": 0.1}}))
    (path / DONE_MARKER).write_text("{}")
    assert check_resumable(path, {"lr": 0.1, "spr_min_class_share": 0.0}, 1)["step"] == 2  # how it trained
    with pytest.raises(ValueError, match="spr_min_class_share 0.0 -> 0.1"):
        check_resumable(path, {"lr": 0.1, "spr_min_class_share": 0.1}, 1)

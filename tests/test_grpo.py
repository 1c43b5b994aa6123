"""Joint GRPO + SPR: batch layout, the joint update against a hand-written reference, a tiny in-process run,
and a 2-rank run through the real CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from reflect_util import fit_format
from thinkscale.reflect import ReflectiveModel, spr_loss
from thinkscale.tasks import format_prompt, reflect_config
from thinkscale.tasks.arithmetic import ArithmeticConfig, generate
from thinkscale.tasks.jsonl import write_jsonl
from thinkscale.tasks.policy import PolicyConfig, build_policy
from thinkscale.tasks.tokenizer import train_tokenizer
from thinkscale.train import checkpoint
from thinkscale.train.grpo import (METRICS_FILE, GRPOOptions, RolloutBatch, build_optimizer, joint_update,
                                   pad_rollouts, run_grpo)
from thinkscale.train.rl_math import group_advantages

TINY_POLICY = PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TASK = ArithmeticConfig(min_ops=1, max_ops=1, max_digits=1, operators=("+",))  # guessable: some rewards are 1
METRIC_FIELDS = {"step", "reward_mean", "spr_loss", "score_correct", "score_wrong", "score_gap", "score_pair_acc",
                 "kl", "entropy", "clip_frac", "pg_loss", "step_time_s", "rollout_time_s", "mixed_groups",
                 "truncated_frac", "response_len", "grad_norm", "head_grad_norm", "elapsed_s", "spr_trained_frac"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An SFT-like directory: tiny policy (briefly fitted), tokenizer, reflect config, data/{train,test}.jsonl."""
    root = tmp_path_factory.mktemp("start")
    train = generate(TASK, 48, seed=0)
    test = generate(TASK, 4, seed=0, split="test")
    tokenizer = train_tokenizer(p.prompt + p.completion for p in train)
    model = build_policy(TINY_POLICY, tokenizer, seed=0)
    fit_format(model, tokenizer, train)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    (root / "reflect_config.json").write_text(json.dumps(reflect_config()))
    write_jsonl(root / "data" / "train.jsonl", (p.to_record() for p in train))
    write_jsonl(root / "data" / "test.jsonl", (p.to_record() for p in test))
    return root


def test_pad_rollouts_marks_the_positions_that_predict_response_tokens():
    ids, attention, starts, response = pad_rollouts([[5, 6], [7]], [[8, 9, 1], [3]], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 9, 1], [7, 3, 0, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert starts.tolist() == [2, 1]
    # logits at t predict token t + 1: row 0 responses are tokens 2..4 -> positions 1..3; row 1 token 1 -> 0
    assert response.tolist() == [[False, True, True, True], [True, False, False, False]]


def _batch_from_text(tokenizer, rewards, truncated):
    q = format_prompt("What is 1 + 2?")
    completions = ["1 + 2 = 3.\n\n</think>\n\\boxed{3}", "1 + 2 = 4.\n\n4 + 1 = 5.\n\n</think>\n\\boxed{5}",
                   "1 + 2 = 3.\n\n3 + 0 = 3.\n\n</think>\n\\boxed{3}", "1 + 2 = 7.\n\n</think>\n\\boxed{7}"]
    prompt = tokenizer.encode(q)
    rows = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in completions]
    ids, attention, starts, response = pad_rollouts([prompt] * 4, rows, tokenizer.pad_token_id)
    r = torch.tensor(rewards)
    t = torch.tensor(truncated)
    return RolloutBatch(ids, attention, starts, response, r, ~(t & (r == 0)), group_advantages(r, 4), torch.zeros(4))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_joint_update_is_one_backward_of_spr_plus_policy_loss(model_dir, temperature):
    """The gradient of one joint update equals a hand-written reference of the spec's total loss, with
    every log-prob taken at the rollout temperature (on-policy ratio)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    options = GRPOOptions(model=str(model_dir), out="unused", group_size=4, lr=1e-3, head_lr=1e-2,
                          grad_clip=0.0, head_grad_clip=0.0, temperature=temperature)
    rm = ReflectiveModel.from_pretrained(model_dir)
    rm.config.head_dropout = 0.0
    rm.head.net[2].p = 0.0  # no dropout: the reference forward must see the same head
    batch = _batch_from_text(tokenizer, [1.0, 0.0, 1.0, 0.0], [False, False, False, True])
    ref_policy = build_policy(TINY_POLICY, tokenizer, seed=1).eval()  # a different reference: KL is non-zero
    with torch.no_grad():
        ref_logp = F.log_softmax(ref_policy(input_ids=batch.input_ids).logits[:, :-1] / temperature, -1).gather(
            -1, batch.input_ids[:, 1:, None])[..., 0]

    # reference gradient, computed by hand from the spec
    rm.zero_grad()
    rm.eval()
    out = rm(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logp = F.log_softmax(out.logits[:, :-1] / temperature, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    ratio = torch.exp(logp - logp.detach())
    surrogate = torch.maximum(-batch.advantages[:, None] * ratio,
                              -batch.advantages[:, None] * ratio.clamp(0.8, 1.2))
    d = ref_logp - logp
    kl = d.exp() - d - 1
    p = F.softmax(out.logits[:, :-1] / temperature, -1)
    entropy = -(p * p.log()).sum(-1)
    m = batch.response_mask.float()
    policy = ((surrogate + 0.001 * kl - 0.001 * entropy) * m).sum() / m.sum()
    mask = rm.step_mask(tokenizer, batch.input_ids, response_start=batch.response_start,
                        attention_mask=batch.attention_mask)
    assert mask.sum() == 6  # one scored position per step
    spr, _ = spr_loss(out.step_logits, mask, batch.rewards, batch.valid, min_class_share=options.spr_min_class_share)
    (spr + policy).backward()
    expected = {n: p.grad.clone() for n, p in rm.named_parameters()}

    optimizer = build_optimizer(rm, options)
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    _, stats = joint_update(rm, rm, tokenizer, optimizer, batch, ref_logp, None, options, None)
    for name, param in rm.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-6, rtol=1e-4), name
    assert stats["clip_frac"] == 0.0 and stats["kl"] > 0 and stats["spr_loss"] == pytest.approx(spr.item(), rel=1e-5)
    changed = {n.split(".")[0] for n, p in rm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"policy", "head"}
    groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert groups == {"policy": 1e-3, "head": 1e-2}


def test_clip_each_group_uses_its_own_limit(model_dir):
    from thinkscale.train.grpo import clip_each_group

    rm = ReflectiveModel.from_pretrained(model_dir)
    options = GRPOOptions(model="m", out="o", grad_clip=0.5, head_grad_clip=2.0)
    optimizer = build_optimizer(rm, options)
    for p in rm.parameters():
        p.grad = torch.ones_like(p)
    norms = clip_each_group(optimizer)
    policy_norm = torch.cat([p.grad.flatten() for p in rm.policy.parameters()]).norm()
    head_norm = torch.cat([p.grad.flatten() for p in rm.head.parameters()]).norm()
    assert norms["policy"] > 0.5 and norms["head"] > 2.0
    assert policy_norm.item() == pytest.approx(0.5, rel=1e-4) and head_norm.item() == pytest.approx(2.0, rel=1e-4)


def test_tiny_run_trains_policy_and_fresh_head_and_saves_a_loadable_dir(model_dir, tmp_path):
    out = tmp_path / "grpo"
    options = GRPOOptions(model=str(model_dir), out=str(out), steps=2, prompts_per_step=2, group_size=4,
                          max_new_tokens=20, lr=1e-3, head_lr=1e-2, eval_questions=2, eval_samples=2, log_every=1)
    summary = run_grpo(options)
    assert summary["steps"] == 2 and summary["head"] == "fresh" and summary["eval"]["questions"] == 2
    assert checkpoint.is_done(out)
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert METRIC_FIELDS <= set(lines[0])
    assert 0.0 <= lines[0]["reward_mean"] <= 1.0
    start = ReflectiveModel.from_pretrained(model_dir)
    trained = ReflectiveModel.from_pretrained(out)
    assert trained.head_is_trained and not start.head_is_trained
    assert trained.config.prompt_template == start.config.prompt_template
    assert any(not torch.equal(a, b) for a, b in zip(trained.policy.parameters(), start.policy.parameters()))
    # the head must have moved from its initial value: rebuild the run's fresh head (same seed) to compare
    torch.manual_seed(options.seed)
    fresh = ReflectiveModel.from_pretrained(model_dir).head
    assert any(not torch.equal(a, b) for a, b in zip(trained.head.parameters(), fresh.parameters()))
    assert (out / "data" / "test.jsonl").is_file()
    AutoTokenizer.from_pretrained(out)


def test_bad_data_names_the_line(model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "answer": 2}\n{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'answer'"):
        run_grpo(GRPOOptions(model=str(model_dir), out=str(tmp_path / "o"), data=str(data)))


def test_backbone_grad_scale_overrides_the_saved_config(model_dir):
    from thinkscale.train.grpo import load_model

    rm, _ = load_model(GRPOOptions(model=str(model_dir), out="o"))
    assert rm.config.backbone_grad_scale == 1e-4  # the spec's value, from the config default
    rm, _ = load_model(GRPOOptions(model=str(model_dir), out="o", backbone_grad_scale=0.5))
    assert rm.config.backbone_grad_scale == 0.5


def test_options_reject_meaningless_values():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOOptions(model="m", out="o", group_size=1)
    with pytest.raises(ValueError, match="head_lr must be > 0"):
        GRPOOptions(model="m", out="o", head_lr=0.0)
    with pytest.raises(ValueError, match="backbone_grad_scale"):
        GRPOOptions(model="m", out="o", backbone_grad_scale=2.0)


def cli(*args, timeout=120):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:  # a source checkout under test, not the installed package
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run([sys.executable, "-m", "thinkscale.cli", "grpo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_two_ranks_then_skip_and_clear_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--model", str(model_dir), "--out", str(out), "--nproc", "2", "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "12", "--eval-questions", "1", "--eval-samples", "2"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "model and SPRM head saved to" in first.stdout
    assert len((out / METRICS_FILE).read_text().splitlines()) == 2
    assert checkpoint.load_state(out)["world_size"] == 2
    # the rest returns before any worker starts: run it in-process
    from thinkscale.cli import main

    assert main(["grpo", *args]) == 0 and "already holds a finished GRPO run" in capsys.readouterr().out
    assert main(["grpo", *args, "--overwrite", "--algorithm", "nope"]) == 2
    assert "unknown algorithm 'nope'" in capsys.readouterr().err
    assert main(["grpo", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "train.jsonl does not exist" in capsys.readouterr().err

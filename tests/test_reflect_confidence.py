"""Free confidence signals: pure math by hand, and the sampler's record against a full forward pass."""
from __future__ import annotations

import math

import pytest
import torch

from reflect_util import bpe_tokenizer, favor_tokens, tiny_policy
from thinkscale.reflect import ReflectiveModel, sample
from thinkscale.reflect.confidence import (group_confidences, step_spans, step_values, token_signals,
                                           trace_confidence)

PROMPTS = ["First we add the numbers.\n\n", "Two"]


def test_token_signals_by_hand():
    # V = 4, logits log([0.5, 0.25, 0.125, 0.125]): log-probs exactly those
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    got = token_signals(p.log(), torch.tensor([1]), top_k=2)[0]
    assert got[0] == pytest.approx(math.log(0.25))
    assert got[1] == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)  # -mean of the top-2 log-probs
    kl = sum(0.25 * math.log(0.25 / q) for q in p[0].tolist())  # KL(uniform || p)
    assert got[2] == pytest.approx(kl)
    # top_k larger than the vocabulary uses all of it; a uniform distribution has self-certainty 0
    flat = token_signals(torch.zeros(1, 4), torch.tensor([0]), top_k=20)[0]
    assert flat[1] == pytest.approx(math.log(4)) and flat[2] == pytest.approx(0.0, abs=1e-6)


def test_trace_measures_by_hand():
    conf = [4.0, 1.0, 3.0, 5.0, 2.0]
    assert group_confidences(conf, window=2) == [2.5, 2.0, 4.0, 3.5]
    assert group_confidences(conf, window=10) == [3.0]
    assert trace_confidence(conf, "mean") == pytest.approx(3.0)
    assert trace_confidence(conf, "lowest", window=2) == 2.0
    assert trace_confidence(conf, "bottom10", window=2) == 2.0  # ceil(0.4) = 1 lowest group
    assert trace_confidence(conf, "tail", window=2) == 3.5
    assert trace_confidence([], "mean") == -math.inf
    with pytest.raises(ValueError, match="unknown confidence measure"):
        trace_confidence(conf, "median")
    with pytest.raises(ValueError, match="window"):
        group_confidences(conf, window=0)


def test_step_values_follow_step_ends():
    # tokens 0..5, steps end at delimiter tokens 1 and 4: spans [0,1] and [2,4]; token 5 is after the last step
    assert step_spans([1, 4]) == [(0, 1), (2, 4)]
    values = [-0.1, -0.5, -0.2, -0.9, -0.3, -2.0]
    assert step_values(values, [1, 4], "min") == [-0.5, -0.9]
    assert step_values(values, [1, 4], "mean") == pytest.approx([-0.3, -1.4 / 3])


def test_sampler_records_signals_of_the_model_distribution():
    tok = bpe_tokenizer()
    policy = favor_tokens(tiny_policy("llama", vocab_size=len(tok)), tok, eos_scale=10.0, scale=80.0)
    rm = ReflectiveModel.from_pretrained(policy, step_delimiter="\n", think_tags=None)
    # temperature and top-p change what is sampled, never the recorded signals (raw distribution)
    cands = sample(rm, tok, PROMPTS, k=2, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=3, batch_size=3)
    checked = 0
    for c in (c for per in cands for c in per):
        assert len(c.token_logprobs) == len(c.token_confidences) == len(c.token_certainties) == c.num_generated_tokens
        ids = torch.tensor([tok.encode(PROMPTS[c.prompt_index]) + c.token_ids])
        with torch.no_grad():
            logits = policy(ids).logits[0, c.num_prompt_tokens - 1:-1]  # position t predicts token t + 1
        want = token_signals(logits, torch.tensor(c.token_ids))
        assert c.token_logprobs == pytest.approx(want[:, 0].tolist(), abs=2e-4)
        assert c.token_confidences == pytest.approx(want[:, 1].tolist(), abs=2e-4)
        assert c.token_certainties == pytest.approx(want[:, 2].tolist(), abs=2e-4)
        # step ends are the delimiter tokens of the completion, one per step score
        assert len(c.step_ends) == len(c.step_scores)
        assert all(tok.decode([c.token_ids[g]]).startswith("\n") for g in c.step_ends)
        checked += len(c.token_ids)
    assert checked >= 20
    # score=False still records step ends and signals
    plain = sample(rm, tok, PROMPTS, k=2, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=3, batch_size=3,
                   score=False)
    for a, b in zip((c for per in plain for c in per), (c for per in cands for c in per)):
        assert a.token_ids == b.token_ids and a.step_ends == b.step_ends and a.step_scores == []
        assert a.token_logprobs == b.token_logprobs


@pytest.mark.parametrize("inputs, aggregation", [("features+confidence", "geomean"), ("confidence", "min"),
                                                 ("features", "last")])
def test_confidence_heads_fused_equal_full_forward(inputs, aggregation, tmp_path):
    from thinkscale.reflect import SPRMHead, score_sequences

    tok = bpe_tokenizer()
    policy = favor_tokens(tiny_policy("llama", vocab_size=len(tok)), tok, eos_scale=10.0, scale=80.0)
    torch.manual_seed(0)
    head = SPRMHead(policy.config.hidden_size, inputs=inputs)
    rm = ReflectiveModel.from_pretrained(policy, head=head, step_delimiter="\n", think_tags=None)
    rm.config.score_aggregation = aggregation
    cands = [c for per in sample(rm, tok, PROMPTS, k=3, temperature=1.0, max_new_tokens=20, seed=2) for c in per]
    ref = score_sequences(rm, tok, [tok.encode(PROMPTS[c.prompt_index]) for c in cands], [c.token_ids for c in cands])
    steps = 0
    for c, (ref_steps, ref_score) in zip(cands, ref):
        assert c.step_scores == pytest.approx(ref_steps, abs=1e-4)
        assert c.score == pytest.approx(ref_score, abs=1e-4)
        steps += len(ref_steps)
    assert steps >= 10
    # saved and loaded, the head keeps its inputs; a plain forward cannot score a confidence head
    rm.save_pretrained(tmp_path / "m", tokenizer=tok)
    again = ReflectiveModel.from_pretrained(tmp_path / "m")
    assert again.head.inputs == inputs and again.config.score_aggregation == aggregation
    if inputs != "features":
        with pytest.raises(ValueError, match="reads step confidences"):
            again(torch.tensor([[3, 4, 5]]))
    # a head file that does not match the config says so
    (tmp_path / "m" / "reflect_config.json").write_text(
        (tmp_path / "m" / "reflect_config.json").read_text().replace(f'"{inputs}"', '"features"' if inputs != "features" else '"confidence"'))
    with pytest.raises(ValueError, match="reads .* inputs"):
        ReflectiveModel.from_pretrained(tmp_path / "m")

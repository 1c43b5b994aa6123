"""Sampling with fused SPRM scoring: agrees with a full-forward reference, is reproducible, and
rejects bad input."""
from __future__ import annotations

import pytest
import torch

from reflect_util import bpe_tokenizer, favor_tokens, tiny_policy
from thinkscale.reflect import ReflectiveModel, sample, score_sequences
from thinkscale.reflect.generate import _filter_top_p, decode, next_tokens

PROMPTS = ["First we add the numbers.\n\n", "Two", "Compute 3 times 5 (carefully)."]  # lengths differ: left padding


def make_rm(kind="llama", **kw):
    tok = bpe_tokenizer()
    policy = favor_tokens(tiny_policy(kind, vocab_size=len(tok)), tok, eos_scale=10.0, scale=80.0)
    # "\n" is frequent in this model's output, so candidates have many steps
    return ReflectiveModel.from_pretrained(policy, step_delimiter="\n", think_tags=None, **kw), tok


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_fused_scores_match_full_forward_reference(kind):
    rm, tok = make_rm(kind)
    cands = sample(rm, tok, PROMPTS, k=3, temperature=1.0, top_p=0.95, max_new_tokens=30, seed=1, batch_size=4)
    flat = [c for per_prompt in cands for c in per_prompt]
    assert [len(p) for p in cands] == [3, 3, 3] and [c.sample_index for c in cands[1]] == [0, 1, 2]
    prompt_ids = [tok.encode(PROMPTS[c.prompt_index]) for c in flat]
    ref = score_sequences(rm, tok, prompt_ids, [c.token_ids for c in flat], batch_size=5)
    total_steps = 0
    for c, (ref_steps, ref_score) in zip(flat, ref):
        assert len(c.step_scores) == len(ref_steps)
        assert c.step_scores == pytest.approx(ref_steps, abs=1e-4)
        assert c.score == pytest.approx(ref_score, abs=1e-4)
        assert 0.0 <= c.score <= 1.0
        total_steps += len(ref_steps)
        assert c.num_generated_tokens == len(c.token_ids) and c.num_prompt_tokens == len(tok.encode(PROMPTS[c.prompt_index]))
        assert c.finished == (not c.truncated) and c.finished == (c.token_ids[-1] == tok.eos_token_id)
        assert c.truncated == (len(c.token_ids) == 30 and c.token_ids[-1] != tok.eos_token_id)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert total_steps >= 20  # the comparison covered real steps
    assert any(c.truncated for c in flat)


def test_decoded_features_equal_full_forward_features_at_every_position():
    rm, tok = make_rm("llama")
    rm.eval()
    prompts = [tok.encode(p) for p in PROMPTS]
    gen = torch.Generator().manual_seed(1)
    rows = decode(rm, prompts * 2, 16, {tok.eos_token_id}, tok.pad_token_id, temperature=1.0, top_p=1.0, generator=gen)
    assert any(row.finished for row in rows) and not all(row.finished for row in rows)
    for p, row in zip(prompts * 2, rows):
        full = rm(torch.tensor([p + row.tokens]), return_features=True).features[0]  # (T, c)
        expected = full[len(p) - 1 : len(p) - 1 + len(row.tokens)]
        assert row.features.shape == expected.shape
        assert torch.allclose(row.features, expected, atol=1e-4)


def test_greedy_matches_uncached_reference_loop():
    rm, tok = make_rm("qwen2")
    rm.eval()
    cands = sample(rm, tok, PROMPTS, k=2, temperature=0.0, max_new_tokens=8, batch_size=6)
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        with torch.no_grad():
            for _ in range(8):
                nxt = int(rm.policy(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        expected = ids[len(tok.encode(prompt)):]
        assert cands[i][0].token_ids == expected and cands[i][1].token_ids == expected


def test_same_seed_same_candidates():
    rm, tok = make_rm("llama")
    kw = dict(k=4, temperature=1.0, top_p=0.9, max_new_tokens=20, repetition_penalty=1.05)
    a = sample(rm, tok, PROMPTS[:2], seed=7, **kw)
    b = sample(rm, tok, PROMPTS[:2], seed=7, **kw)
    c = sample(rm, tok, PROMPTS[:2], seed=8, **kw)
    assert [x.to_dict() for p in a for x in p] == [x.to_dict() for p in b for x in p]
    assert [x.token_ids for p in a for x in p] != [x.token_ids for p in c for x in p]
    assert rm.training  # sample restores the caller's mode


def test_bad_input_is_rejected():
    rm, tok = make_rm("llama")
    with pytest.raises(ValueError, match="k must be"):
        sample(rm, tok, PROMPTS, k=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        sample(rm, tok, [], k=2)
    with pytest.raises(TypeError, match="list of prompts"):
        sample(rm, tok, "a single string", k=2)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        sample(rm, tok, [[7] * 250], k=1, max_new_tokens=10)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sample(rm, tok, [[7] * 300], k=1, max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        sample(rm, tok, PROMPTS, k=1, top_p=0.0)
    with pytest.raises(ValueError, match="empty after tokenization"):
        sample(rm, tok, [""], k=1)


def test_top_p_and_repetition_penalty():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    assert torch.equal(_filter_top_p(probs, 0.7), torch.tensor([[0.5, 0.0, 0.3, 0.0]]))
    assert torch.equal(_filter_top_p(probs, 0.1), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert next_tokens(logits, 0.0, 1.0, 1.0, seen, None).item() == 0
    assert next_tokens(logits, 0.0, 1.0, 1.5, seen, None).item() == 1  # 2.0 / 1.5 < 1.5

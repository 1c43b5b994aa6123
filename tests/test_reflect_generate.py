"""Sampling with fused SPRM scoring: agrees with a full-forward reference, is reproducible, and
rejects bad input."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from reflect_util import bpe_tokenizer, favor_tokens, tiny_policy
from thinkscale.reflect import ReflectiveModel, sample, score_sequences
from thinkscale.reflect.engine import RowSpec, decode_rows, filter_top_p, next_tokens, row_seed
from thinkscale.reflect.generate import decode

PROMPTS = ["First we add the numbers.\n\n", "Two", "Compute 3 times 5 (carefully)."]  # lengths differ: left padding


def make_rm(kind="llama", **kw):
    tok = bpe_tokenizer()
    policy = favor_tokens(tiny_policy(kind, vocab_size=len(tok)), tok, eos_scale=10.0, scale=80.0)
    # "\n" is frequent in this model's output, so candidates have many steps
    return ReflectiveModel.from_pretrained(policy, step_delimiter="\n", think_tags=None, **kw), tok


@pytest.mark.parametrize("kind,layer", [("llama", -2), ("qwen2", -2), ("gpt2", -2), ("llama", 0)])
def test_fused_scores_match_full_forward_reference(kind, layer):
    rm, tok = make_rm(kind, feature_layer=layer)  # layer 0: a head on another layer than the spec's
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
        assert sorted(row.features) == list(range(len(row.tokens)))  # no tokenizer given: every position kept
        got = torch.stack([row.features[g] for g in range(len(row.tokens))])
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4)


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
    assert torch.equal(filter_top_p(probs, 0.7), torch.tensor([[0.5, 0.0, 0.3, 0.0]]))
    assert torch.equal(filter_top_p(probs, 0.1), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, False]])
    zero, one, u = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.5])
    assert next_tokens(logits, zero, one, u, 1.0, seen).item() == 0
    assert next_tokens(logits, zero, one, u, 1.5, seen).item() == 1  # 2.0 / 1.5 < 1.5


def test_inverse_cdf_sampling_by_hand():
    # probabilities 0.5, 0.0, 0.3, 0.2 at temperature 1: cdf 0.5, 0.5, 0.8, 1.0
    logits = torch.tensor([0.5, 0.0, 0.3, 0.2]).log().expand(6, 4)
    uniforms = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.8, 0.999])
    t = torch.ones(6)
    picked = next_tokens(logits, t, torch.ones(6), uniforms).tolist()
    assert picked == [0, 0, 2, 2, 3, 3]  # the zero-probability token 1 is never drawn
    # per-row settings: row 0 greedy, row 1 top-p 0.6 keeps {0, 2} (mass 0.8) and renormalizes
    two = logits[:2]
    assert next_tokens(two, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.6]), torch.tensor([0.99, 0.7])).tolist() == [0, 2]
    assert next_tokens(two, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.6]), torch.tensor([0.99, 0.6])).tolist() == [0, 0]


def test_row_seed_is_a_stable_function_of_its_inputs():
    assert row_seed(1, 0, 0) == row_seed(1, 0, 0)
    assert len({row_seed(1, 0, 0), row_seed(1, 0, 1), row_seed(1, 1, 0), row_seed(2, 0, 0)}) == 4
    assert 0 <= row_seed(123, 4, 5) < 2**63


def test_a_row_draws_the_same_tokens_whatever_shares_its_batch():
    rm, tok = make_rm("llama")
    rm.eval()
    eos = {tok.eos_token_id}
    prompts = [tok.encode(p) for p in PROMPTS]
    specs = [RowSpec(p, 20, temperature=1.0, top_p=0.9, seed=s) for s in (3, 4) for p in prompts]
    together = decode_rows(rm, specs, eos, tok.pad_token_id)
    alone = [decode_rows(rm, [s], eos, tok.pad_token_id)[0] for s in specs]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert any(r.finish == "eos" for r in together) and any(r.finish == "length" for r in together)
    for a, b in zip(together, alone):
        assert torch.allclose(a.feature_matrix(), b.feature_matrix(), atol=1e-4)
        assert torch.allclose(a.signal_matrix(), b.signal_matrix(), atol=1e-4)
    # and sample() gives the same candidates with any batch size
    kw = dict(k=3, temperature=1.0, top_p=0.9, max_new_tokens=20, seed=5)
    one = sample(rm, tok, PROMPTS, batch_size=1, **kw)
    nine = sample(rm, tok, PROMPTS, batch_size=9, **kw)
    assert [c.token_ids for p in one for c in p] == [c.token_ids for p in nine for c in p]


def test_a_stopped_row_leaves_the_batch_and_the_others_are_unchanged():
    rm, tok = make_rm("llama")
    rm.eval()
    eos = {tok.eos_token_id}
    prompts = [tok.encode(p) for p in PROMPTS]
    specs = [RowSpec(p, 24, temperature=1.0, top_p=1.0, seed=10 + i) for i, p in enumerate(prompts)]
    reference = decode_rows(rm, specs, eos, tok.pad_token_id)
    batch_sizes = []

    def stop_row_0_after_3(rows):
        batch_sizes.append(len(rows))
        for row in rows:
            if row.spec is specs[0] and len(row.tokens) == 3:
                row.stop("pruned")

    stopped = decode_rows(rm, specs, eos, tok.pad_token_id, after_token=stop_row_0_after_3)
    assert stopped[0].finish == "pruned" and stopped[0].tokens == reference[0].tokens[:3]
    assert torch.allclose(stopped[0].feature_matrix(), reference[0].feature_matrix()[:3], atol=1e-5)
    assert [r.tokens for r in stopped[1:]] == [r.tokens for r in reference[1:]]
    assert batch_sizes[:4] == [3, 3, 3, 2]  # from step 4 on, row 0 no longer runs


def test_a_paused_row_resumes_exactly_and_a_fork_continues_from_its_parents_cache():
    rm, tok = make_rm("llama")
    rm.eval()
    eos = {tok.eos_token_id}
    prompts = [tok.encode(p) for p in PROMPTS]
    specs = [RowSpec(p, 20, temperature=1.0, top_p=1.0, seed=20 + i) for i, p in enumerate(prompts)]
    reference = decode_rows(rm, specs, eos, tok.pad_token_id)
    assert len(reference[0].tokens) > 4 and len(reference[1].tokens) > 6  # both still run when the policy acts
    children = []
    steps = {"n": 0}

    def pause_and_fork(rows):
        steps["n"] += 1
        for row in rows:
            if row.spec is specs[1] and steps["n"] == 2:
                row.pause()  # row 1 sits out steps 3-5
            if row.spec is specs[1] and steps["n"] == 5:
                row.resume()
            if row.spec is specs[0] and steps["n"] == 3 and row.running:
                children.append(row.fork(seed=99, tag="child"))

    out = decode_rows(rm, specs, eos, tok.pad_token_id, after_token=pause_and_fork)
    assert [r.tokens for r in out[:3]] == [r.tokens for r in reference]  # pausing and forking disturb nobody
    assert torch.allclose(out[1].feature_matrix(), reference[1].feature_matrix(), atol=1e-5)
    child = out[3]
    assert child is children[0] and child.inherited == 3 and child.tokens[:3] == reference[0].tokens[:3]
    # the child's continuation is what a fresh row from the parent's prefix draws with the child's seed
    fresh = decode_rows(rm, [RowSpec(prompts[0] + child.tokens[:3], 17, temperature=1.0, top_p=1.0, seed=99)],
                        eos, tok.pad_token_id)[0]
    assert child.tokens[3:] == fresh.tokens and child.generated == len(fresh.tokens)
    assert torch.allclose(child.feature_matrix()[3:], fresh.feature_matrix(), atol=1e-4)


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile for a normal quantile z (3.719: 0.9999)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.parametrize("top_p, nucleus_slice", [(0.8, 6), (0.8, 2), (1.0, 6), (0.8, 0)],
                         ids=["nucleus-in-slice", "slice-too-small-row-sorted", "no-top-p", "whole-row-sorted"])
def test_the_sampler_draws_the_reference_distribution(top_p, nucleus_slice):
    """The fast sampler may pick another token than the sort-everything reference for the same uniform,
    but from the same distribution: softmax(logits / t), cut to the top-p nucleus, renormalized.
    20000 seeded draws (the test is deterministic) against the expected counts."""
    V, n, t = 12, 20000, 0.7
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 2
    expected = filter_top_p(torch.softmax(logits / t, dim=-1)[None], top_p)[0]
    expected = expected / expected.sum()
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    drawn = next_tokens(logits.expand(n, V), torch.full((n,), t), torch.full((n,), top_p), uniforms,
                        nucleus_slice=nucleus_slice)
    counts = torch.bincount(drawn, minlength=V).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside the nucleus
    if top_p < 1:
        assert 2 < int(support.sum()) < V  # the nucleus cut something, and more than a slice of 2 holds
    chi2 = (((counts - n * expected) ** 2) / (n * expected))[support].sum().item()
    assert chi2 < chi_square_critical(int(support.sum()) - 1)


def test_ended_rows_leave_in_batches_without_changing_any_row():
    rm, tok = make_rm("llama")
    rm.eval()
    eos = {tok.eos_token_id}
    prompts = [tok.encode(p) for p in PROMPTS]
    specs = [RowSpec(p, 20, temperature=1.0, top_p=0.9, seed=40 + i) for i, p in enumerate(prompts * 3)]
    at_once = decode_rows(rm, specs, eos, tok.pad_token_id, compact_every=100)  # > 9 rows: each leaves as it ends
    assert len({len(r.tokens) for r in at_once}) > 2  # rows end at different steps
    for every in (1, 2, 8):  # 1: ended rows stay until the end
        later = decode_rows(rm, specs, eos, tok.pad_token_id, compact_every=every)
        assert [r.tokens for r in later] == [r.tokens for r in at_once]
        for a, b in zip(later, at_once):
            assert torch.allclose(a.feature_matrix(), b.feature_matrix(), atol=1e-5)


def test_features_kept_at_possible_step_ends_only_and_top_logprobs():
    rm, tok = make_rm("llama")
    rm.eval()
    openers = rm.step_feature_tokens(tok)
    assert tok.convert_tokens_to_ids("Ċ") in openers or any("\n" in tok.decode([i]) for i in openers)
    prompts = [tok.encode(p) for p in PROMPTS]
    specs = [RowSpec(p, 20, temperature=1.0, top_p=0.9, seed=60 + i) for i, p in enumerate(prompts)]
    full = decode_rows(rm, [replace(s, top_logprobs=5) for s in specs], {tok.eos_token_id}, tok.pad_token_id)
    kept = decode_rows(rm, specs, {tok.eos_token_id}, tok.pad_token_id, feature_tokens=openers)
    for p, a, b in zip(prompts, full, kept):
        assert a.tokens == b.tokens
        assert sorted(b.features) == [g for g, t in enumerate(b.tokens) if t in openers]
        ends_full = rm_scores(rm, tok, p, a.tokens, a.features)
        ends_kept = rm_scores(rm, tok, p, b.tokens, b.features)
        assert ends_full[0] == ends_kept[0] and ends_full[1] == pytest.approx(ends_kept[1], abs=1e-6)
        # the top log-probs are the raw distribution's, position by position
        logits = rm(torch.tensor([p + a.tokens])).logits[0, len(p) - 1:len(p) - 1 + len(a.tokens)]
        logp = torch.log_softmax(logits.float(), dim=-1)
        ids = torch.stack([i for i, _ in a.top])
        logprobs = torch.stack([v for _, v in a.top])
        assert torch.allclose(logprobs, logp.topk(5, dim=-1).values, atol=1e-4)  # (ties may come in any order)
        assert torch.allclose(logp.gather(-1, ids), logprobs, atol=1e-4)
    assert sum(len(r.features) for r in kept) < sum(len(r.tokens) for r in kept)
    with pytest.raises(ValueError, match="top_logprobs"):
        decode_rows(rm, [replace(s, top_logprobs=21) for s in specs], {tok.eos_token_id}, tok.pad_token_id)


def rm_scores(rm, tok, prompt, tokens, features):
    from thinkscale.reflect.scoring import scores_from_features

    ends, steps, _ = scores_from_features(rm, tok, prompt, tokens, features)
    return ends, steps


def test_the_head_reads_the_configured_layer():
    rm, tok = make_rm("llama")
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    hidden = rm.policy(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each layer
    assert torch.equal(rm(ids, return_features=True).features, hidden[-2])  # the spec's: the second-to-last
    first, _ = make_rm("llama", feature_layer=0)
    hidden = first.policy(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(first(ids, return_features=True).features, hidden[1])  # the first layer's output
    with pytest.raises(ValueError, match="feature_layer 5 is outside the policy's 2 decoder layers"):
        make_rm("llama", feature_layer=5)

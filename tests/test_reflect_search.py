"""Search on the decode engine: best_of_n is sample(), pruning is exact up to the stop, beam and DVTS
branch from their parents and spend fewer tokens, the budget holds, bad configs are refused."""
from __future__ import annotations

import pytest

from reflect_util import bpe_tokenizer, favor_tokens, tiny_policy
from thinkscale.reflect import ReflectiveModel, sample
from thinkscale.reflect.search import SearchConfig, search

PROMPTS = ["First we add the numbers.\n\n", "Compute 3 times 5 (carefully)."]
KW = dict(temperature=1.0, top_p=0.95, max_new_tokens=40, seed=4)


@pytest.fixture(scope="module")
def model():
    tok = bpe_tokenizer()
    policy = favor_tokens(tiny_policy("llama", vocab_size=len(tok)), tok, eos_scale=6.0, scale=80.0)
    return ReflectiveModel.from_pretrained(policy, step_delimiter="\n", think_tags=None).eval(), tok


def test_best_of_n_is_sample(model):
    rm, tok = model
    results = search(rm, tok, PROMPTS, SearchConfig("best_of_n", k=4), **KW)
    groups = sample(rm, tok, PROMPTS, k=4, **KW)
    for res, group in zip(results, groups):
        assert [c.token_ids for c in res.candidates] == [c.token_ids for c in group]
        assert [c.score for c in res.candidates] == pytest.approx([c.score for c in group], abs=1e-5)
        assert res.generated_tokens == sum(c.num_generated_tokens for c in group) and res.rows == 4


@pytest.mark.parametrize("signal", ["sprm", "confidence"])
def test_pruned_candidates_equal_the_unpruned_run_up_to_the_stop(model, signal):
    rm, tok = model
    full = search(rm, tok, PROMPTS, SearchConfig("best_of_n", k=8), **KW)
    pruned = search(rm, tok, PROMPTS, SearchConfig("prune", k=8, signal=signal, warmup=2, keep=50, window=4), **KW)
    stopped = 0
    for res, ref in zip(pruned, full):
        for c, r in zip(res.candidates, ref.candidates):
            n = len(c.token_ids)
            assert c.token_ids == r.token_ids[:n]
            assert c.token_logprobs == pytest.approx(r.token_logprobs[:n], abs=1e-4)
            assert c.step_scores == pytest.approx(r.step_scores[:len(c.step_scores)], abs=1e-4)
            if c.extra.get("stopped") == "pruned":
                stopped += 1
                assert n < len(r.token_ids)
            else:
                assert c.token_ids == r.token_ids
        assert res.generated_tokens == sum(len(c.token_ids) for c in res.candidates)
        assert all(c.extra.get("stopped") is None for c in res.complete)
    assert stopped > 0, "keep=50 should prune some rows"
    assert sum(r.generated_tokens for r in pruned) < sum(r.generated_tokens for r in full)


@pytest.mark.parametrize("method", ["beam", "dvts"])
def test_step_search_branches_and_saves_tokens(model, method):
    rm, tok = model
    config = SearchConfig(method, k=8, width=2)
    results = search(rm, tok, PROMPTS, config, **KW)
    again = search(rm, tok, PROMPTS, config, **KW)
    full = search(rm, tok, PROMPTS, SearchConfig("best_of_n", k=8), **KW)
    for res, res2, ref in zip(results, again, full):
        assert [c.token_ids for c in res.candidates] == [c.token_ids for c in res2.candidates]  # seeded
        assert 1 <= len(res.complete) <= 8 and res.rows > 8  # forks were made
        assert all(c.finished or c.truncated for c in res.complete)
        # some candidates are forks: they hold a prefix they did not generate
        assert any(c.extra["generated_tokens"] < len(c.token_ids) for c in res.candidates)
    assert sum(r.generated_tokens for r in results) < sum(r.generated_tokens for r in full)


def test_budget_caps_generated_tokens(model):
    rm, tok = model
    for method in ("best_of_n", "beam"):
        results = search(rm, tok, PROMPTS, SearchConfig(method, k=8, width=2, budget=60), **KW)
        for res in results:
            assert 60 <= res.generated_tokens <= 60 + 8  # stops within the step that crossed it
            assert any(c.extra.get("stopped") == "budget" for c in res.candidates)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown search method 'greedy'"):
        SearchConfig("greedy")
    with pytest.raises(ValueError, match="multiple of width"):
        SearchConfig("beam", k=6, width=4)
    with pytest.raises(ValueError, match="bad option 'depth=3'"):
        SearchConfig.parse("beam:depth=3", k=8)
    with pytest.raises(ValueError, match="must be a number"):
        SearchConfig.parse("prune:keep=lots", k=8)
    assert SearchConfig.parse("prune:signal=confidence,keep=90,window=8", k=16, budget=100) == \
        SearchConfig("prune", k=16, signal="confidence", keep=90.0, window=8, budget=100)

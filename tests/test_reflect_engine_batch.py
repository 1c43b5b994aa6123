"""The decode engine's running batch: rows that join mid-decode, and one prefill per distinct prompt, draw
exactly what they draw alone."""
from __future__ import annotations

import pytest
import torch

from reflect_util import stepping_model
from thinkscale.reflect.engine import DecodeBatch, RowSpec, decode_rows

PROMPTS = ["First we add the numbers.\n\n", "Two", "Compute 3 times 5 (carefully) and then add seven to it."]


def make_rm(kind="llama"):
    return stepping_model(kind, eos_scale=2.0)


def alone(rm, tok, spec, **kw):
    return decode_rows(rm, [spec], {tok.eos_token_id}, tok.pad_token_id, **kw)[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_rows_joining_a_running_batch_draw_what_they_draw_alone(kind):
    rm, tok = make_rm(kind)
    ids = [tok.encode(p) for p in PROMPTS]
    first = [RowSpec(ids[0], 30, 1.0, 1.0, seed=1), RowSpec(ids[1], 6, 1.0, 1.0, seed=2)]
    # joins at step 3 with a prompt longer than the cache, then at step 9 (after row 2 left: trimmed columns)
    arrivals = [(3, [RowSpec(ids[2], 25, 1.0, 0.9, seed=3, top_logprobs=4)]), (9, [RowSpec(ids[1], 12, 0.7, 1.0, seed=4)])]
    batch = DecodeBatch(rm, {tok.eos_token_id}, tok.pad_token_id, feature_tokens=None)
    rows = batch.admit(first)
    joined_running = 0
    while batch.rows or arrivals:
        if arrivals and (batch.steps >= arrivals[0][0] or not batch.rows):
            assert batch.joinable
            joined_running += batch.running > 0
            rows += batch.admit(arrivals.pop(0)[1])
        batch.step()
    assert joined_running >= 1  # at least one arrival joined rows that were mid-decode
    assert len(rows) == 4
    for row in rows:
        ref = alone(rm, tok, row.spec)
        assert row.tokens == ref.tokens, row.spec
        assert torch.allclose(row.feature_matrix(), ref.feature_matrix(), atol=1e-5)
        assert torch.allclose(row.signal_matrix(), ref.signal_matrix(), atol=1e-4)
        assert len(row.top) == (len(row.tokens) if row.spec.top_logprobs else 0)
        if row.top:
            assert all(len(i) == 4 for i, _ in row.top)
            assert [t[0].tolist() for t in row.top] == [t[0].tolist() for t in ref.top]


def test_k_rows_of_one_prompt_share_one_prefill_and_draw_what_separate_prefills_draw():
    rm, tok = make_rm()
    ids = [tok.encode(p) for p in PROMPTS]
    specs = [RowSpec(ids[p], 15, 1.0, 0.95, seed=10 * p + j) for p in (0, 2) for j in range(4)]
    shared = DecodeBatch(rm, {tok.eos_token_id}, tok.pad_token_id)
    rows = shared.admit(specs)
    assert (shared.prefills, shared.prefill_tokens) == (2, len(ids[0]) + len(ids[2]))
    while shared.rows:
        rows += shared.step()
    separate = decode_rows(rm, specs, {tok.eos_token_id}, tok.pad_token_id, share_prefill=False)
    assert [r.tokens for r in rows] == [r.tokens for r in separate]
    unshared = DecodeBatch(rm, {tok.eos_token_id}, tok.pad_token_id, share_prefill=False)
    unshared.admit(specs)
    assert unshared.prefills == 8


def test_trimmed_columns_and_bad_rows():
    rm, tok = make_rm()
    ids = [tok.encode(p) for p in PROMPTS]
    batch = DecodeBatch(rm, {tok.eos_token_id}, tok.pad_token_id, compact_every=64)
    batch.admit([RowSpec(ids[2], 2, 0.0, 1.0), RowSpec(ids[1], 40, 0.0, 1.0)])
    batch.step()
    batch.step()  # the long prompt's row ended and left: the columns only it used are dropped
    assert len(batch.rows) == 1 and bool(batch.attn.any(dim=0)[0])
    assert batch.attn.shape[1] == len(ids[1]) + 2
    with pytest.raises(ValueError, match="non-empty prompt"):
        batch.admit([RowSpec([], 4)])
    with pytest.raises(ValueError, match="top_logprobs"):
        batch.admit([RowSpec(ids[0], 4, top_logprobs=21)])

"""SPRM head, step mask and SPR loss / trajectory score: checked against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from reflect_util import bpe_tokenizer
from thinkscale.reflect import SPRMHead, spr_loss, step_mask, trajectory_score
from thinkscale.reflect.head import scale_backbone_grad
from thinkscale.reflect.steps import Delimiter, delimiter_token_ids


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def logsig(x: float) -> float:
    return -softplus(-x)


# ---------------------------------------------------------------- head
@pytest.mark.parametrize("c", [8, 576, 1536])
def test_head_parameter_count(c):
    head = SPRMHead(c)
    assert sum(p.numel() for p in head.parameters()) == 2 * c * c + 4 * c + 1


def test_head_dropout_only_in_training():
    torch.manual_seed(0)
    head = SPRMHead(16)
    x = torch.randn(4, 7, 16)
    head.eval()
    out = head(x)
    assert out.shape == (4, 7)
    assert torch.equal(out, head(x))
    head.train()
    assert not torch.equal(head(x), head(x))


def test_head_rejects_wrong_width():
    with pytest.raises(ValueError, match="last dim 16"):
        SPRMHead(16)(torch.zeros(2, 8))


@pytest.mark.parametrize("s", [0.0, 1e-4, 0.5, 1.0])
def test_backbone_grad_scale(s):
    x = torch.randn(3, 5, requires_grad=True)
    y = scale_backbone_grad(x, s)
    assert torch.allclose(y, x)
    if s == 0.0:  # frozen backbone: no path back at all
        assert not y.requires_grad
        return
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, s))


# ---------------------------------------------------------------- step mask
D, TS, TE = 5, 1, 2


def m(*bits):
    return torch.tensor(bits, dtype=torch.bool)


def test_step_mask_runs_and_response_start():
    ids = torch.tensor([7, 8, 5, 5, 9, 5, 8])
    assert torch.equal(step_mask(ids, [D]), m(0, 1, 0, 0, 1, 0, 0))
    assert torch.equal(step_mask(ids, [D], response_start=3), m(0, 0, 0, 0, 1, 0, 0))
    assert torch.equal(step_mask(ids, D), step_mask(ids, torch.tensor([D])))


def test_step_mask_think_tags():
    kw = dict(think_start_id=TS, think_end_id=TE)
    # directly after <think> does not count; after the last </think> does not count
    ids = torch.tensor([7, TS, 5, 8, 5, 9, 5, TE, 8, 5])
    assert torch.equal(step_mask(ids, [D], **kw), m(0, 0, 0, 1, 0, 1, 0, 0, 0, 0))
    # no </think> yet: to the end
    assert torch.equal(step_mask(torch.tensor([TS, 8, 5, 9, 5]), [D], **kw), m(0, 1, 0, 1, 0))
    # before the first <think> does not count
    assert torch.equal(step_mask(torch.tensor([8, 5, TS, 8, 5]), [D], **kw), m(0, 0, 0, 1, 0))
    # the last </think> bounds the region
    ids = torch.tensor([TS, 8, 5, TE, 8, 5, TE, 5])
    assert torch.equal(step_mask(ids, [D], **kw), m(0, 1, 0, 0, 1, 0, 0, 0))
    # no <think> at all: the whole response counts (the released code: first <think> else 0)
    assert torch.equal(step_mask(torch.tensor([8, 5, 8, 5]), [D], **kw), m(1, 0, 1, 0))
    assert torch.equal(step_mask(torch.tensor([8, 5, 8, 5]), [D], response_start=2, **kw), m(0, 0, 1, 0))
    # <think> opened by the prompt (response_start=2) counts; a prompt </think> is ignored
    ids = torch.tensor([TE, TS, 8, 5, 9, 5])
    assert torch.equal(step_mask(ids, [D], response_start=2, **kw), m(0, 0, 1, 0, 1, 0))


def test_step_mask_padding_left_and_right():
    PAD = 5  # deliberately equal to the delimiter id
    # left padded generation batch: prompt columns 0..3, response from 4
    left = torch.tensor([[PAD, PAD, 7, 8, 5, 9, 5], [7, 8, 9, 8, 9, 5, 8]])
    amask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    got = step_mask(left, [D], response_start=4, attention_mask=amask)
    assert torch.equal(got, torch.stack([m(0, 0, 0, 1, 0, 1, 0), m(0, 0, 0, 0, 1, 0, 0)]))
    # right padded training batch: prompt lengths 2 and 3, pad after the sequence
    right = torch.tensor([[7, 8, 5, 9, 8, PAD, PAD], [7, 8, 9, 9, 5, 8, PAD]])
    amask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    got = step_mask(right, [D], response_start=torch.tensor([2, 3]), attention_mask=amask)
    assert torch.equal(got, torch.stack([m(0, 1, 0, 0, 0, 0, 0), m(0, 0, 0, 1, 0, 0, 0)]))


def test_step_mask_multi_token_patterns():
    # ".\n\n" either as one token (5) or as "." (3) + "\n\n" (4)
    delim = Delimiter(".\n\n", (((5,),), ((3,), (4,))))
    ids = torch.tensor([7, 3, 4, 8, 5, 5, 3, 4, 5, 3, 8])
    # starts at 1, 4, 5, 6, 8; 5, 6 and 8 follow a delimiter token; "3 8" is no delimiter
    assert torch.equal(step_mask(ids, delim), m(1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0))


def _expected_by_offsets(tok, text, delim_text):
    """Reference: the token holding the delimiter's first character, found via character offsets."""
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    expected, start, prev_end_token = [], 0, None
    while (at := text.find(delim_text, start)) >= 0:
        first = next(i for i, (a, b) in enumerate(offsets) if a <= at < b)
        last = next(i for i, (a, b) in enumerate(offsets) if a <= at + len(delim_text) - 1 < b)
        if prev_end_token is None or first > prev_end_token + 1:
            expected.append(first - 1)
        prev_end_token = last
        start = at + len(delim_text)
    return enc["input_ids"], expected


def test_delimiter_with_trained_bpe_where_it_is_not_one_token():
    tok = bpe_tokenizer()
    assert len(tok.encode(".\n\n", add_special_tokens=False)) > 1  # the point of this test
    delim = delimiter_token_ids(tok, ".\n\n")
    assert all(len(p) >= 2 for p in delim.patterns)
    for text in [
        "First we add.\n\nThen we check (carefully).\n\nThe answer is 12.",
        "Two plus two.\n\n\nSo it is 4.\n\n.\n\nDone.",
        "No step here. Just text.\nAnd a line.",
    ]:
        ids, expected = _expected_by_offsets(tok, text, ".\n\n")
        got = step_mask(torch.tensor(ids), delim).nonzero().flatten().tolist()
        assert got == expected, (text, [tok.decode([i]) for i in ids])


def test_delimiter_the_tokenizer_cannot_write():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(ValueError, match="cannot produce the step delimiter"):
        delimiter_token_ids(tok, ".\n\n")


# ---------------------------------------------------------------- trajectory score and SPR loss
def test_trajectory_score_geometric_mean_and_no_step():
    s = torch.tensor([[0.5, -1.0, 2.0, 9.0], [3.0, -40.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = trajectory_score(s, mask)
    row0 = math.exp((logsig(0.5) + logsig(-1.0) + logsig(2.0)) / 3)
    row1 = math.exp((logsig(3.0) + math.log(1e-10)) / 2)  # sigmoid(-40) is floored at 1e-10
    assert got.tolist() == pytest.approx([row0, row1, 0.0], rel=1e-6)


def _two_trajectories():
    s = torch.tensor([[0.5, -1.0, 2.0, 9.0], [-0.5, 1.0, -3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    return s, mask, torch.tensor([1, 0])


def test_spr_loss_by_hand():
    s, mask, y = _two_trajectories()
    loss, stats = spr_loss(s, mask, y)
    # filter keeps 0.5, 2.0 (correct row, s > 0) and -0.5, -3.0 (wrong row, s < 0): P = 3, N = 3
    wp, wn = 1.5 * 3 / 6, 3 / 6
    num = wp * (softplus(-0.5) + softplus(-2.0)) + wn * (softplus(-0.5) + softplus(-3.0))
    assert loss.item() == pytest.approx(num / (2 * wp + 2 * wn + 1e-5), rel=1e-6)
    assert (stats["P"], stats["N"], stats["steps"], stats["trained_steps"]) == (3, 3, 6, 4)
    assert stats["score_correct"] == pytest.approx(math.exp((logsig(0.5) + logsig(-1) + logsig(2)) / 3), rel=1e-6)
    assert stats["score_wrong"] == pytest.approx(math.exp((logsig(-0.5) + logsig(1) + logsig(-3)) / 3), rel=1e-6)
    loss.backward()
    # filtered-out steps get no gradient
    assert s.grad[0, 1] == 0 and s.grad[1, 1] == 0 and s.grad[0, 3] == 0


def test_spr_loss_without_pseudo_label_filter_trains_every_step():
    s, mask, y = _two_trajectories()
    loss, stats = spr_loss(s, mask, y, pseudo_label_filter=False)
    # every masked step counts: P = 3 + 1, N = 3 + 1
    wp, wn = 1.5 * 4 / 8, 4 / 8
    num = wp * (softplus(-0.5) + softplus(1.0) + softplus(-2.0)) + wn * (softplus(-0.5) + softplus(1.0) + softplus(-3.0))
    assert loss.item() == pytest.approx(num / (3 * wp + 3 * wn + 1e-5), rel=1e-6)
    assert (stats["P"], stats["N"], stats["trained_steps"]) == (4, 4, 6)


def test_spr_loss_class_guard_trains_a_class_the_filter_emptied():
    # the collapsed head: every step scored negative, so the filter keeps no step of the correct row
    s = torch.tensor([[-0.5, -1.0, -2.0], [-0.5, -1.0, -3.0]], requires_grad=True)
    mask, y = torch.ones(2, 3, dtype=torch.bool), torch.tensor([1, 0])
    spec, spec_stats = spr_loss(s, mask, y)
    spec.backward()
    assert (spec_stats["P"], spec_stats["unfiltered_classes"]) == (1, 0)
    assert torch.all(s.grad[0] == 0)  # the spec's loss never trains the correct row again
    s.grad = None
    guarded, stats = spr_loss(s, mask, y, min_class_share=0.1)
    # the correct class is trained whole (P = 3 + 1); the wrong class keeps its filter (all 3 agree: N = 4)
    wp, wn = 1.5 * 4 / 8, 4 / 8
    num = wp * (softplus(0.5) + softplus(1.0) + softplus(2.0)) + wn * (softplus(-0.5) + softplus(-1.0) + softplus(-3.0))
    assert guarded.item() == pytest.approx(num / (3 * wp + 3 * wn + 1e-5), rel=1e-6)
    assert (stats["P"], stats["N"], stats["trained_steps"], stats["unfiltered_classes"]) == (4, 4, 6, 1)
    guarded.backward()
    assert torch.all(s.grad[0] < 0)  # descent raises the correct row's step scores
    # a class the filter keeps enough of is left to the filter: the spec's loss exactly
    s2, mask2, y2 = _two_trajectories()  # the filter keeps 2 of 3 steps of each class
    assert spr_loss(s2, mask2, y2, min_class_share=0.5)[0].item() == spr_loss(s2, mask2, y2)[0].item()
    with pytest.raises(ValueError, match="min_class_share"):
        spr_loss(s2, mask2, y2, min_class_share=1.5)


def test_spr_loss_valid_excludes_rows_and_nan_stats():
    s, mask, y = _two_trajectories()
    loss, stats = spr_loss(s, mask, y, valid=torch.tensor([True, False]))
    assert (stats["P"], stats["N"]) == (3, 1)
    wp = 1.5 * 1 / 4
    num = wp * (softplus(-0.5) + softplus(-2.0))
    assert loss.item() == pytest.approx(num / (2 * wp + 1e-5), rel=1e-6)
    _, only_correct = spr_loss(s[:1], mask[:1], y[:1])
    assert math.isnan(only_correct["score_wrong"]) and not math.isnan(only_correct["score_correct"])


def test_spr_loss_bad_input():
    s, mask, y = _two_trajectories()
    with pytest.raises(ValueError, match="only 0"):
        spr_loss(s, mask, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="outcome must have shape"):
        spr_loss(s, mask, torch.tensor([1]))

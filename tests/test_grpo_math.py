"""GRPO math by hand-computed values: advantages, k3 KL, clipped surrogate, entropy, log-probs, ranking."""
import math

import pytest
import torch

from thinkscale.train.rl_math import (clipped_policy_loss, entropy_from_logits, group_advantages, k3_kl, masked_mean,
                                      pairwise_ranking_accuracy, token_log_probs)


def test_advantages_normalize_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4)
    # group 1: mean 0.25, sample std sqrt(0.75 / 3) = 0.5 -> (0.75, -0.25 x3) / (0.5 + 1e-6)
    # group 2: mean 0.5, sample std sqrt(1 / 3)
    s2 = math.sqrt(1 / 3)
    expected = [0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3 + [0.5 / (s2 + 1e-6)] * 2 + [-0.5 / (s2 + 1e-6)] * 2
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_all_equal_group_gets_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3)
    assert adv.tolist() == [0.0] * 6
    assert group_advantages(torch.tensor([1.0, 0.0]), group_size=1).tolist() == [0.0, 0.0]


def test_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_k3_kl_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    # d = ref - logp: log 0.5, 0, log 2 -> exp(d) - d - 1
    expected = [0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1]
    assert k3_kl(logp, ref).tolist() == pytest.approx(expected, abs=1e-6)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()
    assert torch.isfinite(k3_kl(torch.tensor([0.0]), torch.tensor([-1e4]))).all()  # clamped, no overflow


def test_clipped_surrogate_above_and_below_the_clip():
    old = torch.zeros(4)
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5])
    logp = ratios.log()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, clip_ratio=0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A>0, r=0.5: max(-0.5, -0.8) = -0.5 (not clipped)
    # A<0, r=1.5: max(1.5, 1.2) = 1.5 (not clipped); A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]


def test_clipped_surrogate_gradient_vanishes_only_where_clipped():
    logp = torch.tensor([math.log(1.5), math.log(1.1)], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, torch.zeros(2), torch.tensor([2.0, 2.0]), clip_ratio=0.2)
    loss.sum().backward()
    # d/dlogp of -A * exp(logp) is -A * r for the unclipped token; 0 for the clipped one
    assert logp.grad.tolist() == pytest.approx([0.0, -2.0 * 1.1])


def test_entropy_and_log_probs_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]]]))
    expected_entropy = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), 0.0]
    assert entropy_from_logits(logits)[0].tolist() == pytest.approx(expected_entropy, abs=1e-6)
    lp = token_log_probs(logits, torch.tensor([[1, 0]]))
    assert lp[0].tolist() == pytest.approx([math.log(0.25), 0.0], abs=1e-6)


def test_masked_mean_is_a_token_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx(16 / 4)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_pairwise_ranking_counts_pairs_within_groups_only():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.2, 0.8])
    correct = torch.tensor([1, 0, 1, 0, 0, 1])
    wins, pairs = pairwise_ranking_accuracy(scores, correct, group_size=2)
    # group 1: 0.9 > 0.1 win; group 2: tie 0.5; group 3: 0.8 > 0.2 win -> (1 + 0.5 + 1) / 3
    assert (wins, pairs) == (2.5, 3)
    assert pairwise_ranking_accuracy(scores, torch.ones(6), group_size=3) == (0.0, 0)

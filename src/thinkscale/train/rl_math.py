"""The GRPO objective as pure tensor functions: advantages, log-probs, entropy, k3 KL, clipped surrogate.

Shapes: rows are rollouts, columns are token positions. Every per-token function returns a tensor of
the input's shape; `masked_mean` turns it into the token-mean loss (all response tokens of the batch
weigh the same, whatever the length of the rollout they belong to).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ADVANTAGE_EPS = 1e-6  # the spec's std guard: (r - mean) / (std + 1e-6)
MAX_LOG_RATIO = 20.0  # k3 KL: log-ratios beyond this are clamped so exp() cannot overflow


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, over the group's std + 1e-6.

    `rewards` (N,) holds N / group_size consecutive groups. The std is the sample std (Bessel's
    correction, torch.std's default); a group of identical rewards (all right or all wrong) gets
    advantage 0 everywhere, and so does a group of size 1 (no baseline to compare with).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    groups = rewards.float().view(-1, group_size)  # (groups, G)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).view(-1)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: logits (B, T, V), targets (B, T) -> (B, T), in float32."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position: (B, T, V) -> (B, T), in float32."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Low-variance per-token KL(policy || reference) estimate ("k3"): exp(d) - d - 1, d = ref - logp.

    Unbiased for tokens sampled from the policy and never negative. d is clamped to +-20 so that a
    token the reference finds impossible cannot overflow.
    """
    d = (ref_log_probs - log_probs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return d.exp() - d - 1.0


def clipped_policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                        clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate per token: max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = exp(logp - old).

    `advantages` broadcasts against the log-probs (pass (B, 1) for one advantage per rollout).
    Returns (loss, clipped): `clipped` is True where the clipped term is the larger one, i.e. where the
    token gets no gradient because its ratio already moved past the clip range in the advantage's direction.
    """
    if not clip_ratio > 0:
        raise ValueError(f"clip_ratio must be > 0, got {clip_ratio}")
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is set (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def pairwise_ranking_accuracy(scores: torch.Tensor, correct: torch.Tensor, group_size: int) -> tuple[float, int]:
    """How often a correct rollout outscores a wrong one *of the same prompt* (ties count half).

    This is what best-of-N selection needs from the scorer. Returns (sum over pairs, number of pairs)
    so that callers can add them up across batches and ranks.
    """
    s = scores.float().view(-1, group_size)  # (groups, G)
    y = correct.bool().view(-1, group_size)
    diff = s[:, :, None] - s[:, None, :]  # (groups, G, G): score of i minus score of j
    pair = y[:, :, None] & ~y[:, None, :]  # i correct, j wrong
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    return float((wins * pair).sum()), int(pair.sum())

"""The SPRM head: a two-layer MLP that turns one hidden state of the policy into a step logit."""
from __future__ import annotations

import torch
from torch import nn


class SPRMHead(nn.Module):
    """Self-supervised process reward head: Linear(c, 2c) -> ReLU -> Dropout(0.5) -> Linear(2c, 1).

    Reads hidden states of shape (..., c) and returns one logit per position, shape (...).
    The sigmoid of the logit is the step score. Parameters: 2c^2 + 4c + 1. Default PyTorch init;
    dropout is active in `train()` mode only.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.5) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_size = hidden_size
        self.net = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * hidden_size, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.hidden_size:
            raise ValueError(
                f"SPRMHead expects features with last dim {self.hidden_size}, got shape {tuple(features.shape)}"
            )
        weight = self.net[0].weight
        return self.net(features.to(weight.dtype)).squeeze(-1)  # (...,)


def scale_backbone_grad(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Same values as `features`, but only a fraction `scale` of the gradient flows back into the policy.

    feat * s + feat.detach() * (1 - s): the head trains at full speed while the backbone sees a tiny
    nudge (the spec's 1e-4). `scale == 0` detaches fully (frozen backbone); `scale == 1` is a no-op.
    """
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"backbone gradient scale must be in [0, 1], got {scale}")
    if scale == 0.0:
        return features.detach()
    if scale == 1.0:
        return features
    return features * scale + features.detach() * (1.0 - scale)

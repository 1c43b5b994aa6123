"""The SPRM head: a two-layer MLP that turns one hidden state of the policy into a step logit."""
from __future__ import annotations

import torch
from torch import nn

HEAD_INPUTS = ("features", "features+confidence", "confidence")
NUM_CONFIDENCE_INPUTS = 4  # see `confidence.step_confidence_inputs`


class SPRMHead(nn.Module):
    """Self-supervised process reward head: Linear(d, 2c) -> ReLU -> Dropout(0.5) -> Linear(2c, 1).

    `inputs` says what it reads at each scored step:
    - "features" (the spec): the policy's hidden state, d = c. Parameters 2c^2 + 4c + 1.
    - "features+confidence": the hidden state and the step's free confidences (4 numbers,
      `confidence.step_confidence_inputs`), d = c + 4.
    - "confidence": the step's free confidences alone, d = 4 (the hidden width stays 2c).
    Returns one logit per position, shape (...); the sigmoid is the step score. Default PyTorch init;
    dropout is active in `train()` mode only.

        >>> import torch
        >>> from thinkscale.reflect import SPRMHead
        >>> head = SPRMHead(hidden_size=16).eval()
        >>> head(torch.randn(3, 5, 16)).shape                   # one logit per position
        torch.Size([3, 5])
        >>> sum(p.numel() for p in head.parameters()) == 2 * 16**2 + 4 * 16 + 1
        True
    """

    def __init__(self, hidden_size: int, dropout: float = 0.5, inputs: str = "features") -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if inputs not in HEAD_INPUTS:
            raise ValueError(f"unknown head inputs {inputs!r}; valid: {', '.join(HEAD_INPUTS)}")
        self.hidden_size = hidden_size
        self.inputs = inputs
        self.reads_features = inputs != "confidence"
        self.reads_confidence = inputs != "features"
        width = hidden_size * self.reads_features + NUM_CONFIDENCE_INPUTS * self.reads_confidence
        self.net = nn.Sequential(
            nn.Linear(width, 2 * hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * hidden_size, 1),
        )

    def forward(self, features: torch.Tensor | None, confidence: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.reads_features:
            if features is None or features.shape[-1] != self.hidden_size:
                shape = None if features is None else tuple(features.shape)
                raise ValueError(f"SPRMHead expects features with last dim {self.hidden_size}, got shape {shape}")
            parts.append(features)
        if self.reads_confidence:
            if confidence is None or confidence.shape[-1] != NUM_CONFIDENCE_INPUTS:
                raise ValueError(f"this SPRM head (inputs {self.inputs!r}) also reads the step confidences "
                                 f"({NUM_CONFIDENCE_INPUTS} per step); score through `sample` or `score_sequences`")
            parts.append(confidence)
        weight = self.net[0].weight
        x = torch.cat([p.to(weight.dtype) for p in parts], dim=-1)
        return self.net(x).squeeze(-1)  # (...,)


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

"""The optimizer a training stage runs, chosen to fit the relax algorithm."""
from __future__ import annotations

from typing import Iterable

import torch


def make_optimizer(params: Iterable, algorithm: str, lr: float, weight_decay: float, total_steps: int,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW, or for relax's `qadam` its QAdamOptimizer (warm-up: the first fifth of the steps, at least
    one). QAdam's weight decay is L2 (Adam's), not AdamW's decoupled decay."""
    if algorithm == "qadam":
        from ..relax.algorithms import QAdamOptimizer

        return QAdamOptimizer(params, lr=lr, warmup_steps=max(1, total_steps // 5), betas=betas,
                              weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)

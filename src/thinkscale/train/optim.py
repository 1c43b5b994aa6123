"""The optimizer a training stage runs, chosen to fit the relax algorithm."""
from __future__ import annotations

from typing import Iterable

import torch


def make_optimizer(params: Iterable, algorithm: str, lr: float, weight_decay: float, total_steps: int,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW, or the optimizer the relax algorithm needs instead (`Algorithm.make_optimizer`: qadam's
    QAdamOptimizer, warming up for the first fifth of the steps)."""
    from ..relax import algorithms

    own = algorithms.resolve(algorithm).make_optimizer(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                                       total_steps=total_steps)
    return own if own is not None else torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)

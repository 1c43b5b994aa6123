"""Small models and data shared by the relax tests (importable in spawned ranks)."""
from __future__ import annotations

import torch
from torch import nn


def small_mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, d_out))


class Branchy(nn.Module):
    """BatchNorm, a branch no rank ever uses, and one that only some ranks use at some steps."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)
        self.never = nn.Linear(16, 4)
        self.sometimes = nn.Linear(16, 4)

    def forward(self, x, use_sometimes: bool):
        h = torch.tanh(self.bn(self.inp(x)))
        h = torch.tanh(self.mid(h))
        y = self.out(h)
        return y + self.sometimes(h) if use_sometimes else y


def uses_sometimes(rank: int, step: int) -> bool:
    """Rank 0 only on even steps, both ranks at step 3, nobody on the other odd steps."""
    return step == 3 or (rank == 0 and step % 2 == 0)


def rank_batch(rank: int, step: int, batch: int = 8, d_in: int = 8, d_out: int = 4):
    """Different data per rank and per step, reproducible anywhere."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)


def least_squares(rank: int, n: int = 64, d: int = 10, seed: int = 0):
    """Per-rank shard of one least-squares problem (same true weights everywhere)."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, 1, generator=g)
    g_rank = torch.Generator().manual_seed(seed + 1 + rank)
    x = torch.randn(n, d, generator=g_rank)
    y = x @ w_true + 0.01 * torch.randn(n, 1, generator=g_rank)
    return x, y


def params_vector(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def gather_all(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of `t` (all_gather on the default group)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts

"""Decentralized SGD (D-PSGD) on weights: each replica averages its weights with some peers, not all.

Per communication step (spec/relax.md, "decentralized"):

    x_{t+1}^i = avg(x_t^i, x_t^j, ...) - lr * grad f_i(x_t^i)

The average is launched before the first training forward of a step (grad enabled; evaluation forwards
under no_grad never communicate) on a copy of the weights (snapshotted on the main thread), so it
overlaps forward and backward; the job is waited at the end of backward; in the optimizer's step pre-hook
the weights are replaced by the averaged copy and the optimizer then applies the gradient that was
taken at the pre-averaging weights. Communication happens on steps where (step - 1) % interval == 0
(step counted from 1); the other steps are plain local SGD.

Peers:
- "all": mean over every participant (allreduce SUM / n).
- "shift_one": pairs change every communication; with k = communications so far and n participants
  (n even), rank r averages with `shift_one_peer(r, n, k)`: both take (x + x_peer) / 2.
Hierarchical mode (>= 2 nodes of >= 2 processes): average inside the node, run the above among the node
leaders (n = number of nodes), broadcast back.

Source system (BAGUA): the same schedule, run by its Rust backend on one weight buffer per bucket;
the peer counter was not saved. Here: all weights of one dtype form one bucket (one message per dtype),
and the communication counter is part of `state_dict()` so a resumed run continues the peer schedule.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..buckets import flatten, group_by_dtype, unflatten_into
from ..comm import Comm
from .base import Algorithm, AlgorithmImpl

logger = logging.getLogger(__name__)

PEER_SELECTION_MODES = ("all", "shift_one")


def shift_one_peer(rank: int, n: int, k: int) -> int:
    """The "shift_one" partner of `rank` among `n` (even) participants at communication number `k`.

    Ranks below n/2 talk to the upper half, shifted by k; the upper half inverts that map, so every k
    gives a perfect matching and over n/2 consecutive k each lower rank meets every upper rank once.
    """
    if n < 2 or n % 2 != 0:
        raise ValueError(f"shift_one needs an even number of participants >= 2, got {n}")
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is outside 0..{n - 1}")
    half_up, half_down = math.ceil(n / 2), n // 2
    if rank < n / 2:
        return (k + rank) % half_up + half_down
    return (rank - half_down - k) % half_down


def should_communicate(iteration: int, interval: int) -> bool:
    """Whether 0-based `iteration` (step = iteration + 1) is a communication step."""
    return iteration % interval == 0


def average_weights_(t: torch.Tensor, comm: Comm, mode: str, k: int) -> None:
    """Replace `t` in place by its average with the peers `mode` picks (k: communications so far)."""
    if mode == "all":
        comm.allreduce_mean_(t)
        return
    peer = shift_one_peer(comm.rank, comm.size, k)
    t.add_(comm.exchange(t, peer)).div_(2)


@dataclass
class Decentralized(Algorithm):
    """D-PSGD: average weights with peers every `communication_interval` steps, overlapped with
    forward+backward. Needs the optimizer over every trainable parameter."""

    name = "decentralized"
    requires_full_optimizer = True
    hierarchical: bool = True
    peer_selection_mode: str = "all"
    communication_interval: int = 1

    def __post_init__(self):
        if self.peer_selection_mode not in PEER_SELECTION_MODES:
            raise ValueError(
                f"peer_selection_mode must be one of {PEER_SELECTION_MODES}, got {self.peer_selection_mode!r}"
            )
        _check_interval(self.communication_interval)

    def reify(self, engine):
        return _DecentralizedImpl(engine, self)


def _check_interval(interval) -> None:
    if not isinstance(interval, int) or isinstance(interval, bool):
        raise TypeError(f"communication_interval must be an int, got {type(interval).__name__}")
    if interval < 1:
        raise ValueError(f"communication_interval must be >= 1, got {interval}")


class _DecentralizedImpl(AlgorithmImpl):
    def __init__(self, engine, config: Decentralized):
        super().__init__(engine)
        self.config = config
        n = engine.topology.algorithm_size
        if config.peer_selection_mode == "shift_one" and n % 2 != 0:
            where = (f"{n} nodes (world size {engine.world_size}, hierarchical)" if engine.topology.hierarchical
                     else f"world size {n}")
            raise ValueError(
                f"decentralized peer_selection_mode='shift_one' pairs ranks up and needs an even number of "
                f"participants, got {where}; use peer_selection_mode='all' or an even world size"
            )
        self.communications = 0  # k: communications launched so far (drives the shift_one schedule)
        self._groups = group_by_dtype(engine.params)
        self._averaged: list[torch.Tensor] | None = None  # copies being averaged this iteration
        self._launched_at: int | None = None  # engine.steps_taken when the communication was launched

    def before_forward(self) -> None:
        if not torch.is_grad_enabled():
            # an evaluation forward (no_grad / inference_mode), maybe on some ranks only: launching here
            # could leave a collective no peer joins. The next training forward launches instead.
            return
        iteration = self.engine.steps_taken
        if self._launched_at == iteration or not should_communicate(iteration, self.config.communication_interval):
            return  # already launched by an earlier forward of this iteration, or a local-SGD step
        self._launched_at = iteration
        self._averaged = [flatten(group) for group in self._groups]  # snapshot x_t on the main thread
        topology, op, copies = self.engine.topology, self._op(self.communications), self._averaged

        def job() -> None:
            for t in copies:
                topology.run(t, op, True)

        self.engine.submit(f"decentralized weight average {self.communications}", job)
        self.communications += 1

    def _op(self, k: int) -> Callable[[torch.Tensor, Comm], None]:
        mode = self.config.peer_selection_mode
        return lambda t, comm: average_weights_(t, comm, mode, k)

    def before_step(self) -> None:
        if self._averaged is None:
            return
        self.engine.wait()  # normally already done at the end of backward
        for flat, group in zip(self._averaged, self._groups):
            unflatten_into(flat, group)
        self._averaged = None

    def state_dict(self) -> dict:
        return {"communications": self.communications}

    def load_state_dict(self, state: dict) -> None:
        self.communications = int(state.get("communications", 0))
        self._averaged = None
        self._launched_at = None


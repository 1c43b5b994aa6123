"""Low-precision decentralized SGD (DCD-PSGD, arXiv 1803.06443) on a fixed ring, 8-bit on the wire.

Every participant keeps, per bucket, three replicas: w (its own last communicated weights), l and r
(the same for its left and right ring neighbours). All start at x_0 (after the rank-0 broadcast).
After each optimizer step on a communication step ((step - 1) % interval == 0, step counted from 1):

    z = x + l/3 + r/3 - 5w/3          # = [(w + l + r)/3 - lr*g] - w, the change to send
    send Q(z) to both neighbours, receive Q(z_left), Q(z_right)   (MinMaxUInt8, one chunk per bucket)
    l += D(Q(z_left));  r += D(Q(z_right));  x <- w + D(Q(z));  w <- x

Because a rank and its neighbours add the very same decompressed bytes, l and r stay bit-identical to
the neighbours' w. Steps without communication are local SGD (their progress is carried in x - w).
Hierarchical mode (>= 2 nodes of >= 2 processes): x is averaged inside the node in full precision, the
ring runs among node leaders (who hold w, l, r), and the result is broadcast back.

Buckets: the engine's gradient-bucket layout (same parameters, same order), one weight bucket each, so
`bucket_size_mb` sets the quantization granularity (min/max per bucket), as in the source system.

Source system (BAGUA): the same update in its Rust/CUDA backend, state per bucket; the replicas were not
part of checkpoints. Here w, l, r are in `state_dict()` (tied to the saving rank: a checkpoint of rank r
only loads on rank r of a world of the same size, since the replicas describe that rank's neighbours).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..buckets import flatten, unflatten_into
from ..comm import Comm
from ..quantize import compress_eager, decompress_eager, run_fused
from .base import Algorithm, AlgorithmImpl
from .decentralized import _check_interval, should_communicate

logger = logging.getLogger(__name__)

_MINMAX_BYTES = 8  # two float32 values travel in front of the codes


def ring_neighbours(rank: int, n: int) -> tuple[int, int]:
    """(left, right) of `rank` on the ring 0 -> 1 -> ... -> n-1 -> 0."""
    return (rank - 1) % n, (rank + 1) % n


def pack(minmax: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """One uint8 message: the float32 (min, max) bytes, then the codes."""
    return torch.cat([minmax.reshape(-1).float().contiguous().view(torch.uint8), q.reshape(-1)])


def unpack(message: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    minmax = message[:_MINMAX_BYTES].clone().view(torch.float32).reshape(1, 2)
    return minmax, message[_MINMAX_BYTES:].reshape(1, -1)


def ring_exchange(message: torch.Tensor, comm: Comm) -> tuple[torch.Tensor, torch.Tensor]:
    """Send `message` to both ring neighbours; return (from_left, from_right).

    Blocking pairwise exchanges, each rank taking its two ring edges in one global order (by the
    edge's (low, high) ranks): the earliest unfinished edge always has both ends waiting on it, so
    there is no deadlock. With n = 2 left and right are one peer: a single exchange serves both.
    """
    left, right = ring_neighbours(comm.rank, comm.size)
    if left == right:
        received = comm.exchange(message, left)
        return received, received
    edges = sorted({left, right}, key=lambda peer: (min(peer, comm.rank), max(peer, comm.rank)))
    received = {peer: comm.exchange(message, peer) for peer in edges}
    return received[left], received[right]


def _compress_difference(x, w, l, r):
    """Q(z), z = x + l/3 + r/3 - 5w/3, as the spec writes it (one fused pass when compiled)."""
    return compress_eager(x + l / 3 + r / 3 - 5 * w / 3, chunks=1)


def _apply_differences(x, w, l, r, minmax_left, q_left, minmax_right, q_right, minmax, q) -> None:
    """l += D(left), r += D(right), w += D(own), x <- w, in place (one fused pass when compiled)."""
    l.add_(decompress_eager(minmax_left, q_left).reshape(-1).to(l.dtype))
    r.add_(decompress_eager(minmax_right, q_right).reshape(-1).to(r.dtype))
    w.add_(decompress_eager(minmax, q).reshape(-1).to(w.dtype))
    x.copy_(w)


def dcd_step_(x: torch.Tensor, w: torch.Tensor, l: torch.Tensor, r: torch.Tensor, comm: Comm) -> None:
    """One DCD-PSGD communication, all tensors 1-D of one bucket, updated in place (x <- w <- new x).
    Two passes over the weight-sized buffers (quantize the difference; apply all three differences),
    compiled for big buckets like the quantizer (same bytes as the eager ops, on every rank)."""
    minmax, q = run_fused("dcd_compress_difference", _compress_difference, x.numel(), x, w, l, r)
    from_left, from_right = ring_exchange(pack(minmax, q), comm)
    run_fused("dcd_apply_differences", _apply_differences, x.numel(), x, w, l, r,
                  *unpack(from_left), *unpack(from_right), minmax, q)


@dataclass
class LowPrecisionDecentralized(Algorithm):
    """DCD-PSGD on a ring (weights 1/3 self, left, right), differences quantized to 8 bits, run after
    every `communication_interval`-th optimizer step. Needs the optimizer over every trainable parameter."""

    name = "low_precision_decentralized"
    quantizes = True
    requires_full_optimizer = True
    rebuilds_buckets = False  # w, l, r are kept per bucket and mirror the neighbours' buckets
    hierarchical: bool = True
    communication_interval: int = 1

    def __post_init__(self):
        _check_interval(self.communication_interval)

    def reify(self, engine):
        return _LowPrecisionDecentralizedImpl(engine, self)


class _LowPrecisionDecentralizedImpl(AlgorithmImpl):
    def __init__(self, engine, config: LowPrecisionDecentralized):
        super().__init__(engine)
        self.config = config
        self._groups = [bucket.params for bucket in engine.buckets]
        # (w, l, r) per bucket, on the ranks that take part in the ring (node leaders when hierarchical).
        self.replicas: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        if engine.topology.is_leader:
            self.replicas = []
            for group in self._groups:
                x0 = flatten(group)
                self.replicas.append((x0, x0.clone(), x0.clone()))

    def after_step(self) -> None:
        if not should_communicate(self.engine.steps_taken, self.config.communication_interval):
            return
        topology, groups, replicas = self.engine.topology, self._groups, self.replicas

        def job() -> None:
            for index, group in enumerate(groups):
                x = flatten(group)
                topology.run(x, lambda t, comm: dcd_step_(t, *replicas[index], comm), True)
                unflatten_into(x, group)

        self.engine.submit("low_precision_decentralized ring step", job)
        self.engine.wait()

    def state_dict(self) -> dict:
        """Replicas are references, as in Module.state_dict(): torch.save (or deepcopy) to snapshot."""
        return {
            **self.rank_stamp(),
            "replicas": None if self.replicas is None else [list(triple) for triple in self.replicas],
        }

    def load_state_dict(self, state: dict) -> None:
        if not self.stamped_here(state):
            raise ValueError(
                f"low_precision_decentralized state was saved by rank {state.get('rank')} of "
                f"{state.get('world_size')}; this is rank {self.engine.rank} of {self.engine.world_size}. "
                "Its replicas describe that rank's ring neighbours: save and load one checkpoint per rank"
            )
        saved = state.get("replicas")
        if (saved is None) != (self.replicas is None):
            raise ValueError("low_precision_decentralized state: replicas present on one side only "
                             "(hierarchical layout changed between save and load)")
        if saved is None:
            return
        if len(saved) != len(self.replicas):
            raise ValueError(f"low_precision_decentralized state has {len(saved)} bucket(s), this model "
                             f"has {len(self.replicas)}; use the same bucket_size_mb as when saving")
        for index, (mine, theirs) in enumerate(zip(self.replicas, saved)):
            for name, dst, src in zip("wlr", mine, theirs):
                if dst.shape != src.shape:
                    raise ValueError(f"low_precision_decentralized state: bucket {index} replica {name} has "
                                     f"shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(src)

"""The algorithm contract: a user-facing config (`Algorithm`) and its per-model runtime (`AlgorithmImpl`).

`Algorithm` is a dataclass of options a user can read in one screen; it holds no process group.
`Algorithm.reify(engine)` builds the runtime for one wrapped model, which implements any of the hooks
below. The engine (`DataParallel`) calls them at fixed points of the training loop:

    forward:   before_forward()                      main thread, before the module runs
    backward:  on_bucket_ready(bucket) -> job|None   a job runs on the ordered comm thread; every
                                                     bucket, every iteration, in order (a bucket with
                                                     unused parameters at the end of backward)
               after_backward()                      end of backward, every job finished; grads only
    step:      before_step() / after_step()          optimizer step pre/post hooks (not called for a
                                                     step GradScaler skips)

and answers the engine's questions: `averages_gradients()` (this iteration), `weights_paused()` (a
context in which no background thread writes the weights, for checkpoints).
Hooks must not change parameters before `before_step` (autograd may still need them in backward).

A runtime sees the engine only through `Engine` below (the buckets, the topology and its communicators,
a way to submit and await communication, the step counter); what it communicates it composes from the
ops of `relax.comm` (`allreduce_mean`, `allreduce_sum`, `allreduce_16bit`), as torch's DDP comm hooks
compose. What the caller must do differently for an algorithm it asks the algorithm, never its name:
`quantizes`, `make_optimizer`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Protocol

import torch

from ..buckets import Bucket
from ..comm import Profiler, Topology


class Engine(Protocol):
    """What a runtime may use of the engine that wraps the model (`DataParallel` is one)."""

    params: list[torch.nn.Parameter]  # the trainable parameters, in bucket order
    buckets: list[Bucket]  # each a flat tensor that the gradients (or weights) of its parameters view
    optimizer: torch.optim.Optimizer | None
    topology: Topology  # the communicators: every rank, the node, the node leaders
    rank: int
    world_size: int
    timeout_s: float  # the limit of every collective
    steps_taken: int  # optimizer steps that happened through the engine (a step GradScaler skips is not one)
    profiler: Profiler  # times named phases (comm.NO_PROFILE unless DataParallel.profile was called)

    def submit(self, name: str, job: Callable[[], None]) -> None:
        """Queue `job` on the ordered communication thread (jobs run one at a time, in submission order)."""

    def wait(self) -> None:
        """Block until every submitted job has run (raising the first error, CommunicationError on timeout)."""


@dataclass
class Algorithm:
    """Base config. Subclasses are dataclasses that set `name` and implement `reify`."""

    name: ClassVar[str] = ""
    # Whether the engine should refuse an optimizer that does not update every trainable parameter.
    requires_full_optimizer: ClassVar[bool] = False
    # Whether the engine may rebuild buckets (and the runtime, its state_dict carried over) when the
    # set of parameters with requires_grad=True changes after wrapping.
    rebuilds_buckets: ClassVar[bool] = True

    # Whether it sends 8-bit codes through `relax.quantize` (whose compiled kernels a benchmark may warm up).
    quantizes: ClassVar[bool] = False
    # The config fields `make_optimizer` passes on as its own optimizer's options (an algorithm that
    # builds its own optimizer: qadam).
    optimizer_options: ClassVar[tuple[str, ...]] = ()

    def reify(self, engine: Engine) -> "AlgorithmImpl":
        raise NotImplementedError

    @classmethod
    def make_optimizer(cls, params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float,
                       total_steps: int, **options) -> torch.optim.Optimizer | None:
        """The optimizer this algorithm needs in place of the caller's own, or None (the caller chooses).
        `options`: that optimizer's other settings."""
        return None

    @classmethod
    def for_optimizer(cls, optimizer: torch.optim.Optimizer, **options) -> "Algorithm":
        """The algorithm with `options`, told its optimizer where it reads settings from it (so its saved
        config records what ran)."""
        return cls(**options)

    @property
    def hierarchical_requested(self) -> bool:
        return bool(getattr(self, "hierarchical", False))

    def bucket_kind(self, param) -> str:
        """Parameters of different kinds never share a bucket; "" is the default kind. An algorithm that
        treats some parameters differently (ByteGrad's full-precision 1-D parameters) names their kind."""
        return ""

    def bucket_pad_multiple(self, world_size: int) -> int:
        """Buckets are padded so their length divides by this (e.g. the world size for chunking)."""
        return 1

    def validate_optimizer(self, optimizer) -> None:
        """Raise if `optimizer` (never None here) cannot drive this algorithm. Called at wrap time on
        every world size, so a mismatch fails under plain `python` too."""


class AlgorithmImpl:
    """Runtime of one algorithm on one wrapped model. Every hook is optional."""

    # True when a background thread writes the weights (async): checkpoints copy them under the lock.
    writes_weights_in_background: ClassVar[bool] = False

    def __init__(self, engine: Engine):
        self.engine = engine

    def rank_stamp(self) -> dict:
        """Marks state that belongs to this rank (saved with it): see `stamped_here`."""
        return {"rank": self.engine.rank, "world_size": self.engine.world_size}

    def stamped_here(self, state: dict) -> bool:
        """Whether `state` was saved by this rank of a world of this size."""
        return (state.get("rank"), state.get("world_size")) == (self.engine.rank, self.engine.world_size)

    def averages_gradients(self) -> bool:
        """Whether this iteration's gradients end averaged over ranks. Then the engine treats
        parameters without a gradient like DDP's find_unused_parameters=True (averaged if some rank
        used them, left as they were if none did); otherwise grads stay local and such parameters keep
        theirs. Every rank must give the same answer (derive it from step counters)."""
        return False

    def weights_paused(self):
        """A context in which no background thread writes the weights."""
        return contextlib.nullcontext()

    def before_forward(self) -> None:
        pass

    def on_bucket_ready(self, bucket: Bucket) -> Callable[[], None] | None:
        return None

    def after_backward(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def abort(self) -> None:
        """Stop background communication, if the algorithm runs any (collective: every rank calls it)."""

    def resume(self) -> None:
        """Restart what `abort` stopped (collective: every rank calls it)."""

    def close(self) -> None:
        pass

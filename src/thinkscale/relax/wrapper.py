"""`DataParallel`: one model trained on many processes with a chosen communication relaxation.

    model = DataParallel(module, optimizer, algorithm="bytegrad")
    loss = loss_fn(model(x), y); loss.backward(); optimizer.step()    # the loop does not change

How it hooks in (public PyTorch hooks only):
- `Tensor.register_post_accumulate_grad_hook` on every trainable parameter marks its grad ready; when a
  bucket is complete its communication job is queued (buckets strictly in order) on one background thread,
  so communication overlaps the rest of backward. When the last bucket is queued, the engine waits for
  all jobs: gradients are final when `backward()` returns (grad clipping between backward and step works).
- `Optimizer.register_step_pre_hook` / `register_step_post_hook` drive algorithms that act on weights or
  optimizer state around the step (the documented step hook; nothing is monkeypatched).
- Parameters no rank used this iteration are communicated as zeros at the next step (or forward).
With no process group initialized (or a group of one) the wrapper is a no-op around the module, so the same
script runs under `python` and under `torchrun`.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import algorithms
from .algorithms import Algorithm, AlgorithmImpl
from .buckets import Bucket, build_buckets, flatten, unflatten_into
from .comm import Comm, OrderedExecutor, Topology, make_topology

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0


class DataParallel(nn.Module):
    """Wrap `module` for data-parallel training with `algorithm` (a name or an `Algorithm` object).

    Args:
        module: the model; every parameter must be floating point and on one device.
        optimizer: the optimizer stepping `module`'s parameters. Needed by algorithms that act around the
            step (decentralized, low_precision_decentralized, qadam, async warm-up counting).
        algorithm: one of `algorithms.names()` or an `Algorithm` instance.
        process_group: ranks to train over (default: the whole world). The wrapper creates its own
            groups over the same ranks so user collectives never interleave with its own.
        bucket_size_mb: gradient bucket size in MiB (a bucket may overshoot by one tensor).
        timeout_s: limit for every collective; a dead or stuck rank raises `CommunicationError`.
        local_world_size: processes per node for hierarchical mode (default: env LOCAL_WORLD_SIZE).
        **algorithm_options: options for a named algorithm, e.g. `hierarchical=False`.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        algorithm: str | Algorithm = "gradient_allreduce",
        process_group: dist.ProcessGroup | None = None,
        bucket_size_mb: float = 10,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        local_world_size: int | None = None,
        **algorithm_options,
    ):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"DataParallel wraps an nn.Module, got {type(module).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be positive, got {bucket_size_mb}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.module = module
        self.optimizer = optimizer
        self.algorithm = algorithms.resolve(algorithm, **algorithm_options)
        self.timeout_s = float(timeout_s)
        self.iteration = 0  # optimizer steps taken through this wrapper
        self.param_names = {id(p): name for name, p in module.named_parameters()}
        self.params = _trainable_parameters(module)
        _check_optimizer(self.optimizer, self.params, self.param_names, self.algorithm)

        self.topology = _topology(process_group, self.algorithm, self.timeout_s, local_world_size)
        self.world_size = self.topology.world.size
        self.rank = self.topology.world.rank
        self.buckets: list[Bucket] = []
        self._impl: AlgorithmImpl | None = None
        self._hooks: list = []
        self._sync_enabled = True
        self._next_bucket = 0  # next bucket to queue this iteration
        self._backward_seen = False  # some grad became ready since the last finish
        self._warned_unused = False
        if self.world_size == 1:
            logger.info("DataParallel: world size 1, running %s as a plain module", type(module).__name__)
            return
        self._broadcast_from_rank0()
        pad = self.algorithm.bucket_pad_multiple(self.topology.algorithm_size)
        self.buckets = build_buckets(self.params, int(bucket_size_mb * 2**20), pad)
        self.executor = OrderedExecutor(self.timeout_s)
        self._impl = self.algorithm.reify(self)
        self._install_hooks()
        logger.info(
            "DataParallel: rank %d/%d, %s, %d bucket(s), hierarchical=%s",
            self.rank, self.world_size, self.algorithm.name, len(self.buckets), self.topology.hierarchical,
        )

    # ----- the training loop's entry points -------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._impl is not None and self._sync_enabled:
            self._finish_iteration_if_needed()
            for bucket in self.buckets:
                bucket.attach_grads()
            self._impl.before_forward()
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (no communication) inside this context; the next backward
        outside it communicates the accumulated sum once."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    # ----- state ------------------------------------------------------------------------------------
    def algorithm_state_dict(self) -> dict:
        """Everything the algorithm needs to resume: step counter, replicas, momenta, phase."""
        return {
            "algorithm": self.algorithm.name,
            "config": asdict(self.algorithm),
            "iteration": self.iteration,
            "state": self._impl.state_dict() if self._impl is not None else {},
        }

    def load_algorithm_state_dict(self, state: dict) -> None:
        if state.get("algorithm") != self.algorithm.name:
            raise ValueError(
                f"checkpoint holds state of algorithm {state.get('algorithm')!r}, "
                f"this model runs {self.algorithm.name!r}"
            )
        self.iteration = int(state["iteration"])
        if self._impl is not None:
            self._impl.load_state_dict(state.get("state", {}))

    # nn.Module calls these from state_dict() / load_state_dict(): algorithm state travels with weights.
    def get_extra_state(self) -> dict:
        return self.algorithm_state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.load_algorithm_state_dict(state)

    def abort(self) -> None:
        """Stop the algorithm's background communication (async model averaging); every rank calls it."""
        if self._impl is not None:
            self._impl.abort()

    def resume(self) -> None:
        """Restart background communication stopped by `abort()`; every rank calls it."""
        if self._impl is not None:
            self._impl.resume()

    def close(self) -> None:
        """Remove hooks and stop background work (idempotent)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._impl is not None:
            self._impl.close()
            self.executor.shutdown()
            self._impl = None

    # ----- engine internals -------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for bucket in self.buckets:
            for param in bucket.params:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._grad_hook(bucket)))
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_pre_hook(lambda *_: self._before_step()))
            self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: self._after_step()))

    def _grad_hook(self, bucket: Bucket):
        def hook(param: torch.Tensor) -> None:
            if not self._sync_enabled or self._impl is None:
                return
            self._backward_seen = True
            bucket.ready.add(id(param))
            if bucket.is_ready:
                self._queue_ready_buckets()

        return hook

    def _queue_ready_buckets(self) -> None:
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].is_ready:
            bucket = self.buckets[self._next_bucket]
            bucket.attach_grads()  # a grad that is not our view (set_to_none) is copied in first
            job = self._impl.on_bucket_ready(bucket)
            if job is not None:
                self.executor.submit(f"{self.algorithm.name} bucket {bucket.index}", job)
            self._next_bucket += 1
        if self._next_bucket == len(self.buckets):
            self._finish_backward()

    def _finish_backward(self) -> None:
        self.executor.wait()
        for bucket in self.buckets:
            bucket.ready.clear()
        self._next_bucket = 0
        self._backward_seen = False
        self._impl.after_backward()

    def _finish_iteration_if_needed(self) -> None:
        """Some parameters got no gradient this iteration: communicate them as zeros (in bucket order)."""
        if not self._backward_seen:
            return
        if not self._warned_unused:
            missing = [self.param_names.get(id(p), "?") for b in self.buckets for p in b.params
                       if id(p) not in b.ready]
            logger.warning("parameters without a gradient this iteration are averaged as zeros: %s",
                           ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
            self._warned_unused = True
        for bucket in self.buckets[self._next_bucket:]:
            bucket.attach_grads()
            bucket.ready.update(id(p) for p in bucket.params)
        self._queue_ready_buckets()

    def _before_step(self) -> None:
        if self._impl is None:
            return
        self._finish_iteration_if_needed()
        self._impl.before_step()

    def _after_step(self) -> None:
        if self._impl is not None:
            self._impl.after_step()
        self.iteration += 1

    def _broadcast_from_rank0(self) -> None:
        """Start every replica from rank 0's parameters and buffers (one broadcast per dtype)."""
        tensors = [p.data for p in self.module.parameters()] + list(self.module.buffers())
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = flatten(group)
            self.topology.world.broadcast_(flat, src=0)
            unflatten_into(flat, group)


def _trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; DataParallel needs floating parameters")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters (none with requires_grad=True)")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
    return params


def _check_optimizer(optimizer, params, names, algorithm: Algorithm) -> None:
    if optimizer is None:
        if algorithm.requires_full_optimizer:
            raise ValueError(f"algorithm {algorithm.name!r} needs the optimizer: DataParallel(module, optimizer, ...)")
        return
    algorithm.validate_optimizer(optimizer)
    covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [names.get(id(p), "?") for p in params if id(p) not in covered]
    if missing and algorithm.requires_full_optimizer:
        raise ValueError(
            f"algorithm {algorithm.name!r} needs an optimizer over every trainable parameter; missing: "
            + ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        )


def _topology(process_group, algorithm: Algorithm, timeout_s: float, local_world_size) -> Topology:
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group given but torch.distributed is not initialized")
        return Topology(world=Comm(None))
    return make_topology(process_group, algorithm.hierarchical_requested, timedelta(seconds=timeout_s),
                         local_world_size)

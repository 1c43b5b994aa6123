"""`DataParallel`: one model trained on many processes with a chosen communication relaxation.

    model = DataParallel(module, optimizer, algorithm="bytegrad")
    loss = loss_fn(model(x), y); loss.backward(); optimizer.step()    # the loop does not change

How it hooks in (public PyTorch hooks, and the autograd engine callback DDP itself uses):
- `Tensor.register_post_accumulate_grad_hook` on every trainable parameter marks its grad ready; when a
  bucket is complete its communication job is queued (buckets strictly in order) on one background thread,
  so communication overlaps the rest of backward.
- One place decides when an iteration ends: the end of backward. The first grad hook of a backward queues
  a callback on the autograd engine, which runs once backward has finished. There, buckets holding
  parameters that got no gradient are completed (this rank contributes zeros for them, or the gradient
  they already hold) and sent, and the engine waits for every job: gradients are final and averaged when
  `backward()` returns, so clipping, `GradScaler.unscale_` or a logging collective see final values.
- Unused parameters are treated like `DistributedDataParallel(find_unused_parameters=True)`: one small
  allreduce per iteration of a "used here" bitmap (MAX over ranks) decides, for each parameter without a
  gradient on this rank, whether some rank used it (its grad becomes the average, this rank counting
  zeros) or none did (its grad is left as it was: None after `zero_grad()`, so the optimizer skips it).
  Why always, and not only when something was unused: every rank must take part in the collective, and
  a rank cannot know that the others used everything without asking. `find_unused_parameters=False`
  drops the allreduce; a parameter no rank used then gets a zero gradient.
- Parameters frozen or unfrozen after wrapping: at the next training forward the buckets are rebuilt
  over the parameters with `requires_grad=True`, so a frozen parameter is never communicated and its
  grad stays None (never moved by weight decay). Every rank must make the same change before the same
  forward, as with any collective; the weight-space algorithms with per-bucket state
  (low_precision_decentralized, async) refuse the change and ask to re-wrap.
- Buffers (BatchNorm statistics): with `broadcast_buffers=True` (default) rank 0's buffers are broadcast
  at each forward, by DDP's rule: at the first forward and at every forward that follows a training
  forward (grad enabled, outside `no_sync`). An evaluation forward right after training therefore
  communicates, as with DDP: evaluate on one rank through `model.module`.
- `Optimizer.register_step_pre_hook` / `register_step_post_hook` drive algorithms that act on weights or
  optimizer state around the step; `steps_taken` counts steps that happened (a step that
  `torch.amp.GradScaler` skips, on every rank together since the averaged gradients overflow
  everywhere, is not counted). Under weight-space algorithms gradients stay local, so GradScaler would
  skip on some ranks only: not supported there.
With no process group initialized (or a group of one) the wrapper is a no-op around the module, so the same
script runs under `python` and under `torchrun`.

Numerically torch DDP: with `gradient_allreduce` the gradients after backward equal DDP's (allreduce SUM
then division by n, the same arithmetic), so weights match DDP to float rounding for loops with unused or
frozen parameters, buffers, clipping, AMP and tied weights. Not covered: reentrant activation checkpointing
(`use_reentrant=True` runs a nested backward; use `use_reentrant=False`), and several backward calls
into one step without `no_sync()` (each backward is one iteration and communicates, which sums to the
same average but costs one exchange per backward).
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import algorithms
from .algorithms import Algorithm, AlgorithmImpl
from .buckets import Bucket, build_buckets, flatten, group_by_dtype, unflatten_into
from .comm import NO_PROFILE, Comm, CommunicationError, OrderedExecutor, Profiler, Topology, make_topology

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
        timeout_s: limit for every collective, and for the whole wait at the end of backward (one
            deadline, not one per bucket); a dead or stuck rank raises `CommunicationError`, after which
            the engine is reset so the process can save a checkpoint and exit.
        local_world_size: processes per node for hierarchical mode (default: env LOCAL_WORLD_SIZE).
        broadcast_buffers: broadcast rank 0's buffers at forward, as DDP does (default True).
        find_unused_parameters: run the per-iteration "used" bitmap allreduce that keeps the grad of a
            parameter no rank used as it was (default True; False saves one small collective per
            iteration and gives such parameters a zero gradient).
        **algorithm_options: options for a named algorithm, e.g. `hierarchical=False`.

    Example (the same lines under `torchrun`, after `dist.init_process_group("gloo")`, average the
    gradients over the ranks; in one plain process, as here, the wrapper passes them through)::

        >>> import torch
        >>> from thinkscale.relax import DataParallel
        >>> net = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> model = DataParallel(net, opt, algorithm="bytegrad")
        >>> model(torch.ones(2, 4)).sum().backward()           # on many ranks: gradients averaged here
        >>> torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0) > 0
        tensor(True)
        >>> opt.step()
        >>> model.algorithm.name
        'bytegrad'
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
        broadcast_buffers: bool = True,
        find_unused_parameters: bool = True,
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
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        self.broadcast_buffers = bool(broadcast_buffers)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.profiler: Profiler = NO_PROFILE
        self.steps_taken = 0  # optimizer steps that happened through this wrapper (GradScaler's skips are not)
        self.param_names = {id(p): name for name, p in module.named_parameters()}
        self.params = _trainable_parameters(module)
        _check_optimizer(self.optimizer, self.params, self.param_names, self.algorithm)

        self.topology = _topology(process_group, self.algorithm, self.timeout_s, local_world_size)
        self.world_size = self.topology.world.size
        self.rank = self.topology.world.rank
        self.buckets: list[Bucket] = []
        self._impl: AlgorithmImpl | None = None
        self._grad_hooks: list = []
        self._step_hooks: list = []
        self._sync_enabled = True
        self._buffers_due = True  # DDP's rule: the first forward, and any after a training forward
        # state of the backward in progress (one iteration), reset by _end_iteration
        self._in_backward = False
        self._next_bucket = 0  # next bucket to launch
        self._flag_index: dict[int, int] = {}  # parameter id -> position in the "used" bitmap
        self._logged_unused = False
        if self.world_size == 1:
            logger.info("DataParallel: world size 1, running %s as a plain module", type(module).__name__)
            return
        self.executor = OrderedExecutor(self.timeout_s, self.params[0].device)
        self._broadcast_from_rank0([p.data for p in module.parameters()] + list(module.buffers()))
        self._build()
        if self.optimizer is not None:
            self._step_hooks = [self.optimizer.register_step_pre_hook(lambda *_: self._before_step()),
                                self.optimizer.register_step_post_hook(lambda *_: self._after_step())]
        logger.info(
            "DataParallel: rank %d/%d, %s, %d bucket(s), hierarchical=%s",
            self.rank, self.world_size, self.algorithm.name, len(self.buckets), self.topology.hierarchical,
        )

    # ----- what algorithm runtimes use besides the attributes (algorithms.base.Engine) -------------
    def submit(self, name: str, job) -> None:
        """Queue `job` on the ordered communication thread."""
        if self.profiler is not NO_PROFILE:
            job = _timed(job, self.profiler, "comm_jobs")
        self.executor.submit(name, job)

    def wait(self) -> None:
        """Block until every submitted job has run."""
        with self.profiler.phase("comm_wait"):
            self.executor.wait()

    def profile(self, profiler: Profiler) -> None:
        """Time the communication from now on: jobs ("comm_jobs", on the communication thread), waits
        for them ("comm_wait", on the training thread) and the algorithm's own phases (ByteGrad's
        passes and wire waits) through `profiler.phase(name)`."""
        self.profiler = profiler

    # ----- the training loop's entry points -------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._impl is not None:
            self._prepare_forward()
        output = self.module(*args, **kwargs)
        self._buffers_due = torch.is_grad_enabled() and self._sync_enabled
        return output

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
            "steps_taken": self.steps_taken,
            "state": self._impl.state_dict() if self._impl is not None else {},
        }

    def load_algorithm_state_dict(self, state: dict) -> None:
        if state.get("algorithm") != self.algorithm.name:
            raise ValueError(
                f"checkpoint holds state of algorithm {state.get('algorithm')!r}, "
                f"this model runs {self.algorithm.name!r}; load_state_dict(..., strict=False) takes the "
                "weights and leaves the algorithm state fresh"
            )
        self.steps_taken = int(state["steps_taken"] if "steps_taken" in state else state["iteration"])  # (older name)
        if self._impl is not None:
            self._impl.load_state_dict(state.get("state", {}))

    # nn.Module calls these from state_dict() / load_state_dict(): algorithm state travels with weights.
    def get_extra_state(self) -> dict:
        return self.algorithm_state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.load_algorithm_state_dict(state)

    def state_dict(self, *args, **kwargs):
        """`nn.Module.state_dict`, taken while no background averaging writes the weights (async):
        then the tensors are copies, since torch.save reads them later, outside the lock."""
        if self._impl is None or not self._impl.writes_weights_in_background:
            return super().state_dict(*args, **kwargs)
        with self._impl.weights_paused():
            state = super().state_dict(*args, **kwargs)
            if not kwargs.get("keep_vars", False):
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        state[key] = value.clone()
            return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, while no background averaging writes the weights (async).
        A checkpoint saved under another algorithm raises with strict=True; with strict=False its
        weights load, the algorithm state starts fresh, a warning names both algorithms and
        `missing_keys` lists `_extra_state`."""
        saved = state_dict.get("_extra_state")
        theirs = saved.get("algorithm") if isinstance(saved, dict) else None
        if not strict and saved is not None and theirs != self.algorithm.name:
            logger.warning("checkpoint holds state of algorithm %r, this model runs %r: loading the weights "
                           "only (strict=False); the algorithm state starts fresh",
                           theirs, self.algorithm.name)
            metadata = getattr(state_dict, "_metadata", None)  # module versions, as state_dict() saved them
            state_dict = OrderedDict((k, v) for k, v in state_dict.items() if k != "_extra_state")
            if metadata is not None:
                state_dict._metadata = metadata
        paused = self._impl.weights_paused() if self._impl is not None else contextlib.nullcontext()
        with paused:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
        for handle in self._grad_hooks + self._step_hooks:
            handle.remove()
        self._grad_hooks, self._step_hooks = [], []
        if self._impl is not None:
            self._impl.close()
            self.executor.shutdown()
            self._impl = None

    # ----- engine: buckets and hooks ----------------------------------------------------------------
    def _build(self) -> None:
        """Buckets over `self.params`, the algorithm's runtime, and one grad hook per parameter."""
        pad = self.algorithm.bucket_pad_multiple(self.topology.algorithm_size)
        self.buckets = build_buckets(self.params, self.bucket_bytes, pad, self.algorithm.bucket_kind)
        self._flag_index = {id(p): k for k, p in enumerate(p for b in self.buckets for p in b.params)}
        self._impl = self.algorithm.reify(self)
        self._grad_hooks = [p.register_post_accumulate_grad_hook(self._grad_hook(bucket, index))
                            for bucket in self.buckets for index, p in enumerate(bucket.params)]

    def _rebuild_if_trainable_changed(self) -> None:
        """requires_grad changed since the buckets were built: rebuild them over the trainable set."""
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        if [id(p) for p in trainable] == [id(p) for p in self.params]:
            return
        if not self.algorithm.rebuilds_buckets:
            raise ValueError(
                f"the set of parameters with requires_grad=True changed after wrapping, and algorithm "
                f"{self.algorithm.name!r} keeps per-bucket state that cannot follow it; wrap the module "
                "again (DataParallel(...)) after freezing or unfreezing"
            )
        if not trainable:
            raise ValueError("every parameter is frozen now (requires_grad=False): nothing to train")
        logger.info("requires_grad changed: rebuilding buckets over %d trainable parameter(s) (was %d)",
                    len(trainable), len(self.params))
        state = self._impl.state_dict()
        for handle in self._grad_hooks:
            handle.remove()
        self._impl.close()
        self.params = trainable
        self._build()
        self._impl.load_state_dict(state)

    def _grad_hook(self, bucket: Bucket, index: int):
        def hook(param: torch.Tensor) -> None:
            if not self._sync_enabled or self._impl is None:
                return
            if not self._in_backward:
                self._begin_iteration()
            if id(param) in bucket.ready:
                raise RuntimeError(
                    f"parameter {self.param_names.get(id(param), '?')!r} got its gradient twice in one "
                    "backward (reentrant checkpointing?); use torch.utils.checkpoint(..., use_reentrant=False)"
                )
            bucket.take_grad(index)
            bucket.ready.add(id(param))
            if bucket.is_ready:
                self._launch_ready_buckets()

        return hook

    # ----- engine: one iteration = one backward -----------------------------------------------------
    def _begin_iteration(self) -> None:
        self._in_backward = True
        # Runs once the whole backward has finished. This is how torch's DDP reducer finalizes too; no
        # public hook exists for "backward finished".
        torch.autograd.Variable._execution_engine.queue_callback(self._end_iteration)

    def _launch_ready_buckets(self) -> None:
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].is_ready:
            self._launch(self.buckets[self._next_bucket])
            self._next_bucket += 1

    def _launch(self, bucket: Bucket) -> None:
        job = self._impl.on_bucket_ready(bucket)
        if job is not None:
            self.submit(f"{self.algorithm.name} bucket {bucket.index}", job)

    def _end_iteration(self) -> None:
        """End of backward: complete and send the buckets still open, wait for all communication."""
        try:
            missing = self._complete_open_buckets()
            averaged = self._impl.averages_gradients()
            used = self._used_anywhere(missing) if averaged and self.find_unused_parameters else None
            # one deadline for all of it, from the end of backward (a long backward is not a timeout);
            # on failure the executor drops its queue itself
            self.wait()
        except CommunicationError:
            self._reset_iteration()  # the process can checkpoint and exit; the ranks are out of step
            raise
        if averaged:
            for bucket, index in missing:
                p = bucket.params[index]
                if used is None or used[self._flag_index[id(p)]]:
                    p.grad = bucket.views[index]  # some rank used it: the average, as DDP gives
        self._reset_iteration()
        self._impl.after_backward()

    def _complete_open_buckets(self) -> list[tuple[Bucket, int]]:
        """Stage the slots of parameters that got no gradient and launch the remaining buckets in
        order. Returns those parameters as (bucket, index) pairs."""
        missing = []
        for bucket in self.buckets[self._next_bucket:]:
            for index, p in enumerate(bucket.params):
                if id(p) not in bucket.ready:
                    bucket.stage_missing(index)
                    missing.append((bucket, index))
            self._launch(bucket)
        self._next_bucket = len(self.buckets)
        if missing and not self._logged_unused:
            self._logged_unused = True
            names = [self.param_names.get(id(b.params[i]), "?") for b, i in missing]
            log = logger.info if self.find_unused_parameters else logger.warning
            log("parameters without a gradient on rank %d (handled like DDP's find_unused_parameters=%s): %s",
                self.rank, self.find_unused_parameters,
                ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
        return missing

    def _used_anywhere(self, missing: list[tuple[Bucket, int]]) -> list[int]:
        """Queue the allreduce (MAX) of this rank's "used" bitmap; the returned list fills in when
        the executor has been waited for."""
        comm = self.topology.world
        flags = torch.ones(len(self._flag_index), dtype=torch.uint8, device=comm.device)
        for bucket, index in missing:
            flags[self._flag_index[id(bucket.params[index])]] = 0
        result: list[int] = []
        self.submit("used-parameter bitmap",
                             lambda: result.extend(comm.allreduce_max_(flags).tolist()))
        return result

    def _reset_iteration(self) -> None:
        for bucket in self.buckets:
            bucket.ready.clear()
        self._next_bucket = 0
        self._in_backward = False

    def _prepare_forward(self) -> None:
        if self._in_backward:  # the last backward raised before its end callback ran
            logger.warning("the previous backward did not finish; waiting for what it launched")
            try:
                self.wait()
            finally:
                self._reset_iteration()
        if torch.is_grad_enabled() and self._sync_enabled:
            self._rebuild_if_trainable_changed()
        if self.broadcast_buffers and self._buffers_due:
            self._broadcast_buffers()
        if self._sync_enabled:
            self._impl.before_forward()

    def _before_step(self) -> None:
        if self._impl is not None:
            self._impl.before_step()

    def _after_step(self) -> None:
        if self._impl is not None:
            self._impl.after_step()
        self.steps_taken += 1

    # ----- broadcasts ---------------------------------------------------------------------------------
    def _broadcast_buffers(self) -> None:
        """Rank 0's buffers to every rank, through the ordered executor (a weight average launched by
        an earlier forward of this iteration may still be running there)."""
        buffers = list(self.module.buffers())
        if buffers:
            self.submit("buffer broadcast", lambda: self._broadcast_from_rank0(buffers))
            self.wait()

    def _broadcast_from_rank0(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` with rank 0's values (one broadcast per dtype)."""
        with torch.no_grad():
            for group in group_by_dtype(tensors):
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


def _timed(job, profiler: Profiler, name: str):
    def run() -> None:
        with profiler.phase(name):
            job()
    return run

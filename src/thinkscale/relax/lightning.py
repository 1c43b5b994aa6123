"""`RelaxStrategy`: every relax algorithm in a Lightning `Trainer`, through Lightning's own Strategy API.

    import lightning.pytorch as pl
    from thinkscale.relax.lightning import RelaxStrategy
    trainer = pl.Trainer(strategy=RelaxStrategy(algorithm="bytegrad"), accelerator="cpu", devices=2)
    trainer.fit(module)

It is Lightning's `DDPStrategy` (the same launchers: the default re-runs the script once per extra
process, `start_method="spawn"` spawns them, and under `torchrun` it joins torchrun's processes; the same
process group set-up, reductions and barriers) with one change: the model is wrapped in relax's
`DataParallel` instead of torch's `DistributedDataParallel`. So:
- `algorithm` is a relax algorithm's name (or an `Algorithm`), its options as keyword arguments;
- the optimizer must be one (a relax wrapper drives one optimizer). `qadam` needs its own optimizer: the
  strategy builds `QAdamOptimizer` from the one `configure_optimizers` returned (its lr, betas and weight
  decay; Adam-like optimizers only) and the run's total steps; LR schedulers are refused with it, since
  they would drive the optimizer it replaces;
- gradient accumulation (`accumulate_grad_batches`) uses `DataParallel.no_sync` (refused with async,
  whose averaging thread the weight lock does not keep out of a `no_sync` backward);
- checkpoints go through Lightning's own save and restore: the weights are taken while no background
  thread writes them (async), and every rank's algorithm state (error-feedback residuals, replicas,
  momenta, step counters) is gathered into the checkpoint under "relax", each rank taking its own back on
  restore. Resuming on another world size starts the rank-local state fresh, with a warning from the
  algorithm.

Needs the `lightning` extra (`pip install 'thinkscale[lightning]'`, Lightning 2.6).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("thinkscale.relax.lightning needs Lightning: pip install 'thinkscale[lightning]' "
                      f"(lightning>=2.6); {exc}") from None

from . import algorithms
from .algorithms import Algorithm
from .wrapper import DEFAULT_TIMEOUT_S, DataParallel

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "relax"


class RelaxStrategy(DDPStrategy):
    """Lightning strategy that trains with a relax algorithm.

    Args:
        algorithm: a name from `thinkscale.relax.algorithms.names()` or an `Algorithm`.
        bucket_size_mb, find_unused_parameters, broadcast_buffers: as `DataParallel`'s.
        timeout_s: the limit of every collective (the process group's and the algorithm's).
        start_method, process_group_backend, cluster_environment, checkpoint_io, ...: as `DDPStrategy`'s.
        **algorithm_options: the algorithm's options, e.g. `error_feedback=True` for bytegrad.
    """

    def __init__(self, algorithm: str | Algorithm = "gradient_allreduce", *, bucket_size_mb: float = 10,
                 timeout_s: float = DEFAULT_TIMEOUT_S, find_unused_parameters: bool = True,
                 broadcast_buffers: bool = True, accelerator=None, parallel_devices=None,
                 cluster_environment=None, checkpoint_io=None, precision_plugin=None,
                 process_group_backend: str | None = None, start_method: str = "popen", **algorithm_options):
        self.algorithm = algorithms.resolve(algorithm, **algorithm_options)  # bad names fail here, before launch
        self._wrapper_options = {"bucket_size_mb": bucket_size_mb, "timeout_s": timeout_s,
                                 "find_unused_parameters": find_unused_parameters,
                                 "broadcast_buffers": broadcast_buffers}
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be > 0, got {bucket_size_mb!r}")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timedelta(seconds=timeout_s), start_method=start_method)
        self._restored_state: dict | None = None

    # ----- set-up: the optimizer first, then the wrapper that hooks it ------------------------------------
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            check_accumulation(self.algorithm, trainer.accumulate_grad_batches)
            self.setup_optimizers(trainer)
            self._use_the_algorithms_optimizer(trainer)
            self.model = self._wrap(self.model)
            self._load_restored_state()
        else:
            self._sync_module_states()
        self.setup_precision_plugin()

    def _use_the_algorithms_optimizer(self, trainer: "pl.Trainer") -> None:
        """Keep the user's optimizer, or (qadam) replace it with the algorithm's own, built from its settings."""
        if len(self.optimizers) != 1:
            raise ValueError(f"RelaxStrategy drives exactly one optimizer; configure_optimizers returned "
                             f"{len(self.optimizers)}")
        given = self.optimizers[0]
        if isinstance(given, torch.optim.LBFGS):  # it re-evaluates the closure, which runs before the step here
            raise ValueError("RelaxStrategy does not support LBFGS (it re-evaluates the closure inside its step)")
        if not builds_own_optimizer(self.algorithm):
            return
        # the algorithm's configured values (None: not given) with the options passed as keywords
        configured = {k: v for k, v in dataclasses.asdict(self.algorithm).items() if v is not None}
        own_options = {k: v for k, v in configured.items() if k in self.algorithm.optimizer_options}
        settings, total = given.defaults, trainer.estimated_stepping_batches
        if "betas" not in settings or "lr" not in settings:
            raise ValueError(f"algorithm {self.algorithm.name!r} builds its own optimizer from an Adam-like one "
                             f"(lr, betas, weight_decay); configure_optimizers returned {type(given).__name__}")
        if len(given.param_groups) > 1:
            raise ValueError(f"algorithm {self.algorithm.name!r} builds its own optimizer from one parameter group; "
                             f"configure_optimizers returned {len(given.param_groups)}")
        if not math.isfinite(total) and "warmup_steps" not in own_options:
            raise ValueError(f"algorithm {self.algorithm.name!r}: the run's length is unknown (no max_steps or "
                             "max_epochs), so give warmup_steps= to RelaxStrategy")
        if self.lr_scheduler_configs:
            raise ValueError(f"algorithm {self.algorithm.name!r} replaces the optimizer with its own; an LR "
                             "scheduler would drive the replaced one: remove it")
        group = given.param_groups[0]
        own = type(self.algorithm).make_optimizer(
            group["params"], lr=group["lr"], betas=tuple(group["betas"]), weight_decay=group.get("weight_decay", 0.0),
            total_steps=int(total) if math.isfinite(total) else 1, **own_options)
        logger.info("RelaxStrategy: %s replaced by %s for algorithm %r", type(given).__name__,
                    type(own).__name__, self.algorithm.name)
        self.optimizers = [own]
        self.algorithm = type(self.algorithm).for_optimizer(own, **configured)

    def _wrap(self, module: torch.nn.Module) -> DataParallel:
        return DataParallel(module, self.optimizers[0], algorithm=self.algorithm, **self._wrapper_options)

    def _sync_module_states(self) -> None:
        """Not fitting (validate, test, predict): rank 0's weights and buffers everywhere, as DDPStrategy."""
        if dist.is_available() and dist.is_initialized():
            for tensor in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(tensor.data, src=0)

    # ----- the training loop --------------------------------------------------------------------------
    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        """Run the closure (forward and backward) first, then step. Lightning otherwise runs it inside
        `optimizer.step(closure)`, after the optimizer's step pre-hooks have fired - where relax's
        algorithms act on the weights once backward is done (decentralized puts the averaged weights in
        place there). Clipping and `on_before_optimizer_step` still run between backward and the update."""
        result = closure()
        return super().optimizer_step(optimizer, lambda: result, model, **kwargs)

    def block_backward_sync(self):
        if isinstance(self.model, DataParallel):
            return self.model.no_sync()
        return super().block_backward_sync()

    def teardown(self) -> None:
        self._restored_state = None  # a validate/test checkpoint's state must not reach a later fit
        if isinstance(self.model, DataParallel):
            self.model.close()
            self.model = self.lightning_module
        super().teardown()

    # ----- checkpoints --------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The weights, copied while no background averaging writes them (async)."""
        if not isinstance(self.model, DataParallel):
            return super().lightning_module_state_dict()
        prefix = "module."
        return {key[len(prefix):]: value for key, value in self.model.state_dict().items()
                if key.startswith(prefix)}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        """Every rank's algorithm state goes in, gathered to rank 0 (collective: Lightning calls this on
        every rank)."""
        if isinstance(self.model, DataParallel):
            mine = _to_cpu(self.model.algorithm_state_dict())
            gathered = [None] * self.world_size
            if self.world_size > 1:
                dist.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            checkpoint[CHECKPOINT_KEY] = {"world_size": self.world_size, "per_rank": gathered}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._restored_state = checkpoint.get(CHECKPOINT_KEY)
        return checkpoint

    def _load_restored_state(self) -> None:
        saved, self._restored_state = self._restored_state, None
        if saved is None:
            return
        per_rank = saved.get("per_rank") or []
        if saved.get("world_size") == self.world_size and len(per_rank) == self.world_size:
            mine = per_rank[self.global_rank]
        else:  # another world size: rank 0's state, which the algorithm stamps as not ours
            mine = per_rank[0] if per_rank else None
        if mine is not None:
            self.model.load_algorithm_state_dict(mine)


def builds_own_optimizer(algorithm: Algorithm) -> bool:
    """Whether `algorithm` needs an optimizer of its own in place of the one the user configured.

        >>> builds_own_optimizer(algorithms.resolve("qadam")), builds_own_optimizer(algorithms.resolve("bytegrad"))
        (True, False)
    """
    return type(algorithm).make_optimizer.__func__ is not Algorithm.make_optimizer.__func__


def check_accumulation(algorithm: Algorithm, accumulate_grad_batches: int) -> None:
    """Gradient accumulation runs the first micro-batches under `DataParallel.no_sync`, where async's
    averaging thread is not kept off the weights by its lock: refused rather than a silent race.

        >>> check_accumulation(algorithms.resolve("bytegrad"), 4)
        >>> check_accumulation(algorithms.resolve("async"), 4)
        Traceback (most recent call last):
        ...
        ValueError: algorithm 'async' cannot accumulate gradients (accumulate_grad_batches=4): ...
    """
    if accumulate_grad_batches > 1 and algorithm.name == "async":
        raise ValueError(f"algorithm 'async' cannot accumulate gradients (accumulate_grad_batches="
                         f"{accumulate_grad_batches}): its averaging thread may write the weights during the "
                         "backward of a micro-batch; use a larger batch instead")


def _to_cpu(value):
    """A copy of `value` (nested dicts, lists, tuples) with its tensors on the CPU, for all_gather_object."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value

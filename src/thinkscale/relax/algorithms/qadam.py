"""QAdam: Adam whose first moment travels 8-bit quantized after a full-precision warm-up.

    opt = QAdamOptimizer(module.parameters(), lr=1e-3, warmup_steps=100)
    model = DataParallel(module, opt, algorithm="qadam")      # or algorithm=QAdam(opt)

Steps are numbered t = 1, 2, ... (the Adam step count).
- Warm-up, t <= warmup_steps: gradients are averaged in full precision (allreduce, mean) and the step is
  exactly torch.optim.Adam (bias correction, L2 weight decay added to the gradient).
- Compression, t > warmup_steps: each rank folds its *local* gradient into the first moment,
  m <- beta1 * m + (1 - beta1) * (g_i + weight_decay * x), and m (not g) is averaged with ByteGrad. This
  runs in the bucket-ready hook, so it overlaps backward. Then
  x <- x - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps), bias corrections still using t.
  After the exchange every rank holds the same m, v and x (ByteGrad ends bit-identical).
- The second moment after warm-up, `second_moment=`:
  - "tracked" (default): v keeps Adam's update, v <- beta2 * v + (1 - beta2) * g_hat^2, with the averaged
    gradient recovered from the averaged momentum, g_hat = (m_t - beta1 * m_{t-1}) / (1 - beta1). No extra
    communication: every rank holds the same m_{t-1} and m_t, so every rank computes the same v. g_hat is
    the mean gradient plus the 8-bit error of m magnified by 1 / (1 - beta1); a zero-mean error adds
    its variance to v on average (slightly smaller steps, not larger). Alone (no engine) the local
    gradient is used, so this is Adam exactly.
  - "frozen": v is no longer updated (the source's rule, from 1-bit Adam, where m travels as signs and the
    gradient cannot be recovered). It needs a warm-up long enough for v to settle: on the pipeline's
    policy (30 steps, warm-up 6, beta2 0.95) it ends at loss 2.86 against Adam's 1.86, while "tracked"
    ends at Adam's (docs/benchmarks.md).

Where this differs from the source (BAGUA's QAdam), each a documented defect there:
- Weight decay is kept after warm-up. The source ignored it once compression began; here it is added to
  the local gradient before the momentum update, the same L2 form warm-up Adam uses, so the two phases
  optimise the same objective.
- The switch step keeps its gradient. The source re-initialised its buckets at the switch and lost one
  averaged gradient; here the phase of each step is decided from the step count on every rank, and the
  first compressed step folds its gradient into m like every later one.
- warmup_steps=0 works. With no Adam step a frozen v would stay 0 and m / eps would explode. "tracked"
  updates v from the first step on. "frozen": a parameter whose first step is already compressed
  initialises v = (1 - beta2) * g^2 from that step's gradient averaged in full precision (one extra
  allreduce, once), i.e. exactly what Adam's first step stores.
- No NaNs: eps must be > 0, so elements with v = 0 divide by eps, never 0 / 0. (Caveat of "frozen",
  shared with the source and 1-bit Adam: an element whose gradient was exactly zero through warm-up keeps
  v = 0 and later steps it by up to lr * |m_hat| / eps; warm up long enough for every parameter to get
  gradient.)
- No phase "reset": the engine's buckets serve both phases; the momentum lives in flat buffers aligned
  with the gradient buckets, and the optimizer's `exp_avg` state tensors are views of them.

After warm-up `param.grad` holds this rank's local gradient (only m is averaged), so clipping gradients
between backward and step has no effect there, and `torch.amp.GradScaler` cannot be used after warm-up
(m is formed during backward from the still-scaled gradient). A parameter without a gradient on some
rank after warm-up still steps on every rank with the averaged m. World size 1: `QAdamOptimizer` alone
does the same math without communication.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Callable, Iterable

import torch

from ..comm import allreduce_mean
from .base import Algorithm, AlgorithmImpl
from .bytegrad import ByteGradExchange, check_quantization_options


# ----- pure math ------------------------------------------------------------------------------------
def decayed_gradient(grad: torch.Tensor, param: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """g + weight_decay * x: L2 weight decay the way torch.optim.Adam applies it (a new tensor)."""
    return grad if weight_decay == 0 else grad.add(param, alpha=weight_decay)


def update_first_moment_(m: torch.Tensor, grad: torch.Tensor, beta1: float) -> None:
    """m <- beta1 * m + (1 - beta1) * grad, in place (lerp, as torch.optim.Adam computes it)."""
    m.lerp_(grad, 1 - beta1)


def update_second_moment_(v: torch.Tensor, grad: torch.Tensor, beta2: float) -> None:
    """v <- beta2 * v + (1 - beta2) * grad^2, in place."""
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def recover_gradient_(previous_m: torch.Tensor, m: torch.Tensor, beta1: float) -> None:
    """previous_m <- (m - beta1 * previous_m) / (1 - beta1), in place: the gradient that took the first
    moment from previous_m to m."""
    previous_m.mul_(-beta1).add_(m).div_(1 - beta1)


def adam_update_(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, beta1: float,
                 beta2: float, eps: float, step: int) -> None:
    """x <- x - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), in place (torch Adam's
    operation order, so warm-up matches it to the last bits)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(m, denom, value=-lr / bias_correction1)


# ----- optimizer ------------------------------------------------------------------------------------
class QAdamOptimizer(torch.optim.Optimizer):
    """Adam with a warm-up phase, then a frozen second moment (see the module docstring).

    Args:
        params: parameters or parameter groups (groups may override lr, betas, eps, weight_decay).
        lr: learning rate.
        warmup_steps: number of ordinary Adam steps before the first moment is communicated quantized
            (0 allowed: v then starts from the first step's gradient).
        betas: (beta1, beta2) as in Adam.
        eps: added to sqrt(v_hat); must be > 0 (v can be 0 for some elements once it is frozen).
        weight_decay: L2 penalty added to the gradient, in both phases.
        second_moment: "tracked" (v keeps Adam's update from the averaged gradient recovered from the
            averaged momentum) or "frozen" (v stops changing after warm-up, the source's rule).
    """

    SECOND_MOMENT_RULES = ("tracked", "frozen")

    def __init__(self, params: Iterable, lr: float = 1e-3, warmup_steps: int = 100,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 second_moment: str = "tracked"):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (the frozen second moment may hold zeros), got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if second_moment not in self.SECOND_MOMENT_RULES:
            raise ValueError(f"second_moment must be 'tracked' or 'frozen', got {second_moment!r}")
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.warmup_steps = warmup_steps
        self.second_moment = second_moment
        self.steps_taken = 0  # optimizer steps done; step t = steps_taken + 1 is the next one
        self._momentum_averaged = False  # set by the QAdam runtime once m of the coming step is averaged
        self._recovered_gradients: dict | None = None  # param -> averaged gradient recovered from m

    @property
    def next_step_is_warmup(self) -> bool:
        return self.steps_taken < self.warmup_steps

    @property
    def initialises_frozen_second_moment(self) -> bool:
        """The coming step is compressed and is the very first (warmup_steps=0) under "frozen": v is set
        from the full-precision average of this step's gradient."""
        return self.second_moment == "frozen" and self.steps_taken == 0 and not self.next_step_is_warmup

    def bind_momentum(self, param: torch.Tensor, buffer: torch.Tensor) -> None:
        """Make `buffer` (a view into a flat communication buffer) hold `param`'s first moment, keeping
        any value already there (e.g. from warm-up or a loaded checkpoint)."""
        state = self.state[param]
        current = state.get("exp_avg")
        if current is not None and current.data_ptr() == buffer.data_ptr():
            return
        if current is None:
            buffer.zero_()
        else:
            buffer.copy_(current)
        state["exp_avg"] = buffer

    def mark_momentum_averaged(self, recovered_gradients: dict | None = None) -> None:
        """Tell the next `step()` that every first moment is already updated and averaged; under
        "tracked", `recovered_gradients` maps each bucketed parameter to the gradient recovered from it."""
        self._momentum_averaged = True
        self._recovered_gradients = recovered_gradients

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        warmup = self.next_step_is_warmup
        averaged, self._momentum_averaged = self._momentum_averaged, False
        recovered, self._recovered_gradients = self._recovered_gradients, None
        tracked = self.second_moment == "tracked"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                # After warm-up under the engine every rank holds the same averaged m for every bucketed
                # parameter, used here or not, so every rank steps it once it has had a step (a
                # grad-less skip on some ranks only would split the replicas).
                if p.grad is None and not (averaged and not warmup and state.get("step", 0) > 0):
                    continue
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                if "exp_avg_sq" not in state:
                    state["exp_avg_sq"] = torch.zeros_like(p)
                first_step = state.get("step", 0) == 0
                state["step"] = state.get("step", 0) + 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                grad = None if p.grad is None else decayed_gradient(p.grad, p, group["weight_decay"])
                if warmup:
                    update_first_moment_(m, grad, beta1)
                    update_second_moment_(v, grad, beta2)
                else:
                    if not averaged:  # alone (no engine): the local gradient is the average
                        update_first_moment_(m, grad, beta1)
                    if tracked:
                        update_second_moment_(v, recovered[p] if averaged else grad, beta2)
                    elif first_step and grad is not None:  # never had an Adam step: v as Adam's first
                        update_second_moment_(v, grad, beta2)  # step would set it
                adam_update_(p, m, v, group["lr"], beta1, beta2, group["eps"], state["step"])
        self.steps_taken += 1
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        steps = [s.get("step", 0) for s in self.state.values()]
        self.steps_taken = int(max(steps, default=0))


# ----- algorithm ------------------------------------------------------------------------------------
_HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")


@dataclass
class QAdam(Algorithm):
    """Quantized Adam. Hyper-parameters come from the `QAdamOptimizer`; either name it here,
    `QAdam(opt)`, or use `algorithm="qadam"`. Values given explicitly (`lr=...`, ...) must equal the
    optimizer's: a mismatch is an error rather than a silent override. `hierarchical` applies with
    >= 2 nodes of >= 2 processes (node-local averaging in full precision, ByteGrad among leaders)."""

    name = "qadam"
    requires_full_optimizer = True
    optimizer: InitVar[QAdamOptimizer | None] = None
    lr: float | None = None
    warmup_steps: int | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    second_moment: str | None = None
    hierarchical: bool = True
    block_size: int = 1024  # elements per (min, max) of the 8-bit momentum (see bytegrad.py)
    full_precision_1d: bool = True  # m of 1-D parameters averaged in full precision

    quantizes = True
    optimizer_options = ("warmup_steps", "eps", "second_moment")

    @classmethod
    def make_optimizer(cls, params, *, lr, betas, weight_decay, total_steps, **options) -> QAdamOptimizer:
        """QAdamOptimizer, warming up for the first fifth of the steps (at least one) unless `warmup_steps`
        says otherwise. Its weight decay is L2 (Adam's), not AdamW's decoupled decay."""
        options.setdefault("warmup_steps", max(1, total_steps // 5))
        return QAdamOptimizer(params, lr=lr, betas=betas, weight_decay=weight_decay, **options)

    @classmethod
    def for_optimizer(cls, optimizer, **options) -> "QAdam":
        return cls(optimizer, **options)

    def __post_init__(self, optimizer: QAdamOptimizer | None) -> None:
        check_quantization_options(self.block_size, 4.0)
        self._optimizer = None
        if optimizer is not None:
            self.validate_optimizer(optimizer)
            self._optimizer = optimizer
            # record the effective values, so the saved algorithm config says what ran
            for key in _HYPER_PARAMETERS:
                setattr(self, key, optimizer.defaults[key])
            self.warmup_steps = optimizer.warmup_steps
            self.second_moment = optimizer.second_moment

    def validate_optimizer(self, optimizer) -> None:
        if not isinstance(optimizer, QAdamOptimizer):
            raise TypeError(
                f"algorithm 'qadam' needs a thinkscale.relax.algorithms.QAdamOptimizer, got "
                f"{type(optimizer).__name__}; create it with QAdamOptimizer(params, lr=..., warmup_steps=...)"
            )
        if self._optimizer is not None and optimizer is not self._optimizer:
            raise ValueError("QAdam(optimizer) names a different optimizer than the one given to DataParallel")
        actual = {key: optimizer.defaults[key] for key in _HYPER_PARAMETERS}
        actual["warmup_steps"] = optimizer.warmup_steps
        actual["second_moment"] = optimizer.second_moment
        for key, value in actual.items():
            wanted = getattr(self, key)
            if wanted is not None and (tuple(wanted) if key == "betas" else wanted) != value:
                raise ValueError(
                    f"qadam option {key}={wanted!r} differs from the optimizer's {key}={value!r}; "
                    "set hyper-parameters on QAdamOptimizer (the algorithm reads them from there)"
                )

    def reify(self, engine):
        self.validate_optimizer(engine.optimizer)
        return _QAdamImpl(engine, self)

    def bucket_pad_multiple(self, world_size: int) -> int:
        return world_size * self.block_size  # ByteGrad's chunks of whole blocks, one per participant

    def bucket_kind(self, param) -> str:
        return "full precision" if self.full_precision_1d and param.dim() <= 1 else ""


class _QAdamImpl(AlgorithmImpl):
    def __init__(self, engine, config: QAdam):
        super().__init__(engine)
        self.optimizer: QAdamOptimizer = engine.optimizer
        self.group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        # one flat momentum buffer per gradient bucket, same layout and padding
        self.momenta = {b.index: torch.zeros_like(b.flat) for b in engine.buckets}
        self.momentum_views = {b.index: b.split(self.momenta[b.index]) for b in engine.buckets}
        self.exchanges = {b.index: ByteGradExchange(config.block_size) for b in engine.buckets if not b.kind}
        # "tracked": m_{t-1}, per bucket, becomes the recovered averaged gradient after the exchange
        self.tracked = self.optimizer.second_moment == "tracked"
        tracked_buckets = engine.buckets if self.tracked else []
        self.previous = {b.index: torch.zeros_like(b.flat) for b in tracked_buckets}
        self.previous_views = {b.index: b.split(self.previous[b.index]) for b in tracked_buckets}
        self.recovered_gradients = {p: view for b in tracked_buckets
                                    for p, view in zip(b.params, self.previous_views[b.index])}

    def averages_gradients(self):
        # warm-up, and the step that initialises a frozen v from the full-precision average
        return self.optimizer.next_step_is_warmup or self.optimizer.initialises_frozen_second_moment

    def on_bucket_ready(self, bucket):
        optimizer, topology = self.optimizer, self.engine.topology
        momentum, views = self.momenta[bucket.index], self.momentum_views[bucket.index]
        for p, view in zip(bucket.params, views):
            optimizer.bind_momentum(p, view)  # re-binds after a checkpoint load replaced the state
        if optimizer.next_step_is_warmup:
            return lambda: topology.run(bucket.flat, allreduce_mean, True)
        init_second_moment = optimizer.initialises_frozen_second_moment
        groups = [self.group_of[id(p)] for p in bucket.params]
        if not bucket.kind:
            self.exchanges[bucket.index].profiler = self.engine.profiler
        average_momentum = allreduce_mean if bucket.kind else self.exchanges[bucket.index].average_

        def job():
            with torch.no_grad():
                if self.tracked:
                    self.previous[bucket.index].copy_(momentum)
                for p, grad, m, group in zip(bucket.params, bucket.views, views, groups):
                    grad = decayed_gradient(grad, p.detach(), group["weight_decay"])
                    update_first_moment_(m, grad, group["betas"][0])
                if init_second_moment:
                    topology.run(bucket.flat, allreduce_mean, True)  # full-precision g for v, this step only
                momentum[bucket.numel:].zero_()  # padding must not widen a block's min/max
                topology.run(momentum, average_momentum, True)
                if self.tracked:
                    for previous, m, group in zip(self.previous_views[bucket.index], views, groups):
                        recover_gradient_(previous, m, group["betas"][0])

        return job

    def after_backward(self):
        if not self.optimizer.next_step_is_warmup:
            self.optimizer.mark_momentum_averaged(self.recovered_gradients if self.tracked else None)

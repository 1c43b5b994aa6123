"""Relax's gradient-space relaxations as torch DDP communication hooks, for loops that keep
`torch.nn.parallel.DistributedDataParallel`.

    ddp = DistributedDataParallel(model)
    state = ByteGradHookState(ddp, error_feedback=True)   # every rank, same order (it makes a group)
    ddp.register_comm_hook(state, bytegrad_hook)

Two hooks, in the shape of `torch.distributed.algorithms.ddp_comm_hooks` (`hook(state, bucket) ->
Future` of the averaged bucket buffer):
- `bytegrad_hook`: the 8-bit exchange of `algorithms.bytegrad` (the same `ByteGradExchange`: blocks with
  their own (min, max), pipelined all-to-all + all-gather, every rank ends bit-identical), with its
  options: block size, piece size, error feedback, stochastic rounding, 1-D parameters in full precision.
- `wire16_hook`: the 16-bit wire (bf16 or fp16; DDP's own `bf16_compress_hook` refuses gloo), with its
  message buffer allocated once per bucket.

How DDP and the exchange meet:
- DDP's buckets are not padded and are rebuilt after the first iteration (in the order gradients
  arrived). The exchange needs a length divisible by ranks x block, so each bucket layout gets a padded
  staging buffer (fp32, whatever the gradients' dtype), allocated once; the padding is zeroed at every
  call so it never widens a block's (min, max).
- Error-feedback residuals are kept per bucket layout. When DDP changes its layout (the rebuild, or a
  resumed run's first iterations), the residuals of the old layout are folded into per-parameter
  residuals - the owner's part scaled by the number of ranks, which adds the same amount to the next
  average - and the new layout takes them up. `state_dict()` / `load_state_dict()` carry both, keyed by
  parameter names, so a checkpoint survives a rebuild and a restart; they belong to the rank that saved
  them (save one file per rank).
- On CPU the exchange runs on one background thread per state, in bucket order (the same on every
  rank), so it overlaps the rest of backward; on CUDA it runs in the hook, its kernels and NCCL
  collectives queued on streams (not yet run on a GPU).
- The state makes its own process group (with a timeout) over the DDP group's ranks, so the hook's
  collectives never interleave with DDP's or the user's; a dead peer fails the step with
  `CommunicationError` instead of hanging.

Weight-space algorithms (decentralized, low_precision_decentralized, async) are not gradient hooks: they
exchange weights around the optimizer step, which DDP's hook never sees; QAdam exchanges optimizer
momentum. Use them through `DataParallel` or the Lightning strategy.
"""
# No `from __future__ import annotations`: DDP checks the hooks' annotations as objects.
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .algorithms.bytegrad import ByteGradExchange, check_quantization_options, exchange_salt, piece_ranges
from .comm import Comm, CommunicationError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STATE_VERSION = 1


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """{id(parameter): name}, names as in the unwrapped module's state_dict (DDP's "module." dropped)."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(module, nn.Module):
        raise TypeError(f"the hook state needs the model (DDP or its module), got {type(model).__name__}")
    return {id(p): name for name, p in module.named_parameters()}


def _own_group(process_group: dist.ProcessGroup | None, timeout_s: float) -> Comm:
    """A group over `process_group`'s ranks, with its own timeout (collective: every rank, same order)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a DDP comm hook state needs an initialized process group (dist.init_process_group)")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
    return Comm(dist.new_group(ranks=ranks, timeout=timedelta(seconds=timeout_s)))


def fold_residuals(sent: torch.Tensor, owned: torch.Tensor, n: int, owner: int, block: int,
                   piece_numel: int, average: bool = True) -> torch.Tensor:
    """One residual per element of the buffer from an exchange's two: what this rank's sends dropped
    (`sent`, per element) plus what its re-quantization of the chunks it owns dropped (`owned`, laid out
    chunk after chunk), the latter scaled by `n` when averaging, since a value added to what one rank
    sends reaches the average divided by n.

        >>> import torch
        >>> sent, owned = torch.zeros(8), torch.tensor([1., 2., 3., 4.])
        >>> fold_residuals(sent, owned, n=2, owner=1, block=2, piece_numel=8)   # rank 1 owns 4:8
        tensor([0., 0., 0., 0., 2., 4., 6., 8.])
    """
    folded = sent.clone()
    scale = n if average else 1
    for start, length in piece_ranges(sent.numel(), n, block, piece_numel):
        chunk = length // n
        mine = folded[start + owner * chunk:start + (owner + 1) * chunk]
        mine.add_(owned[start // n:start // n + chunk], alpha=scale)
    return folded


def layout_salt(rank: int, quantized: list[str]) -> int:
    """Seed of a layout's stochastic rounding: from the rank and the parameters it quantizes, not DDP's
    bucket index, so it stays the same when DDP rebuilds its buckets or a run resumes.

        >>> layout_salt(0, ["0.weight"]) == layout_salt(0, ["0.weight"]) != layout_salt(1, ["0.weight"])
        True
    """
    digest = hashlib.blake2b("/".join(quantized).encode(), digest_size=4).digest()
    return exchange_salt(rank, int.from_bytes(digest, "little"))


class _Layout:
    """One DDP bucket layout: which parameters are quantized and which go in full precision, with the
    staging buffers and the exchange that are reused at every call."""

    def __init__(self, state: "ByteGradHookState", names: list[str], grads: list[torch.Tensor]):
        self.names = names
        full = [state.full_precision_1d and g.dim() <= 1 for g in grads]
        self.quantized = [i for i, f in enumerate(full) if not f]
        self.full = [i for i, f in enumerate(full) if f]
        device = grads[0].device
        q_numel = sum(grads[i].numel() for i in self.quantized)
        unit = state.comm.size * state.block_size
        self.q_numel = q_numel
        self.q_stage = torch.zeros(-(-q_numel // unit) * unit, dtype=torch.float32, device=device)
        self.f_stage = torch.zeros(sum(grads[i].numel() for i in self.full), dtype=torch.float32, device=device)
        self.exchange = ByteGradExchange(state.block_size, state.piece_size_mb, state.error_feedback,
                                         state.stochastic_rounding, layout_salt(state.comm.rank, self.q_names()))

    def q_names(self) -> list[str]:
        return [self.names[i] for i in self.quantized]

    def run(self, grads: list[torch.Tensor], comm: Comm) -> None:
        """Average the bucket's gradients in place: 1-D ones in fp32, the rest through the exchange."""
        _pack(self.f_stage, [grads[i] for i in self.full])
        _pack(self.q_stage, [grads[i] for i in self.quantized])
        self.q_stage[self.q_numel:].zero_()  # padding must not widen a block's min/max
        if self.f_stage.numel():
            comm.allreduce_mean_(self.f_stage)
        if self.q_numel:
            self.exchange.average_(self.q_stage, comm)
        _unpack(self.f_stage, [grads[i] for i in self.full])
        _unpack(self.q_stage, [grads[i] for i in self.quantized])


def _pack(stage: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        stage[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()


def _unpack(stage: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(stage[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class ByteGradHookState:
    """The state of `bytegrad_hook` for one DDP model: its options, its process group, the staging
    buffers and error-feedback residuals of each bucket layout.

    Args:
        model: the `DistributedDataParallel` model (or its module): parameter names key the saved state.
        process_group: DDP's group (default: the world). The state makes its own group over the same
            ranks, with `timeout_s`: constructing it is collective (every rank, the same order).
        block_size, piece_size_mb, error_feedback, stochastic_rounding, full_precision_1d: as the
            `bytegrad` algorithm's options (`thinkscale.relax.algorithms.ByteGrad`).
        timeout_s: the limit of every collective of the hook.
    """

    def __init__(self, model: nn.Module, process_group: dist.ProcessGroup | None = None, *,
                 block_size: int = 1024, piece_size_mb: float = 4.0, error_feedback: bool = False,
                 stochastic_rounding: bool = False, full_precision_1d: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        check_quantization_options(block_size, piece_size_mb)
        self.names = _parameter_names(model)
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.shapes = {name: p.shape for name, p in module.named_parameters()}
        self.block_size, self.piece_size_mb = block_size, piece_size_mb
        self.error_feedback, self.stochastic_rounding = bool(error_feedback), bool(stochastic_rounding)
        self.full_precision_1d = bool(full_precision_1d)
        self.timeout_s = float(timeout_s)
        self.comm = _own_group(process_group, self.timeout_s)
        self.layouts: dict[tuple[str, ...], _Layout] = {}
        self.residuals: dict[str, torch.Tensor] = {}  # per parameter, waiting for a layout to take them
        self._released: dict[tuple[str, ...], dict] = {}  # layouts DDP dropped or a checkpoint holds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relax-ddp-hook")

    def options(self) -> dict:
        return {"block_size": self.block_size, "piece_size_mb": self.piece_size_mb,
                "error_feedback": self.error_feedback, "stochastic_rounding": self.stochastic_rounding,
                "full_precision_1d": self.full_precision_1d}

    # ----- the hook's work ------------------------------------------------------------------------------
    def launch(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, grads, params, index = bucket.buffer(), bucket.gradients(), bucket.parameters(), bucket.index()
        try:
            names = [self.names[id(p)] for p in params]
        except KeyError:
            raise RuntimeError("bytegrad_hook: a bucket holds a parameter the state's model does not have; "
                               "build ByteGradHookState from the DDP model the hook is registered on") from None

        def work() -> torch.Tensor:
            self._layout_for(names, grads).run(grads, self.comm)
            return buffer

        if buffer.is_cuda:  # kernels and NCCL calls queue on streams: running here does not block the host
            future = torch.futures.Future(devices=[buffer.device])
            future.set_result(work())
            return future
        return self._in_background(work, index)

    def _in_background(self, work, index: int) -> torch.futures.Future:
        future = torch.futures.Future()

        def run() -> None:
            try:
                future.set_result(work())
            except Exception as exc:  # noqa: BLE001 - every failure goes to DDP through the future
                future.set_exception(CommunicationError(
                    f"bytegrad_hook, bucket {index}: {type(exc).__name__}: {exc} (a peer rank may have died "
                    f"or stopped calling in; collectives time out after {self.timeout_s:.0f} s)"))

        self._pool.submit(run)
        return future

    def _layout_for(self, names: list[str], grads: list[torch.Tensor]) -> _Layout:
        """The layout of this bucket, made on first sight. Known layouts that share parameters with it
        are released (DDP changed its buckets). A released layout whose quantized parameters come back
        in the same order resumes exactly (the rebuild often keeps the order; a checkpoint's layouts are
        released ones); the others fold their residuals into per-parameter ones, which the new layout
        takes up."""
        key = tuple(names)
        layout = self.layouts.get(key)
        if layout is not None:
            return layout
        for old_key in [k for k in self.layouts if set(k) & set(names)]:
            old = self.layouts.pop(old_key)
            self._released[tuple(old.q_names())] = old.exchange.state_dict()
        layout = _Layout(self, names, grads)
        q_key = tuple(layout.q_names())
        saved = self._released.pop(q_key, None)
        if saved is not None:
            layout.exchange.load_state_dict(saved)
        else:
            for old_key in [k for k in self._released if set(k) & set(q_key)]:
                self._fold(old_key, self._released.pop(old_key))
            sent = self._take(layout.q_names(), layout.q_stage) if self.error_feedback else None
            if sent is not None:
                owned = torch.zeros(sent.numel() // self.comm.size, dtype=torch.float32, device=sent.device)
                layout.exchange.load_state_dict({"calls": 0, "residual_sent": sent, "residual_owned": owned})
        self.layouts[key] = layout
        return layout

    def _fold(self, q_names: tuple[str, ...], exchange_state: dict) -> None:
        """One released layout's residuals (its exchange's state_dict) into per-parameter ones."""
        sent, owned = exchange_state.get("residual_sent"), exchange_state.get("residual_owned")
        if sent is None or owned is None:
            return
        folded = fold_residuals(sent, owned, self.comm.size, self.comm.rank, self.block_size,
                                int(self.piece_size_mb * 2**20) // 4)
        offset = 0
        for name in q_names:
            shape = self.shapes[name]
            part = folded[offset:offset + shape.numel()].view(shape)
            self.residuals[name] = self.residuals[name] + part if name in self.residuals else part.clone()
            offset += shape.numel()

    def _take(self, names: list[str], like: torch.Tensor) -> torch.Tensor | None:
        """A layout's sent residual built from the per-parameter ones it covers (taken out of the store)."""
        if not any(name in self.residuals for name in names):
            return None
        sent, offset = torch.zeros_like(like), 0
        for name in names:
            numel = self.shapes[name].numel()
            if name in self.residuals:
                sent[offset:offset + numel] = self.residuals.pop(name).to(sent.device).reshape(-1)
            offset += numel
        return sent

    # ----- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: each layout's exchange (calls, residuals), keyed by its quantized parameters
        in order, and the per-parameter residuals not yet taken up. Call between iterations."""
        layouts = {tuple(layout.q_names()): layout.exchange.state_dict() for layout in self.layouts.values()}
        layouts.update({key: saved for key, saved in self._released.items() if key not in layouts})
        return {
            "version": STATE_VERSION, "rank": self.comm.rank, "world_size": self.comm.size,
            "options": self.options(),
            "layouts": [{"quantized": list(key), "exchange": exchange} for key, exchange in layouts.items()],
            "residuals": dict(self.residuals),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved, before the first iteration that should use it. Residuals saved
        by another rank or world size are dropped with a warning: they belong to that rank."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise ValueError(f"not a ByteGradHookState state_dict of version {STATE_VERSION} "
                             f"(got a {type(state).__name__}, version {version!r})")
        if state.get("options") != self.options():
            raise ValueError(f"the saved hook state has options {state.get('options')}; this state has "
                             f"{self.options()}")
        unknown = [name for name in state.get("residuals", {}) if name not in self.shapes]
        unknown += [name for entry in state.get("layouts", []) for name in entry["quantized"]
                    if name not in self.shapes]
        if unknown:
            raise ValueError(f"the saved hook state names parameters this model does not have: {unknown[:3]}")
        self.layouts.clear()
        self.residuals, self._released = {}, {}
        if (state.get("rank"), state.get("world_size")) != (self.comm.rank, self.comm.size):
            if self.error_feedback:
                logger.warning("bytegrad_hook: error-feedback residuals were saved by rank %s of %s; this is rank "
                               "%d of %d: starting them at zero", state.get("rank"), state.get("world_size"),
                               self.comm.rank, self.comm.size)
            return
        self.residuals = {name: t.clone() for name, t in state.get("residuals", {}).items()}
        self._released = {tuple(entry["quantized"]): entry["exchange"] for entry in state.get("layouts", [])}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def bytegrad_hook(state: ByteGradHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged through ByteGrad's 8-bit exchange (see the module
    docstring). `ddp.register_comm_hook(ByteGradHookState(ddp), bytegrad_hook)`."""
    return state.launch(bucket)


class Wire16HookState:
    """The state of `wire16_hook`: the 16-bit dtype, its own process group and one message buffer per
    bucket layout (allocated once, where DDP's compress hooks allocate one per call).

    Args:
        process_group: DDP's group (default: the world); the state makes its own over the same ranks
            (collective: every rank, the same order), with `timeout_s`.
        wire_dtype: "bf16" (default: fp32's range, no overflow) or "fp16".
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, wire_dtype: str = "bf16",
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.wire_dtype = wire_dtype
        self.timeout_s = float(timeout_s)
        self.comm = _own_group(process_group, self.timeout_s)
        self.messages: dict[tuple, torch.Tensor] = {}

    def message_for(self, buffer: torch.Tensor) -> torch.Tensor:
        key = (buffer.numel(), buffer.device)
        if key not in self.messages:
            self.messages[key] = torch.empty(buffer.numel(), dtype=WIRE_DTYPES[self.wire_dtype], device=buffer.device)
        return self.messages[key]

    def state_dict(self) -> dict:
        return {"wire_dtype": self.wire_dtype}  # nothing accumulates: the options, for the record

    def load_state_dict(self, state: dict) -> None:
        if state.get("wire_dtype") != self.wire_dtype:
            raise ValueError(f"the saved hook state has wire_dtype {state.get('wire_dtype')!r}, this state "
                             f"{self.wire_dtype!r}")


def wire16_hook(state: Wire16HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket cast to the 16-bit dtype, divided by the number of ranks there (so an
    fp16 sum cannot overflow), summed over the ranks and cast back: the arithmetic of DDP's
    `fp16_compress_hook` / `bf16_compress_hook`, and of `DataParallel(algorithm="gradient_allreduce",
    wire_dtype=...)`, on gloo too."""
    buffer = bucket.buffer()
    message = state.message_for(buffer)
    message.copy_(buffer.view(-1)).div_(state.comm.size)
    future = dist.all_reduce(message, group=state.comm.group, async_op=True).get_future()

    def unpack(done: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(done.value()[0].view_as(buffer))
        return buffer

    return future.then(unpack)

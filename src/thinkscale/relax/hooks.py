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
  arrived). The exchange needs a length divisible by ranks x block: it runs in place on the longest
  prefix of DDP's buffer that divides, and on the rest (less than ranks x block elements) copied into a
  zero-padded buffer allocated once, so the blocks are those of a padded bucket without copying the
  gradients. 1-D parameters (full precision) are staged out and zeroed in the buffer for the 8-bit
  exchange (so they never widen a block's min/max); those of every bucket are averaged in one fp32
  allreduce with the last bucket (DDP waits for all buckets at the end of backward anyway; one small
  allreduce per bucket cost SmolLM2's ~50 buckets ~8 % of a step) and written back. A bucket of another
  dtype than fp32 is averaged in an fp32 copy.
- Error-feedback residuals are kept per bucket layout. When DDP changes its layout (the rebuild, or a
  resumed run's first iterations), the residuals of the old layout are folded into per-parameter
  residuals - the owner's part scaled by the number of ranks, which adds the same amount to the next
  average - and the new layout takes them up. `state_dict()` / `load_state_dict()` carry both, keyed by
  parameter names, so a checkpoint survives a rebuild and a restart; they belong to the rank that saved
  them (save one file per rank).
- On CPU the exchange runs on one background thread per state, in bucket order (the same on every
  rank), so it overlaps the rest of backward; on CUDA it runs in the hook (1-D parameters per bucket), its kernels and NCCL
  collectives queued on streams (not yet run on a GPU).
- The state makes its own process group (with a timeout) over the DDP group's ranks (the whole world;
  subgroups are refused), so the hook's collectives never interleave with DDP's or the user's; a dead
  peer fails the step with `CommunicationError` once the timeout passes, and the buckets queued behind a
  failure fail at once, without a collective.

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

from .algorithms.bytegrad import (ByteGradExchange, check_quantization_options, exchange_salt, fp32_elements,
                                  piece_ranges)
from .comm import Comm, CommunicationError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STATE_VERSION = 1


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose parameter names key the saved state (DDP's "module." dropped)."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(module, nn.Module):
        raise TypeError(f"the hook state needs the model (DDP or its module), got {type(model).__name__}")
    return module


def _own_group(process_group: dist.ProcessGroup | None, timeout_s: float) -> Comm:
    """A group over `process_group`'s ranks, with its own timeout (collective: every rank, same order)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a DDP comm hook state needs an initialized process group (dist.init_process_group)")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
    if len(ranks) != dist.get_world_size():
        # new_group must be called by every rank of the world with the same ranks: ranks of different
        # DDP subgroups would each pass their own and wait for each other until the timeout
        raise ValueError(f"a hook state over a subgroup ({len(ranks)} of {dist.get_world_size()} ranks) is not "
                         "supported: the state makes its own group over DDP's ranks, which needs the whole world")
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
    """One DDP bucket layout and what is reused at every call: the exchange of the bucket's longest prefix
    that divides into ranks x block (run in place, on DDP's own buffer: no copy of the gradients), the
    exchange of the rest (staged and padded with zeros, as relax pads its buckets), and the staging of
    the 1-D parameters averaged in full precision (their slots in the buffer are zeroed before the 8-bit
    exchange, so they never widen a block's min/max, and written back after)."""

    def __init__(self, state: "ByteGradHookState", names: list[str], device: torch.device):
        self.names = names
        self.numels, self.full, self.prefix, tail = state.geometry(names)
        self.offsets = [sum(self.numels[:i]) for i in range(len(names))]
        self.numel = sum(self.numels)
        self.tail = torch.zeros(tail, dtype=torch.float32, device=device)
        self.f_stage = torch.zeros(sum(self.numels[i] for i in self.full), dtype=torch.float32, device=device)
        self.work: torch.Tensor | None = None  # fp32 copy of a bucket of another dtype, made on first use
        self.exchanges = [ByteGradExchange(state.block_size, state.piece_size_mb, state.error_feedback,
                                           state.stochastic_rounding, layout_salt(state.comm.rank, names + [part]))
                          for part in ("prefix", "tail")]

    def slot(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i]:self.offsets[i] + self.numels[i]]

    def run(self, buffer: torch.Tensor, comm: Comm) -> None:
        """Average the bucket's buffer in place: 1-D parameters in fp32, the rest through the exchanges."""
        flat = self.exchange(buffer, comm)
        if self.full:
            comm.allreduce_mean_(self.f_stage)
        self.finish(buffer, flat, self.f_stage)

    def exchange(self, buffer: torch.Tensor, comm: Comm) -> torch.Tensor:
        """The 8-bit part: the 1-D parameters staged out into `f_stage` (their slots zeroed), the rest
        averaged in place. Returns the fp32 values being worked on (the buffer itself when it is fp32)."""
        if buffer.numel() != self.numel:
            raise RuntimeError(f"DDP's bucket holds {buffer.numel()} elements, its gradients {self.numel}")
        flat = buffer.view(-1)
        if buffer.dtype != torch.float32:
            if self.work is None:
                self.work = torch.empty(self.numel, dtype=torch.float32, device=flat.device)
            flat = self.work.copy_(flat)
        offset = 0
        for i in self.full:
            self.f_stage[offset:offset + self.numels[i]].copy_(self.slot(flat, i))
            self.slot(flat, i).zero_()  # must not widen a block's min/max
            offset += self.numels[i]
        if self.prefix:
            self.exchanges[0].average_(flat[:self.prefix], comm)
        if self.tail.numel():
            rest = flat[self.prefix:]
            self.tail[:rest.numel()].copy_(rest)
            self.tail[rest.numel():].zero_()
            self.exchanges[1].average_(self.tail, comm)
            rest.copy_(self.tail[:rest.numel()])
        return flat

    def finish(self, buffer: torch.Tensor, flat: torch.Tensor, full_averaged: torch.Tensor) -> None:
        """Write the averaged 1-D parameters into their slots, and the fp32 values back into the buffer."""
        offset = 0
        for i in self.full:
            self.slot(flat, i).copy_(full_averaged[offset:offset + self.numels[i]])
            offset += self.numels[i]
        if buffer.dtype != torch.float32:
            buffer.view(-1).copy_(flat)

    def state_dict(self) -> dict:
        return {"names": list(self.names), "exchanges": [ex.state_dict() for ex in self.exchanges]}

    def load_state_dict(self, state: dict) -> None:
        device = self.tail.device
        for exchange, saved in zip(self.exchanges, state["exchanges"]):
            exchange.load_state_dict({key: value.to(device) if isinstance(value, torch.Tensor) else value
                                      for key, value in saved.items()})


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
        named = list(_unwrapped(model).named_parameters())
        self.names = {id(p): name for name, p in named}
        self.shapes = {name: p.shape for name, p in named}
        self.block_size, self.piece_size_mb = block_size, piece_size_mb
        self.error_feedback, self.stochastic_rounding = bool(error_feedback), bool(stochastic_rounding)
        self.full_precision_1d = bool(full_precision_1d)
        self.timeout_s = float(timeout_s)
        self.comm = _own_group(process_group, self.timeout_s)
        self.layouts: dict[tuple[str, ...], _Layout] = {}
        self.residuals: dict[str, torch.Tensor] = {}  # per parameter, waiting for a layout to take them
        self._released: dict[tuple[str, ...], dict] = {}  # layouts' state_dicts: DDP dropped them or a checkpoint holds them
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relax-ddp-hook")
        self.failed: str | None = None  # the first failure: every later bucket fails at once, no collective
        self._waiting: list[tuple] = []  # this iteration's buckets until the last: (layout, buffer, fp32 values, future)

    def options(self) -> dict:
        return {"block_size": self.block_size, "piece_size_mb": self.piece_size_mb,
                "error_feedback": self.error_feedback, "stochastic_rounding": self.stochastic_rounding,
                "full_precision_1d": self.full_precision_1d}

    def geometry(self, names: list[str]) -> tuple[list[int], list[int], int, int]:
        """(numel of each parameter, indices of those averaged in full precision, length of the in-place
        prefix, length of the padded tail) of a bucket holding `names` in this order."""
        numels = [self.shapes[name].numel() for name in names]
        full = [i for i, name in enumerate(names) if self.full_precision_1d and len(self.shapes[name]) <= 1]
        if len(full) == len(names):
            return numels, full, 0, 0
        unit, numel = self.comm.size * self.block_size, sum(numels)
        prefix = numel // unit * unit
        return numels, full, prefix, unit if numel > prefix else 0

    # ----- the hook's work ------------------------------------------------------------------------------
    def launch(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, params, index, last = bucket.buffer(), bucket.parameters(), bucket.index(), bucket.is_last()
        try:
            names = [self.names[id(p)] for p in params]
        except KeyError:
            raise RuntimeError("bytegrad_hook: a bucket holds a parameter the state's model does not have; "
                               "build ByteGradHookState from the DDP model the hook is registered on") from None
        if buffer.is_cuda:  # kernels and NCCL calls queue on streams: running here does not block the host
            future = torch.futures.Future(devices=[buffer.device])
            try:
                self._layout_for(names, buffer.device).run(buffer, self.comm)
                future.set_result(buffer)
            except Exception as exc:  # noqa: BLE001 - to DDP through the future, as on CPU
                future.set_exception(CommunicationError(f"bytegrad_hook, bucket {index} failed: {exc}"))
            return future
        future = torch.futures.Future()
        self._pool.submit(self._run, names, buffer, future, index, last)
        return future

    def _run(self, names: list[str], buffer: torch.Tensor, future: torch.futures.Future, index: int,
             last: bool) -> None:
        """On the hook's thread, bucket by bucket in DDP's order: the 8-bit exchange now; the 1-D parameters
        of every bucket in one fp32 allreduce with the last bucket (DDP waits for every bucket at the end of
        backward anyway, and ~50 small allreduces cost a large model several percent), then every future."""
        if self.failed is not None:  # the buckets queued behind a failure run no collective
            future.set_exception(CommunicationError(
                f"bytegrad_hook, bucket {index}: not run, an earlier exchange failed ({self.failed}); "
                "save what you need and restart the job"))
            return
        try:
            layout = self._layout_for(names, buffer.device)
            self._waiting.append((layout, buffer, layout.exchange(buffer, self.comm), future))
            if last:
                self._finish_waiting()
        except Exception as exc:  # noqa: BLE001 - every failure goes to DDP through the futures
            self.failed = f"{type(exc).__name__}: {exc}"
            error = CommunicationError(f"bytegrad_hook, bucket {index} failed: {self.failed} (if a peer rank died "
                                       f"or stopped calling in, its collectives time out after {self.timeout_s:.0f} s)")
            waiting, self._waiting = self._waiting, []
            for pending in [f for *_, f in waiting] + [future]:  # `future` may be among them: done once
                if not pending.done():
                    pending.set_exception(error)

    def _finish_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        stages = [layout.f_stage for layout, *_ in waiting]
        joined = torch.cat(stages) if len(stages) > 1 else stages[0]
        if joined.numel():
            self.comm.allreduce_mean_(joined)
        offset = 0
        for layout, buffer, flat, _ in waiting:
            layout.finish(buffer, flat, joined[offset:offset + layout.f_stage.numel()])
            offset += layout.f_stage.numel()
        for _, buffer, _, future in waiting:
            future.set_result(buffer)

    def _layout_for(self, names: list[str], device: torch.device) -> _Layout:
        """The layout of this bucket, made on first sight. Known layouts that share parameters with it
        are released (DDP changed its buckets). A released layout that comes back with the same
        parameters in the same order resumes exactly (a checkpoint's layouts are released ones); the
        others fold their residuals into per-parameter ones, which the new layout takes up."""
        key = tuple(names)
        layout = self.layouts.get(key)
        if layout is not None:
            return layout
        for old_key in [k for k in self.layouts if set(k) & set(names)]:
            self._released[old_key] = self.layouts.pop(old_key).state_dict()
        layout = _Layout(self, names, device)
        saved = self._released.pop(key, None)
        if saved is not None:
            layout.load_state_dict(saved)
        elif self.error_feedback:
            for old_key in [k for k in self._released if set(k) & set(key)]:
                self._fold(self._released.pop(old_key))
            self._take(layout)
        self.layouts[key] = layout
        return layout

    def _fold(self, layout_state: dict) -> None:
        """One released layout's residuals into per-parameter ones."""
        names = layout_state["names"]
        numels, full, prefix, tail = self.geometry(names)
        block, piece = self.block_size, fp32_elements(self.piece_size_mb)
        parts = []
        for saved, length in zip(layout_state["exchanges"], (prefix, tail)):
            sent, owned = saved.get("residual_sent"), saved.get("residual_owned")
            if sent is None or owned is None or sent.numel() != length:
                parts.append(torch.zeros(length))
            else:
                parts.append(fold_residuals(sent.cpu(), owned.cpu(), self.comm.size, self.comm.rank, block, piece))
        folded, offset = torch.cat(parts), 0
        for i, (name, numel) in enumerate(zip(names, numels)):
            if i not in full:
                part = folded[offset:offset + numel].view(self.shapes[name])
                self.residuals[name] = self.residuals[name] + part if name in self.residuals else part.clone()
            offset += numel

    def _take(self, layout: _Layout) -> None:
        """Start a new layout's residuals from the per-parameter ones it covers (taken out of the store)."""
        if not any(name in self.residuals for name in layout.names):
            return
        sent = torch.zeros(layout.prefix + layout.tail.numel())
        for i, name in enumerate(layout.names):
            if name in self.residuals:
                layout.slot(sent, i).copy_(self.residuals.pop(name).reshape(-1))
        device = layout.tail.device
        for exchange, part in zip(layout.exchanges, (sent[:layout.prefix], sent[layout.prefix:])):
            if part.numel():
                exchange.load_state_dict({"calls": 0, "residual_sent": part.to(device),
                                          "residual_owned": torch.zeros(part.numel() // self.comm.size, device=device)})

    # ----- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: each layout's exchanges (calls, residuals) with its parameter names in
        order, and the per-parameter residuals not yet taken up. Call between iterations."""
        layouts = {key: layout.state_dict() for key, layout in self.layouts.items()}
        layouts.update({key: saved for key, saved in self._released.items() if key not in layouts})
        return {"version": STATE_VERSION, "rank": self.comm.rank, "world_size": self.comm.size,
                "options": self.options(), "layouts": list(layouts.values()), "residuals": dict(self.residuals)}

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
        wrong = [name for name, t in state.get("residuals", {}).items()
                 if name in self.shapes and t.numel() != self.shapes[name].numel()]
        if wrong:
            raise ValueError(f"the saved hook state has residuals of another size than the parameters: {wrong[:3]}")
        unknown = [name for name in state.get("residuals", {}) if name not in self.shapes]
        unknown += [name for entry in state.get("layouts", []) for name in entry["names"] if name not in self.shapes]
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
        self._released = {tuple(entry["names"]): entry for entry in state.get("layouts", [])}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def bytegrad_hook(state: ByteGradHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged through ByteGrad's 8-bit exchange (see the module
    docstring). `ddp.register_comm_hook(ByteGradHookState(ddp), bytegrad_hook)`."""
    return state.launch(bucket)


class Wire16HookState:
    """The state of `wire16_hook`: the 16-bit dtype, its own process group and one message buffer per
    bucket (allocated once, where DDP's compress hooks allocate one per call).

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

    def message_for(self, index: int, buffer: torch.Tensor) -> torch.Tensor:
        """The message of bucket `index` (buckets are in flight together: one buffer each; a bucket that
        changes size - DDP's rebuild - gets a new one in place of the old)."""
        key = (index, buffer.device)
        if key not in self.messages or self.messages[key].numel() != buffer.numel():
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
    message = state.message_for(bucket.index(), buffer)
    message.copy_(buffer.view(-1)).div_(state.comm.size)
    future = dist.all_reduce(message, group=state.comm.group, async_op=True).get_future()

    def unpack(done: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(done.value()[0].view_as(buffer))
        return buffer

    return future.then(unpack)

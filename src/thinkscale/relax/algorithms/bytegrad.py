"""ByteGrad: gradient averaging with 8-bit MinMaxUInt8 codes on the wire.

A buffer of length L (a gradient bucket, padded to a multiple of n * block) is cut into pieces of at
most `piece_size_mb`; piece k is split into n chunks, chunk r owned by rank r, and every chunk into
blocks of `block_size` elements, each quantized with its own (min, max). Per piece:
 1. quantize the piece (one fused pass) into one message per destination: the chunk's (min, max)
    pairs, then its codes, so one all-to-all moves both: rank r receives chunk r from every rank;
 2. one fused pass decodes those n versions, sums them in rank order, divides by n (average) and
    quantizes the result again, with fresh (min, max) per block;
 3. one all-gather of the re-quantized chunks;
 4. one fused pass decodes every chunk, its own too, straight into the buffer, so all ranks end
    bit-identical.
The pieces are pipelined with asynchronous collectives: while piece k is on the wire, piece k + 1 is
quantized and piece k - 1 decoded. Messages live in buffers allocated once per buffer length.
About 2 bytes per element cross the wire per rank (plus 8 per block), against 8 for an fp32 ring
allreduce.

Quality options:
- `block_size`: elements per (min, max). Fixed, so the error of an element does not grow with the
  bucket or shrink with the world size (the source system used one min/max per rank chunk: with 2 ranks,
  one scale for millions of elements spanning embeddings, norms and matrices). The default 1024 costs
  8 bytes per 1024 codes (0.8 %).
- `error_feedback`: what quantization dropped is kept per rank and added to the next step's values
  (both quantizations: the sender's and the chunk owner's), so the error does not accumulate over
  steps. Kept in `state_dict()`.
- `stochastic_rounding`: unbiased rounding (see quantize.py), salted per step, rank and piece.
- `full_precision_1d`: 1-D parameters (biases, norm weights) get buckets of their own that are
  averaged in full precision: few bytes, and the ones quantization hurts most.
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque
from dataclasses import dataclass

import torch

from ..comm import NO_PROFILE, Comm, Profiler, allreduce_mean, allreduce_sum
from ..quantize import MINMAX_BYTES, decode_blocks_, quantize_blocks_, reduce_requantize_
from .base import Algorithm, AlgorithmImpl

logger = logging.getLogger(__name__)


def check_quantization_options(block_size: int, piece_size_mb: float) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 8 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size!r}")
    if not piece_size_mb > 0:
        raise ValueError(f"piece_size_mb must be > 0, got {piece_size_mb!r}")


def fp32_elements(megabytes: float) -> int:
    """How many fp32 elements `megabytes` MiB hold (a piece's size, from `piece_size_mb`)."""
    return int(megabytes * 2**20) // 4


def piece_ranges(numel: int, n: int, block: int, piece_numel: int) -> list[tuple[int, int]]:
    """(start, length) of consecutive pieces covering `numel` (a multiple of n * block); every length
    is a multiple of n * block, all but the last `piece_numel` rounded down to one (at least one unit)."""
    unit = n * block
    if numel % unit:
        raise ValueError(f"buffer of {numel} elements is not a multiple of {n} ranks x {block} elements")
    step = max(unit, piece_numel // unit * unit)
    return [(start, min(step, numel - start)) for start in range(0, numel, step)]


class _Message:
    """One piece's wire buffers: uint8 rows [(min, max) of R blocks | R * B codes], with typed views."""

    def __init__(self, rows: int, blocks: int, block: int, device):
        self.raw = torch.empty(rows, blocks * (MINMAX_BYTES + block), dtype=torch.uint8, device=device)
        header = blocks * MINMAX_BYTES
        self.minmax = self.raw[:, :header].view(torch.float32).view(rows, blocks, 2)
        self.codes = self.raw[:, header:].view(rows, blocks, block)


class _Piece:
    """Preallocated buffers of one piece: what is sent and received in each of the two collectives."""

    def __init__(self, index: int, start: int, length: int, n: int, block: int, device):
        self.index, self.start, self.length = index, start, length
        blocks = length // (n * block)  # per chunk
        self.to_owners, self.from_ranks = _Message(n, blocks, block, device), _Message(n, blocks, block, device)
        self.reduced, self.gathered = _Message(1, blocks, block, device), _Message(n, blocks, block, device)


class ByteGradExchange:
    """8-bit averaging of one buffer over a group, with its preallocated pieces and residuals.

    Rank-local state: the error-feedback residuals (what this rank's quantizations dropped)."""

    def __init__(self, block_size: int = 1024, piece_size_mb: float = 4.0, error_feedback: bool = False,
                 stochastic_rounding: bool = False, salt: int = 0):
        check_quantization_options(block_size, piece_size_mb)
        self.block = block_size
        self.piece_numel = fp32_elements(piece_size_mb)
        self.error_feedback = error_feedback
        self.stochastic_rounding = stochastic_rounding
        self.salt = salt
        self.calls = 0
        self._pieces: list[_Piece] = []
        self._layout: tuple | None = None
        self.residual_sent: torch.Tensor | None = None  # (numel,), values x as this rank sends them
        self.residual_owned: torch.Tensor | None = None  # (numel / n,), this rank's chunks after the mean
        self.profiler: Profiler = NO_PROFILE  # the engine's (DataParallel.profile), set by the runtime

    def average_(self, t: torch.Tensor, comm: Comm, average: bool = True) -> None:
        """Replace 1-D `t` (length a multiple of comm.size * block_size) in place by the quantized mean
        (or sum) over the group's ranks. Collective: every rank calls it with the same length."""
        n = comm.size
        if n == 1:
            return  # one participant: its values are the mean
        self._prepare(t, n)
        self.calls += 1
        to_reduce, to_decode = deque(), deque()
        for piece in self._pieces:
            self._quantize(t, piece, n)
            to_reduce.append((piece, comm.all_to_all_async(piece.from_ranks.raw, piece.to_owners.raw)))
            if len(to_reduce) > 1:  # the previous piece's chunks are on their way: reduce, gather
                to_decode.append(self._reduce_and_gather(*to_reduce.popleft(), comm, average))
            if len(to_decode) > 1:
                self._decode(t, *to_decode.popleft(), n)
        while to_reduce:
            to_decode.append(self._reduce_and_gather(*to_reduce.popleft(), comm, average))
        while to_decode:
            self._decode(t, *to_decode.popleft(), n)

    def warm_up(self, n: int, numel: int | None = None, average: bool = True) -> None:
        """Run the three passes, without communication, on `numel` zeros as a group of `n` would:
        compiles their kernels (seconds, once per process) before a timed or latency-critical step.
        The default is a full piece and a short one of 7 blocks per rank. Both are needed: the compiler
        specialises on sizes that agree by chance (a 4 MB piece of 2 ranks has 512 blocks per rank,
        1024 (min, max) values, as many as a block has codes) and compiles again for a size that does
        not."""
        unit = n * self.block
        numel = max(unit, self.piece_numel // unit * unit) + 7 * unit if numel is None else numel
        t = torch.zeros(max(unit, numel // unit * unit))
        saved = (self._pieces, self._layout, self.residual_sent, self.residual_owned, self.calls)
        self._layout = None
        self._prepare(t, n)
        for piece in self._pieces:
            self._quantize(t, piece, n)
            piece.from_ranks.raw.copy_(piece.to_owners.raw)
            self._reduce(piece, n, average)
            piece.gathered.raw.copy_(piece.reduced.raw.expand(n, -1))
            self._decode(t, piece, _Done(), n)
        self._pieces, self._layout, self.residual_sent, self.residual_owned, self.calls = saved

    # ----- the three passes -------------------------------------------------------------------------
    def _quantize(self, t: torch.Tensor, piece: _Piece, n: int) -> None:
        values = t[piece.start:piece.start + piece.length].view(n, -1, self.block)
        residual = None
        if self.residual_sent is not None:
            residual = self.residual_sent[piece.start:piece.start + piece.length].view(values.shape)
        with self.profiler.phase("quantize_blocks"):
            quantize_blocks_(values, piece.to_owners.minmax, piece.to_owners.codes, residual,
                             self._salt_for(piece.index, 0), whole_numel=t.numel())

    def _reduce_and_gather(self, piece: _Piece, arrived, comm: Comm, average: bool):
        with self.profiler.phase("wait_all_to_all"):
            arrived.wait()
        self._reduce(piece, comm.size, average)
        return piece, comm.all_gather_async(piece.gathered.raw, piece.reduced.raw)

    def _reduce(self, piece: _Piece, n: int, average: bool) -> None:
        residual = None
        if self.residual_owned is not None:
            start = piece.start // n
            residual = self.residual_owned[start:start + piece.length // n].view(piece.reduced.codes.shape)
        with self.profiler.phase("reduce_requantize"):
            reduce_requantize_(piece.from_ranks.minmax, piece.from_ranks.codes, piece.reduced.minmax,
                               piece.reduced.codes, average, residual, self._salt_for(piece.index, 1),
                               whole_numel=self._layout[0])

    def _decode(self, t: torch.Tensor, piece: _Piece, gathered, n: int) -> None:
        with self.profiler.phase("wait_all_gather"):
            gathered.wait()
        out = t[piece.start:piece.start + piece.length].view(n, -1, self.block)
        with self.profiler.phase("decode_blocks"):
            decode_blocks_(piece.gathered.minmax, piece.gathered.codes, out, whole_numel=t.numel())

    # ----- buffers and state --------------------------------------------------------------------------
    def _prepare(self, t: torch.Tensor, n: int) -> None:
        """(Re)allocate the pieces and residuals for this length and group size."""
        layout = (t.numel(), n, t.device)
        if layout == self._layout:
            return
        self._pieces = [_Piece(index, start, length, n, self.block, t.device) for index, (start, length)
                        in enumerate(piece_ranges(t.numel(), n, self.block, self.piece_numel))]
        if self.error_feedback:
            keep = (self.residual_sent is not None and self.residual_sent.numel() == t.numel()
                    and self.residual_owned.numel() == t.numel() // n)
            if not keep:
                self.residual_sent = torch.zeros(t.numel(), dtype=torch.float32, device=t.device)
                self.residual_owned = torch.zeros(t.numel() // n, dtype=torch.float32, device=t.device)
        self._layout = layout

    def _salt_for(self, piece: int, stage: int) -> torch.Tensor | None:
        """A fresh salt per call, piece and stage, different on every rank (independent rounding)."""
        if not self.stochastic_rounding:
            return None
        digest = hashlib.blake2b(f"{self.salt}/{self.calls}/{piece}/{stage}".encode(), digest_size=4).digest()
        return torch.tensor(int.from_bytes(digest, "little"), dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"calls": self.calls, "residual_sent": self.residual_sent, "residual_owned": self.residual_owned}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))
        sent, owned = state.get("residual_sent"), state.get("residual_owned")
        if self.error_feedback and sent is not None and owned is not None:
            self.residual_sent, self.residual_owned = sent.clone(), owned.clone()
            self._layout = None  # _prepare keeps them if the length and group size still fit


class _Done:
    """A finished collective (warm-up runs the passes without one)."""

    def wait(self) -> None:
        pass


def exchange_salt(rank: int, index: int) -> int:
    """Seed of a rank's stochastic rounding for buffer `index`: distinct per rank and buffer."""
    return rank * 1_000_003 + index


@dataclass
class ByteGrad(Algorithm):
    """8-bit quantized gradient averaging (pipelined all-to-all + all-gather). `hierarchical` applies only
    with >= 2 nodes of >= 2 processes; intra-node traffic then stays in full precision."""

    name = "bytegrad"
    quantizes = True
    hierarchical: bool = True
    average: bool = True
    block_size: int = 1024
    error_feedback: bool = False
    stochastic_rounding: bool = False
    full_precision_1d: bool = True
    piece_size_mb: float = 4.0

    def __post_init__(self):
        check_quantization_options(self.block_size, self.piece_size_mb)

    def reify(self, engine):
        return _ByteGradImpl(engine, self)

    def bucket_pad_multiple(self, world_size: int) -> int:
        return world_size * self.block_size

    def bucket_kind(self, param: torch.nn.Parameter) -> str:
        return "full precision" if self.full_precision_1d and param.dim() <= 1 else ""


class _ByteGradImpl(AlgorithmImpl):
    def __init__(self, engine, config: ByteGrad):
        super().__init__(engine)
        self.config = config
        self.exchanges = {
            b.index: ByteGradExchange(config.block_size, config.piece_size_mb, config.error_feedback,
                                      config.stochastic_rounding, exchange_salt(engine.rank, b.index))
            for b in engine.buckets if not b.kind}

    def averages_gradients(self):
        return True

    def on_bucket_ready(self, bucket):
        topology, average = self.engine.topology, self.config.average
        if bucket.kind:  # full precision
            return lambda: topology.run(bucket.flat, allreduce_mean if average else allreduce_sum, average)
        exchange = self.exchanges[bucket.index]
        exchange.profiler = self.engine.profiler

        def job():
            bucket.flat[bucket.numel:].zero_()  # padding must not widen a block's min/max
            topology.run(bucket.flat, lambda t, comm: exchange.average_(t, comm, average), average)

        return job

    def state_dict(self) -> dict:
        """Error-feedback residuals (references, as Module.state_dict gives), per bucket; they belong to
        this rank: loaded elsewhere (another rank, world size or bucket layout) they start at zero."""
        return {**self.rank_stamp(), "exchanges": {index: ex.state_dict() for index, ex in self.exchanges.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("exchanges", {})
        same_rank = self.stamped_here(state)
        if self.config.error_feedback and saved and not same_rank:
            logger.warning("bytegrad: error-feedback residuals were saved by rank %s of %s; this is rank %d of "
                           "%d: starting them at zero", state.get("rank"), state.get("world_size"),
                           self.engine.rank, self.engine.world_size)
        for index, exchange in self.exchanges.items():
            mine = saved.get(index)
            if mine is None:
                continue
            residual = mine.get("residual_sent")
            fits = residual is not None and residual.numel() == self.engine.buckets[index].flat.numel()
            exchange.load_state_dict(mine if same_rank and fits else {"calls": mine.get("calls", 0)})


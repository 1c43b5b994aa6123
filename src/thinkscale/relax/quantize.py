"""MinMaxUInt8: the 8-bit quantizer used by ByteGrad, QAdam and low-precision decentralized SGD.

For a chunk t (spec/relax.md):
    scale = 255 / (max(t) - min(t) + eps),  eps = 1e-7
    upper = round(max(t) * scale),  lower = upper - 255
    q     = uint8(min(round(t * scale), upper) - lower)
    t_hat = (float(q) + lower) / scale
Rounding is round-half-to-even (`torch.round`). Only (min, max) travel with each chunk; `lower` and
`scale` are recomputed from them on both sides, so sender and receiver agree bit for bit. Per-element
error is at most (max - min + eps) / 510; the block kernels below can carry it over (error feedback).

Why a compiled path: written as separate eager ops the compress walks memory ~7 times and costs as much
as the network transfer it saves on CPU; `torch.compile` fuses it into one pass with identical bytes.
The compiled path is used for large tensors only (compiling costs seconds once per process), and falls
back to eager if compilation is unavailable.

Blocks (ByteGrad and QAdam): the same quantizer on fixed-size blocks of `block` elements, one (min, max)
per block, so the error of an element depends on its neighbours' range only, never on the world size
or on how many unrelated tensors share a bucket. Three fused passes do all the work of one exchange:
`quantize_blocks_` (gradient -> codes, with optional error feedback and stochastic rounding),
`reduce_requantize_` (n received code blocks -> their mean -> codes) and `decode_blocks_` (codes ->
floats, written straight into the destination). Each writes into buffers the caller preallocated.

Stochastic rounding: q = clamp(floor(t * scale + u), lower, upper) - lower with u uniform in [0, 1), so
E[t_hat] = t. u comes from a counter-based hash of (salt, element index), a pure function: no random
generator state is touched (the user's RNG stream stays as it was) and a test can recompute it.

    >>> import torch
    >>> from thinkscale.relax import quantize
    >>> t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    >>> minmax, q = quantize.compress(t)            # one chunk: (min, max) and 8-bit codes
    >>> q
    tensor([[  0,  64, 127, 255]], dtype=torch.uint8)
    >>> bool((quantize.decompress(minmax, q)[0] - t).abs().max() <= (1.0 + 1e-7) / 510)
    True
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

EPS = 1e-7
LEVELS = 255.0
# Compile only when a tensor is large enough for fusion to pay back the one-off compile time.
COMPILE_MIN_NUMEL = int(os.environ.get("THINKSCALE_COMPILE_QUANTIZER_MIN_NUMEL", 1 << 20))
_COMPILE_ENABLED = os.environ.get("THINKSCALE_COMPILE_QUANTIZER", "1") != "0"


def _scale_and_lower(minmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., chunks, 2) [min, max] -> per-chunk (scale, lower), each (..., chunks, 1)."""
    lo, hi = minmax[..., 0:1], minmax[..., 1:2]
    denom = hi - lo + EPS
    # A true division: `python_float / tensor` would compute reciprocal * 255, one ulp off the formula.
    scale = torch.full_like(denom, LEVELS) / denom
    upper = torch.round(hi * scale)
    return scale, upper - LEVELS


def _compress_eager(t: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = t.reshape(chunks, -1).float()  # (chunks, m)
    minmax = torch.stack([rows.amin(dim=1), rows.amax(dim=1)], dim=1)  # (chunks, 2)
    scale, lower = _scale_and_lower(minmax)
    upper = lower + LEVELS
    q = (torch.minimum(torch.round(rows * scale), upper) - lower).to(torch.uint8)
    return minmax, q


def _decompress_eager(minmax: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    scale, lower = _scale_and_lower(minmax.float())
    return (q.float() + lower) / scale


_compiled: dict[str, object] = {}  # kernel name -> its compiled function, or its eager one after a fallback
_eager_of: dict[str, object] = {}


def _maybe_compiled(name: str, fn, numel: int):
    if not _COMPILE_ENABLED or numel < COMPILE_MIN_NUMEL:
        return fn
    if name not in _compiled:
        _eager_of[name] = fn
        try:
            _compiled[name] = torch.compile(fn, dynamic=True)
        except Exception as exc:  # torch.compile unsupported on this platform
            logger.warning("torch.compile unavailable for the quantizer (%s); using eager ops", exc)
            _compiled[name] = fn
    return _compiled[name]


def run_fused(name: str, fn, numel: int, *args):
    """`fn(*args)`, compiled once per `name` when `numel` is big enough, eager otherwise or after a
    failed compile (the algorithms' fused passes use this too)."""
    compiled = _maybe_compiled(name, fn, numel)
    if compiled is fn:
        return fn(*args)
    try:
        with torch.no_grad():  # one grad mode for every caller: a change of mode would recompile
            return compiled(*args)
    except Exception as exc:  # e.g. no C++ compiler: fall back once, for good
        logger.warning("compiled quantizer failed (%s); falling back to eager ops", exc)
        _compiled[name] = fn
        return fn(*args)


def compress(t: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `t` in `chunks` equal chunks. Returns (minmax (chunks, 2) float32, q (chunks, m) uint8)."""
    if not t.is_floating_point():
        raise TypeError(f"compress expects a floating tensor, got {t.dtype}")
    if chunks < 1 or t.numel() % chunks != 0:
        raise ValueError(f"cannot split {t.numel()} elements into {chunks} equal chunks")
    if t.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    return run_fused("compress", _compress_eager, t.numel(), t, chunks)


def decompress(minmax: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Inverse of `compress`: float32 tensor of q's shape, (chunks, m)."""
    if q.dtype != torch.uint8:
        raise TypeError(f"decompress expects uint8 codes, got {q.dtype}")
    q2 = q.reshape(minmax.shape[0], -1)
    return run_fused("decompress", _decompress_eager, q.numel(), minmax, q2)


def compiled_status() -> dict[str, str]:
    """For each quantizer function used so far in this process: "compiled" or "eager (fallback)".
    Functions only ever called on small tensors (the eager path by design) are not listed."""
    return {name: "eager (fallback)" if fn is _eager_of[name] else "compiled" for name, fn in _compiled.items()}


def compress_eager(t: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference (always uncompiled); `compress` must produce the same bytes."""
    return _compress_eager(t, chunks)


def decompress_eager(minmax: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return _decompress_eager(minmax.float(), q.reshape(minmax.shape[0], -1))


# ----- fixed-size blocks ----------------------------------------------------------------------------
MINMAX_BYTES = 8  # one float32 (min, max) pair per block


def uniform_hash(index: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """u in [0, 1) for each int64 `index`, a pure function of (salt, index): a 32-bit integer mix
    (multiply, xor-shift) whose top 24 bits become the float, exactly representable in float32."""
    mask = 0xFFFFFFFF
    h = (index * 0x9E3779B1 + salt) & mask
    h = ((h ^ (h >> 16)) * 0x045D9F3B) & mask
    h = ((h ^ (h >> 16)) * 0x045D9F3B) & mask
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _block_codes(x: torch.Tensor, minmax: torch.Tensor, salt: torch.Tensor | None) -> torch.Tensor:
    """Codes of rows `x` (R, B) given their (R, 2) min/max: deterministic or stochastic rounding."""
    scale, lower = _scale_and_lower(minmax)
    upper = lower + LEVELS
    scaled = x * scale
    if salt is None:
        return (torch.minimum(torch.round(scaled), upper) - lower).to(torch.uint8)
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    rounded = torch.floor(scaled + uniform_hash(index, salt))
    return (torch.clamp(torch.maximum(rounded, lower), max=upper) - lower).to(torch.uint8)


def _decode(minmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(..., R, 2) min/max and (..., R, B) codes -> float32 (..., R, B)."""
    scale, lower = _scale_and_lower(minmax)
    return (codes.float() + lower) / scale


def _quantize_into(x, codes_out, residual, salt) -> torch.Tensor:
    """x (..., R, B) -> codes_out (..., R, B), returning the (..., R, 2) min/max. With `residual`, error
    feedback: x + residual is quantized and residual becomes what the codes missed.
    The min/max is returned rather than written: its destination is a float32 view of a uint8 message,
    and compiled graphs cannot write through a view of another dtype (the caller copies 8 bytes/block)."""
    x = x.float()
    if residual is not None:
        x = x + residual
    minmax = torch.stack([x.amin(dim=-1), x.amax(dim=-1)], dim=-1)
    codes = _block_codes(x, minmax, salt)
    if residual is not None:
        residual.copy_(x - _decode(minmax, codes))
    codes_out.copy_(codes)
    return minmax


def _quantize_blocks_eager(x, codes_out, residual, salt) -> torch.Tensor:
    return _quantize_into(x, codes_out, residual, salt)


def _reduce_requantize_eager(minmax_in, codes_in, codes_out, average, residual, salt) -> torch.Tensor:
    n = codes_in.shape[0]
    total = _decode(minmax_in[0], codes_in[0])
    for i in range(1, n):  # rank order, written out, so every path adds in the same order
        total = total + _decode(minmax_in[i], codes_in[i])
    if average:
        total = total / n
    return _quantize_into(total, codes_out, residual, salt)


def _decode_blocks_eager(minmax, codes, out) -> None:
    out.copy_(_decode(minmax, codes))


def _check_blocks(x: torch.Tensor, minmax: torch.Tensor, codes: torch.Tensor,
                  residual: torch.Tensor | None = None) -> None:
    """Shapes must agree: x, codes and residual (..., R, B); minmax (..., R, 2)."""
    if x.dim() < 2 or codes.shape != x.shape or minmax.shape != (*x.shape[:-1], 2) or (
            residual is not None and residual.shape != x.shape):
        raise ValueError(f"block shapes disagree: values {tuple(x.shape)}, min/max {tuple(minmax.shape)}, "
                         f"codes {tuple(codes.shape)}" + ("" if residual is None else
                                                          f", residual {tuple(residual.shape)}"))


def quantize_blocks_(x: torch.Tensor, minmax_out: torch.Tensor, codes_out: torch.Tensor,
                     residual: torch.Tensor | None = None, salt: torch.Tensor | None = None,
                     whole_numel: int | None = None) -> None:
    """Quantize each row of `x` (R, B) into `minmax_out` (R, 2) float32 and `codes_out` (R, B) uint8.
    `residual` (R, B) float32: error feedback, updated in place. `salt` (0-d int64 tensor): stochastic
    rounding with that salt (a tensor, so a new salt per call does not recompile). `whole_numel`: the
    size that decides compiled vs eager when a big buffer is processed piece by piece (default x's)."""
    if not x.is_floating_point():
        raise TypeError(f"quantize_blocks_ expects a floating tensor, got {x.dtype}")
    _check_blocks(x, minmax_out, codes_out, residual)
    minmax_out.copy_(run_fused(_key("quantize_blocks", residual, salt), _quantize_blocks_eager, whole_numel or x.numel(),
                          x, codes_out, residual, salt))


def reduce_requantize_(minmax_in: torch.Tensor, codes_in: torch.Tensor, minmax_out: torch.Tensor,
                       codes_out: torch.Tensor, average: bool = True, residual: torch.Tensor | None = None,
                       salt: torch.Tensor | None = None, whole_numel: int | None = None) -> None:
    """n received versions of the same R blocks, (n, R, 2) and (n, R, B), summed in rank order (divided
    by n when `average`) and quantized again into (R, 2) / (R, B), in one pass."""
    if codes_in.dtype != torch.uint8:
        raise TypeError(f"reduce_requantize_ expects uint8 codes, got {codes_in.dtype}")
    _check_blocks(codes_in, minmax_in, codes_in)
    _check_blocks(codes_out, minmax_out, codes_out, residual)
    minmax_out.copy_(run_fused(_key("reduce_requantize", residual, salt), _reduce_requantize_eager,
                          whole_numel or codes_in.numel(), minmax_in, codes_in, codes_out, bool(average),
                          residual, salt))


def decode_blocks_(minmax: torch.Tensor, codes: torch.Tensor, out: torch.Tensor,
                   whole_numel: int | None = None) -> None:
    """Decompress (..., R, B) codes with their (..., R, 2) min/max straight into `out` (codes' shape,
    any floating dtype)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"decode_blocks_ expects uint8 codes, got {codes.dtype}")
    _check_blocks(out, minmax, codes)
    run_fused("decode_blocks", _decode_blocks_eager, whole_numel or codes.numel(), minmax, codes, out)


def _key(name: str, residual, salt) -> str:
    """One compiled kernel per variant (error feedback, stochastic rounding), named for the status."""
    return name + ("+ef" if residual is not None else "") + ("+sr" if salt is not None else "")

"""MinMaxUInt8: the 8-bit quantizer used by ByteGrad, QAdam and low-precision decentralized SGD.

For a chunk t (spec/relax.md):
    scale = 255 / (max(t) - min(t) + eps),  eps = 1e-7
    upper = round(max(t) * scale),  lower = upper - 255
    q     = uint8(min(round(t * scale), upper) - lower)
    t_hat = (float(q) + lower) / scale
Rounding is round-half-to-even (`torch.round`). Only (min, max) travel with each chunk; `lower` and
`scale` are recomputed from them on both sides, so sender and receiver agree bit for bit. Per-element
error is at most (max - min + eps) / 510. There is no error feedback.

Why a compiled path: written as separate eager ops the compress walks memory ~7 times and costs as much
as the network transfer it saves on CPU; `torch.compile` fuses it into one pass with identical bytes.
The compiled path is used for large tensors only (compiling costs seconds once per process), and falls
back to eager if compilation is unavailable.
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
    """(chunks, 2) [min, max] -> per-chunk (scale, lower), each (chunks, 1)."""
    lo, hi = minmax[:, 0:1], minmax[:, 1:2]
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


_compiled: dict[str, object] = {}


def _maybe_compiled(name: str, fn, numel: int):
    if not _COMPILE_ENABLED or numel < COMPILE_MIN_NUMEL:
        return fn
    if name not in _compiled:
        try:
            _compiled[name] = torch.compile(fn, dynamic=True)
        except Exception as exc:  # torch.compile unsupported on this platform
            logger.warning("torch.compile unavailable for the quantizer (%s); using eager ops", exc)
            _compiled[name] = fn
    return _compiled[name]


def _run(name: str, fn, numel: int, *args):
    compiled = _maybe_compiled(name, fn, numel)
    if compiled is fn:
        return fn(*args)
    try:
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
    return _run("compress", _compress_eager, t.numel(), t, chunks)


def decompress(minmax: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Inverse of `compress`: float32 tensor of q's shape, (chunks, m)."""
    if q.dtype != torch.uint8:
        raise TypeError(f"decompress expects uint8 codes, got {q.dtype}")
    q2 = q.reshape(minmax.shape[0], -1)
    return _run("decompress", _decompress_eager, q.numel(), minmax, q2)


def compiled_status() -> dict[str, str]:
    """For each quantizer function used so far in this process: "compiled" or "eager (fallback)".
    Functions only ever called on small tensors (the eager path by design) are not listed."""
    eager = {"compress": _compress_eager, "decompress": _decompress_eager}
    return {name: "eager (fallback)" if fn is eager[name] else "compiled" for name, fn in _compiled.items()}


def compress_eager(t: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference (always uncompiled); `compress` must produce the same bytes."""
    return _compress_eager(t, chunks)


def decompress_eager(minmax: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return _decompress_eager(minmax.float(), q.reshape(minmax.shape[0], -1))

"""Gradient allreduce: the synchronous baseline, numerically torch DDP.

`wire_dtype="fp32"` (default): per bucket, allreduce SUM of the flat grads, divided by the number of
ranks when `average`: DDP's arithmetic.
`wire_dtype="bf16"` / `"fp16"`: half the bytes, what DDP's `bf16_compress_hook` / `fp16_compress_hook`
do: cast the bucket to 16 bits, divide by the number of ranks there (so the sum cannot overflow fp16),
allreduce SUM in 16 bits, cast back into the bucket. Same operations in the same order as the hooks, so
the averaged gradients equal DDP + hook bit for bit (tested). fp16 keeps 10 mantissa bits but flushes
gradients below ~6e-8 to zero; bf16 keeps fp32's range with 7 bits. Hierarchical mode: the reduce
to the node leader and the broadcast back stay fp32; only the leaders' allreduce travels in 16 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import allreduce_16bit, allreduce_mean, allreduce_sum
from .base import Algorithm, AlgorithmImpl

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GradientAllReduce(Algorithm):
    """Per bucket: allreduce SUM of the flat grads (in `wire_dtype`), divided by the number of ranks
    when `average`."""

    name = "gradient_allreduce"
    hierarchical: bool = False
    average: bool = True
    wire_dtype: str = "fp32"

    def __post_init__(self):
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")

    def reify(self, engine):
        return _GradientAllReduceImpl(engine, self)


class _GradientAllReduceImpl(AlgorithmImpl):
    def __init__(self, engine, config: GradientAllReduce):
        super().__init__(engine)
        self.config = config
        wire = WIRE_DTYPES[config.wire_dtype]
        # one 16-bit message per bucket, allocated once (buckets already in 16 bits need none)
        self.messages = {b.index: torch.empty_like(b.flat, dtype=wire) for b in engine.buckets
                         if b.flat.dtype != wire and config.wire_dtype != "fp32"}

    def averages_gradients(self):
        return True

    def on_bucket_ready(self, bucket):
        topology, average = self.engine.topology, self.config.average
        message = self.messages.get(bucket.index)
        op = (allreduce_mean if average else allreduce_sum) if message is None else allreduce_16bit(message, average)

        def job():
            topology.run(bucket.flat, op, average)

        return job


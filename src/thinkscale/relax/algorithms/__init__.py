"""Relaxation algorithms, one module each, and the registry that resolves them by name.

    >>> from thinkscale.relax import algorithms
    >>> algorithms.names()
    ['async', 'bytegrad', 'decentralized', 'gradient_allreduce', 'low_precision_decentralized', 'qadam']
    >>> algorithms.resolve("decentralized", hierarchical=False).name   # a name with options, as DataParallel takes
    'decentralized'
"""
from __future__ import annotations

from ...spec import Registry
from .async_model_average import AsyncModelAverage
from .base import Algorithm, AlgorithmImpl
from .bytegrad import ByteGrad
from .decentralized import Decentralized
from .gradient_allreduce import GradientAllReduce
from .low_precision_decentralized import LowPrecisionDecentralized
from .qadam import QAdam, QAdamOptimizer

# name -> config class. One registry: the engine, the CLI and error messages all read it.
REGISTRY: Registry[type[Algorithm]] = Registry("algorithm", {
    cls.name: cls for cls in (GradientAllReduce, ByteGrad, Decentralized, LowPrecisionDecentralized, QAdam,
                              AsyncModelAverage)})


def names() -> list[str]:
    return sorted(REGISTRY)


def resolve(algorithm: "str | Algorithm", **options) -> Algorithm:
    """An Algorithm from a name (with options) or an Algorithm instance (options not allowed)."""
    if isinstance(algorithm, Algorithm):
        if options:
            raise TypeError("pass options either to the Algorithm object or with a name, not both")
        return algorithm
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a name or an Algorithm object, got {type(algorithm).__name__}")
    return REGISTRY.lookup(algorithm)(**options)


__all__ = [
    "Algorithm", "AlgorithmImpl", "ByteGrad", "GradientAllReduce", "REGISTRY", "names", "resolve",
    "Decentralized", "LowPrecisionDecentralized",
    "QAdam", "QAdamOptimizer", "AsyncModelAverage",
]

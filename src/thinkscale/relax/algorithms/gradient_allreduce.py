"""Full-precision gradient allreduce: the synchronous baseline, numerically torch DDP."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Algorithm, AlgorithmImpl


@dataclass
class GradientAllReduce(Algorithm):
    """Per bucket: allreduce SUM of the flat grads, divided by the number of ranks when `average`."""

    name = "gradient_allreduce"
    hierarchical: bool = False
    average: bool = True

    def reify(self, engine):
        return _GradientAllReduceImpl(engine, self)


class _GradientAllReduceImpl(AlgorithmImpl):
    def __init__(self, engine, config: GradientAllReduce):
        super().__init__(engine)
        self.config = config

    def averages_gradients(self):
        return True

    def on_bucket_ready(self, bucket):
        topology, average = self.engine.topology, self.config.average

        def job():
            topology.run(bucket.flat, _allreduce_op(average), average)

        return job


def _allreduce_op(average: bool):
    def op(t, comm):
        comm.allreduce_mean_(t) if average else comm.allreduce_sum_(t)

    return op

"""Where one training step's time goes (`relax_worker --profile`), per rank, in ms per step.

Main thread (what the step time is made of):
    zero_grad, forward, backward (autograd, until the end-of-backward callback), comm wait (the part of
    the communication backward did not hide: the engine's wait at the end of backward), optimizer step.
Communication thread (overlaps the main thread; relax only), per step:
    jobs (wall time of every bucket job), and for ByteGrad/QAdam its three fused passes (quantize,
    reduce + re-quantize, decode) and the time it waited for its all-to-alls and all-gathers (the wire
    the passes did not hide).
The communication is timed through the hook the engine offers (`DataParallel.profile`); it costs two
clock reads per phase and is off unless --profile is given.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

MAIN_PHASES = ("zero_grad", "forward", "backward", "comm_wait", "step")


class StepProfile:
    """Named durations summed per step; `end_step()` closes one step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._current[name] += 1000 * seconds

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def end_step(self) -> None:
        with self._lock:
            step, self._current = dict(self._current), defaultdict(float)
        # backward as timed by the loop includes the end-of-backward wait: report autograd alone
        step["backward"] = step.get("backward", 0.0) - step.get("comm_wait", 0.0)
        self.steps.append(step)

    def summary(self, skip: int) -> dict[str, float]:
        """Mean ms per step of every phase over the steps after the first `skip`."""
        timed = self.steps[skip:]
        names = sorted({name for step in timed for name in step})
        return {name: statistics.fmean(step.get(name, 0.0) for step in timed) for name in names}


def instrument(model, profile: StepProfile) -> None:
    """Time `model`'s communication (a thinkscale DataParallel; torch DDP gets main-thread phases only)."""
    from thinkscale.relax import DataParallel

    if isinstance(model, DataParallel):
        model.profile(profile)

"""Asynchronous model averaging ("async"): training never waits for communication after warm-up.

    model = DataParallel(module, optimizer, algorithm="async", sync_interval_ms=500, warmup_steps=100)
    ...train...
    model.close()          # or model.abort(); model.resume() to pause and restart averaging

- Warm-up (the first `warmup_steps` optimizer steps): synchronous gradient allreduce (mean).
- Then gradients stay local and a background thread averages the *weights* on a process group of its
  own, every `sync_interval_ms`:
    1. allreduce MIN of a "keep going" flag, so all ranks agree to stop in the same round;
    2. snapshot s = copy(x) (no lock: forward and backward only read x);
    3. allreduce SUM of s;
    4. under the weight lock: x += sum / n - s, which keeps the local progress made during the exchange.
- The training thread holds the weight lock from forward to the end of backward (autograd needs the
  weights it saw) and during optimizer.step (the only place the trainer writes x). A waiting averager gets
  the lock before the trainer's next acquisition, so a tight training loop cannot starve it.

`abort()` and `resume()` are collective (every rank calls them): abort makes this rank vote "stop" in the
next round; all ranks' threads leave together after that vote and abort joins its thread. A rank whose
thread stopped because a peer voted "stop" stays stopped until `resume()`. `DataParallel.close()` aborts.
A script that ends without closing still stops the thread before the interpreter finalizes (an atexit
handler votes "stop" and joins it): a daemon thread still inside a collective then would abort the
process on its way out ("terminate called without an active exception", issue 23).

Compared with the source (BAGUA's async algorithm): same four-step round, same MIN-vote to stop, only
peer_selection_mode="all". Differences: the lock is a fair (averager-first) lock and its holder is tracked,
so a forward under `torch.no_grad()` (evaluation) does not take it and an abort while the trainer holds
it cannot deadlock (the averager then skips that round's local update); a failed collective in the
thread is re-raised on the training thread at the next forward as `CommunicationError`; the thread's
group is created with the engine's timeout. Not covered: weights changed outside forward/backward/step
(or forward inside `no_sync()`, which bypasses the engine) are not protected by the lock.

Checkpoints: `DataParallel.state_dict()` / `load_state_dict()` take the weight lock (state_dict returns
copies, since torch.save reads them later). CUDA: the averaging thread issues its copies and adds on its
thread's current stream, the device's default stream, which the training thread uses too, so the lock's
host-side order is also the order on the GPU; the control flag lives on the group's device.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..buckets import flatten, group_by_dtype
from ..comm import Comm, CommunicationError, allreduce_mean
from .base import Algorithm, AlgorithmImpl

logger = logging.getLogger(__name__)

PEER_SELECTION_MODES = ("all",)


def averaging_delta(snapshot: torch.Tensor, total: torch.Tensor, world_size: int) -> torch.Tensor:
    """sum / n - s: what to add to the current weights so the snapshot part becomes the average."""
    return total / world_size - snapshot


class WeightLock:
    """Mutual exclusion on the weights between the training thread and the averaging thread.

    Not owned by a thread (autograd may finish backward on another thread). A waiting averager goes
    before the trainer's next acquisition; the averager can give up waiting when asked to stop.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._held = False
        self._averager_waiting = False

    def acquire_trainer(self, timeout_s: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._held and not self._averager_waiting, timeout_s):
                raise CommunicationError(f"weight lock not free within {timeout_s:.0f}s (averaging thread stuck)")
            self._held = True

    def acquire_averager(self, give_up: threading.Event, poll_s: float = 0.05) -> bool:
        """Wait for the lock; False (not acquired) if `give_up` is set meanwhile."""
        with self._cond:
            self._averager_waiting = True
            try:
                while self._held:
                    if give_up.is_set():
                        return False
                    self._cond.wait(poll_s)
                self._held = True
                return True
            finally:
                self._averager_waiting = False
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


@dataclass
class AsyncModelAverage(Algorithm):
    """Asynchronous weight averaging every `sync_interval_ms` on a background thread, after
    `warmup_steps` synchronous gradient-allreduce steps. Only peer_selection_mode="all" exists."""

    name = "async"
    requires_full_optimizer = True  # steps are counted and locked through the optimizer's hooks
    rebuilds_buckets = False  # the averaging thread holds the parameter list
    peer_selection_mode: str = "all"
    sync_interval_ms: float = 500
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.peer_selection_mode not in PEER_SELECTION_MODES:
            raise ValueError(
                f"async: peer_selection_mode={self.peer_selection_mode!r} is not supported; only "
                f"{PEER_SELECTION_MODES} (as in the source system)"
            )
        if isinstance(self.sync_interval_ms, bool) or not self.sync_interval_ms > 0:
            raise ValueError(f"async: sync_interval_ms must be > 0, got {self.sync_interval_ms!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"async: warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")

    def reify(self, engine):
        return _AsyncImpl(engine, self)


class _AsyncImpl(AlgorithmImpl):
    writes_weights_in_background = True

    def __init__(self, engine, config: AsyncModelAverage):
        super().__init__(engine)
        self.config = config
        # A group of its own: the averaging thread's collectives never interleave with the engine's.
        # Created here, in the DataParallel constructor, so every rank creates it in the same order.
        group = dist.new_group(ranks=engine.topology.world.ranks, timeout=timedelta(seconds=engine.timeout_s))
        self.comm = Comm(group)
        self.lock = WeightLock()
        self.rounds = 0  # completed averaging rounds (for monitoring and tests)
        self._trainer_holds = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._started_once = False  # the first start is automatic (end of warm-up); later ones via resume()
        self._param_groups = group_by_dtype(engine.params)

    # ----- training-thread hooks ---------------------------------------------------------------------
    @property
    def in_warmup(self) -> bool:
        return self.engine.steps_taken < self.config.warmup_steps

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def before_forward(self):
        self._raise_thread_error()
        if not self.in_warmup and not self._started_once:
            self._start()
        if torch.is_grad_enabled():  # a no_grad forward (evaluation) has no backward to release the lock
            self._trainer_acquire()

    def averages_gradients(self):
        return self.in_warmup

    @contextlib.contextmanager
    def weights_paused(self):
        """Hold the weight lock (if this thread does not already) so the averager cannot write."""
        held_before = self._trainer_holds
        self._trainer_acquire()
        try:
            yield
        finally:
            if not held_before:
                self._trainer_release()

    def on_bucket_ready(self, bucket):
        if not self.in_warmup:
            return None  # gradients stay local; weights are averaged in the background
        topology = self.engine.topology
        return lambda: topology.run(bucket.flat, allreduce_mean, True)

    def after_backward(self):
        self._trainer_release()

    def before_step(self):
        self._trainer_acquire()

    def after_step(self):
        self._trainer_release()

    def _trainer_acquire(self) -> None:
        if not self._trainer_holds:
            self.lock.acquire_trainer(self.engine.timeout_s)
            self._trainer_holds = True

    def _trainer_release(self) -> None:
        if self._trainer_holds:
            self._trainer_holds = False
            self.lock.release()

    # ----- control ----------------------------------------------------------------------------------
    def abort(self) -> None:
        """Vote "stop" in the next round and wait for this rank's thread to leave (collective)."""
        self._started_once = True  # no automatic start after an abort, even one during warm-up
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        # one round of waiting for the slowest peer to reach the vote, plus the collective's timeout
        thread.join(self.engine.timeout_s + self.config.sync_interval_ms / 1000 + 5)
        if thread.is_alive():
            raise CommunicationError("async averaging thread did not stop; a peer rank may not be calling in")
        self._thread = None
        logger.info("async averaging stopped after %d rounds", self.rounds)

    def resume(self) -> None:
        """Restart averaging after `abort()` (collective). No-op while it runs."""
        if self.running:
            return
        self._thread = None
        self._error = None
        self._start()

    def close(self) -> None:
        try:
            self.abort()
        except CommunicationError as exc:
            logger.warning("closing async averaging: %s", exc)
        self._trainer_release()
        atexit.unregister(self._stop_at_exit)
        if not self.running:
            self._release_group()

    def _stop_at_exit(self) -> None:
        """atexit: vote "stop" and wait for the thread (every rank exiting does the same; a rank that
        cannot reach its peers gives up after the timeout), then free the thread's group."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stop.set()
            thread.join(self.engine.timeout_s + self.config.sync_interval_ms / 1000 + 5)
        if not self.running:
            self._release_group()

    def _release_group(self) -> None:
        """Destroy the averaging group now that its thread is gone. Nothing else holds it, so its gloo
        threads are joined here, while the interpreter still runs (see relax.comm.exit_process for what
        they can do to a finalizing one)."""
        group, self.comm = self.comm.group, Comm(None)
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except ValueError:  # already gone with the default group
                pass

    # ----- background thread ------------------------------------------------------------------------
    def _start(self) -> None:
        atexit.unregister(self._stop_at_exit)  # registered once, whichever start (automatic or resume) comes first
        atexit.register(self._stop_at_exit)
        self._started_once = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="relax-async-average", daemon=True)
        self._thread.start()
        logger.info("async averaging started (every %g ms)", self.config.sync_interval_ms)

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CommunicationError(f"async averaging failed ({type(error).__name__}: {error}); "
                                     "a peer rank may have died") from error

    def _loop(self) -> None:
        interval_s = self.config.sync_interval_ms / 1000
        keep_going = torch.ones(1, dtype=torch.int32, device=self.comm.device)  # NCCL: a CUDA tensor
        try:
            with torch.no_grad():
                while True:
                    self._stop.wait(interval_s)
                    keep_going.fill_(0 if self._stop.is_set() else 1)
                    self.comm.allreduce_min_(keep_going)  # every rank leaves in the same round
                    if int(keep_going.item()) == 0:
                        return
                    self._average_once()
        except Exception as exc:  # surfaced on the training thread at the next forward
            logger.error("async averaging thread failed: %s", exc)
            self._error = exc

    def _average_once(self) -> None:
        snapshots = [flatten(group) for group in self._param_groups]
        totals = [self.comm.allreduce_sum_(s.clone()) for s in snapshots]
        if not self.lock.acquire_averager(self._stop):
            return  # stopping while the trainer holds the weights: skip this local update
        try:
            for group, s, total in zip(self._param_groups, snapshots, totals):
                delta = averaging_delta(s, total, self.comm.size)
                offset = 0
                for p in group:
                    p.add_(delta[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
        finally:
            self.lock.release()
        self.rounds += 1

"""Process groups and the handful of collectives the algorithms use.

Everything goes through `Comm`, a process group plus its ranks, so algorithms never juggle global vs
group ranks and work unchanged on the whole world or on the node leaders of hierarchical mode.
Collectives are blocking calls: the engine runs them on one ordered background thread (see
`OrderedExecutor`), which gives overlap with backward and the same launch order on every rank.
Every group is created with a timeout, so a dead peer surfaces as an error instead of a hang.

GPU path (NCCL; written and reviewed, not yet run on GPUs - see tests marked `cuda`): point-to-point
exchanges are grouped with `batch_isend_irecv` (ungrouped NCCL isend/irecv pairs deadlock), and the
executor runs its jobs on a CUDA stream of its own, ordered against the training stream with events.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, ContextManager, NoReturn, Protocol

import torch
import torch.distributed as dist

# the new name where torch has it (newer releases warn on the old one, older ones have only that)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

logger = logging.getLogger(__name__)


class CommunicationError(RuntimeError):
    """A collective failed or timed out: most often a peer rank died or stopped calling in.

    The engine is reset when it is raised, so a training loop can save what it has and exit:

        >>> from thinkscale.relax import CommunicationError
        >>> try:
        ...     raise CommunicationError("bucket 3: no answer from rank 1 within 60 s")
        ... except CommunicationError as error:
        ...     print(f"saving a checkpoint, then exiting: {error}")
        saving a checkpoint, then exiting: bucket 3: no answer from rank 1 within 60 s
    """


# ----- the end of a process that ran a process group --------------------------------------------------
def end_process_group(barrier: bool = True) -> None:
    """Leave the default process group (a no-op without one).

    `barrier`: wait for every rank first, so that no rank tears down connections a peer is still using
    (pass False after a failure: the peers may be gone). torch keeps the group object referenced after
    `destroy_process_group()` (once DDP or relax has used it), so its backend threads live on until the
    process ends: end the process with `exit_process`, not through interpreter finalization.

        >>> from thinkscale.relax import end_process_group
        >>> end_process_group()     # no group in this process: nothing to do; under torchrun, the last call
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code` now: flush the standard streams and logging, then `os._exit`.

    Why not a normal exit: a gloo worker thread drops the last reference to the buffers of the work it
    just finished (e.g. `all_gather_object`'s tensors, which the final barrier holds) a moment after the
    main thread has woken from that work. If the main thread is already finalizing the interpreter by
    then, taking the GIL to free those Python-owned tensors ends the gloo thread with pthread_exit,
    whose unwinding through the work's C++ destructor aborts the whole process ("terminate called
    without an active exception", SIGABRT) after all its work succeeded: a race a loaded machine loses
    (pytorch#190489, Python <= 3.13). The group cannot be destroyed for real first (see
    `end_process_group`), so a process that ran one skips the finalization, which has nothing left to
    do for it. Files written with `with` blocks are closed already; atexit handlers do not run, and
    what still sits in a buffer only a normal exit would flush is lost: close and join a
    multiprocessing queue (`close()`, `join_thread()`) and flush open files before calling this.

        >>> import subprocess, sys
        >>> code = "from thinkscale.relax import exit_process; print('trained'); exit_process(3)"
        >>> done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        >>> done.returncode, done.stdout                # the code is kept, and stdout was flushed
        (3, 'trained\\n')
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced stream: nothing to flush
            pass
    logging.shutdown()
    os._exit(code)


EXCHANGE_CHUNK = 1 << 18  # elements per message of Comm.exchange (1 MiB of fp32)


class Comm:
    """A process group and the collectives used by the algorithms, addressed by group rank."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.ranks: list[int] = dist.get_process_group_ranks(group) if group is not None else [0]
        self.size = len(self.ranks)
        self.rank = dist.get_rank(group) if group is not None else 0
        self.backend = str(dist.get_backend(group)) if group is not None else "none"
        # Where small control tensors (flags, bitmaps) live: NCCL moves CUDA tensors only. Fixed here, on
        # the constructing thread, whose current device the launcher set (background threads start on
        # device 0).
        self.device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in self.backend
                       else torch.device("cpu"))

    def _global(self, group_rank: int) -> int:
        return self.ranks[group_rank]

    def allreduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def allreduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        # gloo has no ReduceOp.AVG: sum, then divide.
        return self.allreduce_sum_(t).div_(self.size)

    def allreduce_min_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t

    def allreduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(t, src=self._global(src), group=self.group)
        return t

    def reduce_sum_(self, t: torch.Tensor, dst: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.reduce(t, dst=self._global(dst), op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Row j of `t` (size rows) goes to rank j; row i of the result came from rank i."""
        if self.size == 1:
            return t.clone()
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        return out

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Stack every rank's `t` along a new first dimension (group rank order)."""
        if self.size == 1:
            return t.unsqueeze(0).clone()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def all_to_all_async(self, out: torch.Tensor, t: torch.Tensor) -> "dist.Work":
        """Started, not finished: row j of contiguous `t` goes to rank j, row i of `out` comes from rank i.
        `wait()` the result before reading `out` or writing `t` (size > 1 only)."""
        return dist.all_to_all_single(out, t, group=self.group, async_op=True)

    def all_gather_async(self, out: torch.Tensor, t: torch.Tensor) -> "dist.Work":
        """Started, not finished: `out` (size x t's shape, contiguous) gets every rank's `t` in rank
        order. `wait()` the result before reading `out` (size > 1 only)."""
        return _all_gather_single(out, t, group=self.group, async_op=True)

    def exchange(self, t: torch.Tensor, peer: int) -> torch.Tensor:
        """Send `t` to `peer` and receive its tensor of the same shape; returns when both are done.

        Both directions at once: every chunk's receive, then every chunk's send, is posted before any is
        waited for. Measured on a shaped 100 Mbit/s link, 20 MB each way: a blocking send then receive,
        or one isend + recv of the whole tensor, moved one direction at a time (3.4-3.5 s); chunks all
        posted up front took 1.7-1.8 s, the full-duplex time. Posting the sends first was still
        half-duplex inside training (decentralized, 94 MB: 15.4 s vs 7.2 s with receives first).
        gloo's batch_isend_irecv is avoided (known to hang); NCCL needs it (below).
        """
        if peer == self.rank:
            return t.clone()
        outgoing = t.contiguous().view(-1)  # kept referenced until the sends complete
        received = torch.empty_like(outgoing)
        peer_global = self._global(peer)
        if t.is_cuda and "nccl" in self.backend:  # "nccl", or "cpu:gloo,cuda:nccl" for CUDA tensors
            # NCCL: an ungrouped isend/irecv pair to one peer deadlocks; one batched group does not.
            ops = [dist.P2POp(dist.irecv, received, peer_global, self.group),
                   dist.P2POp(dist.isend, outgoing, peer_global, self.group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            return received.view(t.shape)
        # receives first, so the peer's data always has somewhere to land
        works = [dist.irecv(c, src=peer_global, group=self.group) for c in received.split(EXCHANGE_CHUNK)]
        works += [dist.isend(c, dst=peer_global, group=self.group) for c in outgoing.split(EXCHANGE_CHUNK)]
        for work in works:
            work.wait()
        return received.view(t.shape)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


# ----- the profiling hook -------------------------------------------------------------------------------
class Profiler(Protocol):
    """Times named phases; `DataParallel.profile(p)` hands one to the engine and its algorithm, which time
    their communication jobs, waits and passes through it (`thinkscale bench relax --worker-args=--profile`)."""

    def phase(self, name: str) -> ContextManager[None]: ...


class _NoProfile:
    def phase(self, name: str) -> ContextManager[None]:
        return contextlib.nullcontext()


NO_PROFILE: Profiler = _NoProfile()  # the default: nothing timed


# ----- ops in the shape `Topology.run` takes: op(tensor, comm), in place ---------------------------------
Op = Callable[[torch.Tensor, "Comm"], None]


def allreduce_mean(t: torch.Tensor, comm: Comm) -> None:
    """t <- the mean of t over comm's ranks (SUM, then divided by their number: DDP's arithmetic)."""
    comm.allreduce_mean_(t)


def allreduce_sum(t: torch.Tensor, comm: Comm) -> None:
    """t <- the sum of t over comm's ranks."""
    comm.allreduce_sum_(t)


def allreduce_16bit(message: torch.Tensor, average: bool) -> Op:
    """The op that sends t in `message`'s 16-bit dtype (preallocated, t's size), as DDP's
    `fp16_compress_hook` / `bf16_compress_hook` do: cast, divide by the number of ranks there when
    `average` (so an fp16 sum cannot overflow), allreduce SUM in 16 bits, cast back into t."""
    def op(t: torch.Tensor, comm: Comm) -> None:
        message.copy_(t)
        if average:
            message.div_(comm.size)
        comm.allreduce_sum_(message)
        t.copy_(message)

    return op


@dataclass
class Topology:
    """Who talks to whom: the whole group, and for hierarchical mode the node and the node leaders."""

    world: Comm
    intra: Comm | None = None  # this rank's node (hierarchical only)
    leaders: Comm | None = None  # node leaders; None on non-leader ranks (hierarchical only)

    @property
    def hierarchical(self) -> bool:
        return self.intra is not None

    @property
    def is_leader(self) -> bool:
        return self.intra is None or self.intra.rank == 0

    @property
    def algorithm_size(self) -> int:
        """How many participants the algorithm itself has: ranks when flat, nodes when hierarchical."""
        return self.world.size // self.intra.size if self.hierarchical else self.world.size

    @property
    def algorithm_comm(self) -> Comm | None:
        """The group an algorithm runs on: every rank when flat, node leaders when hierarchical."""
        return self.leaders if self.hierarchical else self.world

    def run(self, t: torch.Tensor, op: Callable[[torch.Tensor, Comm], None], average: bool) -> None:
        """Apply `op(t, comm)` in place: directly when flat; when hierarchical, reduce to the node
        leader (averaged over the node when `average`), run `op` among leaders, broadcast back."""
        if not self.hierarchical:
            op(t, self.world)
            return
        self.intra.reduce_sum_(t, dst=0)
        if self.is_leader:
            if average:
                t.div_(self.intra.size)
            op(t, self.leaders)
        self.intra.broadcast_(t, src=0)


def make_topology(
    process_group: dist.ProcessGroup | None,
    hierarchical: bool,
    timeout: timedelta,
    local_world_size: int | None = None,
) -> Topology:
    """Create this wrapper's own groups (so user collectives on the default group never interleave with
    ours). Must be called by every rank of `process_group` in the same order.

    Hierarchical mode needs >= 2 nodes of >= 2 ranks each; otherwise it is pointless and the flat
    algorithm runs (logged), so that a one-machine run exercises the algorithm itself.
    """
    base = process_group if process_group is not None else dist.group.WORLD
    ranks = dist.get_process_group_ranks(base)
    world = Comm(dist.new_group(ranks=ranks, timeout=timeout))
    if not hierarchical:
        return Topology(world=world)
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world.size
    if world.size % local != 0:
        raise ValueError(
            f"hierarchical mode: group size {world.size} is not a multiple of LOCAL_WORLD_SIZE={local}; "
            "every node must run the same number of processes"
        )
    nodes = world.size // local
    if nodes < 2 or local < 2:
        logger.info("hierarchical mode off: %d node(s) x %d process(es); running the flat algorithm",
                    nodes, local)
        return Topology(world=world)
    my_node = world.rank // local
    intra = None
    # Every rank creates every group, in the same order (counter-named groups). Deliberately not
    # `use_local_synchronization=True` (torch 2.13 has it): its group name hashes the member ranks with
    # the caller's count of groups it belongs to, which differs between node leaders and the others
    # after one hierarchical wrapper, so a second wrapper's node groups get different names on the
    # ranks of one node and wait for each other until the timeout (reproduced with 4 gloo ranks).
    for node in range(nodes):
        g = dist.new_group(ranks=ranks[node * local:(node + 1) * local], timeout=timeout)
        if node == my_node:
            intra = Comm(g)
    leaders_group = dist.new_group(ranks=ranks[::local], timeout=timeout)
    leaders = Comm(leaders_group) if world.rank % local == 0 else None
    return Topology(world=world, intra=intra, leaders=leaders)


class OrderedExecutor:
    """One background thread running communication jobs in submission order.

    Same order on every rank -> collectives match up; the thread lets them overlap backward compute.
    `wait()` re-raises a job's error (wrapped in CommunicationError) and never blocks past one
    deadline, `timeout_s` from the call, for everything pending: the total wait is bounded by the
    timeout, not by jobs x timeout. After an error the queued jobs are dropped and a fresh thread takes
    later ones (a job stuck in a collective ends when its group's timeout fires), so the caller can
    still checkpoint.

    CUDA (`device` a CUDA device): each job runs on the executor's own stream after an event recorded on
    the submitting thread's current stream (the gradients it reads are computed there), and `wait()`
    makes the caller's current stream wait for the executor's stream, so results are visible to the
    training stream without a host synchronization.
    """

    def __init__(self, timeout_s: float, device: torch.device | None = None, name: str = "relax-comm"):
        self.timeout_s = timeout_s
        self._name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[tuple[str, Future]] = []
        self._stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None

    def submit(self, what: str, fn: Callable[[], None]) -> None:
        if self._stream is not None:
            fn = _on_stream(fn, self._stream)
        self._pending.append((what, self._pool.submit(fn)))

    def wait(self) -> None:
        """Wait for every pending job, all of them within `timeout_s` from now."""
        deadline = time.monotonic() + self.timeout_s
        pending, self._pending = self._pending, []
        for what, fut in pending:
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout as exc:
                self._restart()
                raise CommunicationError(
                    f"{what} did not finish within {self.timeout_s:.0f}s: a peer rank is probably dead "
                    "or not calling in"
                ) from exc
            except Exception as exc:
                self._restart()
                if isinstance(exc, CommunicationError):
                    raise
                raise CommunicationError(
                    f"{what} failed ({type(exc).__name__}: {exc}); a peer rank may have died"
                ) from exc
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def _restart(self) -> None:
        """Drop queued jobs and continue on a fresh thread (after a failure; never blocks)."""
        self._pending = []
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)

    def shutdown(self) -> None:
        self._pending = []
        self._pool.shutdown(wait=False, cancel_futures=True)


def _on_stream(fn: Callable[[], None], stream: "torch.cuda.Stream") -> Callable[[], None]:
    """`fn` to run on `stream`, after the work queued so far on the caller's current stream."""
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(stream.device))

    def run() -> None:
        # the executor's thread starts on device 0: allocations in `fn` must land on the stream's device
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            fn()

    return run

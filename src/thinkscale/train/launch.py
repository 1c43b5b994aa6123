"""Run a training function on N local worker processes, or in-process under `torchrun`.

    result = launch(train_fn, args=(config,), nproc=2)   # rank 0's return value

Three cases, one call:
- under `torchrun` (RANK and WORLD_SIZE set): init the process group here and call `fn` in-process;
- `nproc > 1`: spawn workers with torchrun's own machinery (elastic agent, c10d rendezvous on
  127.0.0.1, no restarts), each of which inits the process group and calls `fn`;
- `nproc == 1`: call `fn` directly, no process group (relax's DataParallel is then a plain wrapper).
A worker that raises makes `launch` raise `WorkerFailedError` carrying that worker's error (the
agent stops the other workers, so nobody waits forever in a collective); Ctrl-C in the parent stops
all workers before `launch` re-raises it as KeyboardInterrupt.

Inside `fn`, use `rank()`, `world_size()`, `is_main_process()` and `barrier()`; they work in all three
cases.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class WorkerFailedError(RuntimeError):
    """A worker process failed; the message is that worker's error (exception type, text, traceback)."""

    def __init__(self, rank: int, message: str, exitcode: int | None = None):
        self.rank = rank
        self.exitcode = exitcode
        super().__init__(f"worker rank {rank} failed: {message}")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for all ranks; a no-op without a process group."""
    if world_size() > 1:
        dist.barrier()


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Init the default process group from the launcher's environment (env://), with a timeout."""
    backend = default_backend() if backend is None else backend
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    logger.debug("rank %d/%d: process group up (%s)", dist.get_rank(), dist.get_world_size(), backend)


def _run_in_process_group(fn: Callable, args: tuple, backend: str | None, timeout_s: float) -> Any:
    init_process_group(backend, timeout_s)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def _worker_entry(
    fn: Callable, args: tuple, backend: str | None, timeout_s: float, threads: int, failure_dir: str
) -> Any:
    """Body of a spawned worker (module level so that spawn can pickle it)."""
    # Workers share the machine's cores: without this each would start one thread per core.
    torch.set_num_threads(threads)
    init_process_group(backend, timeout_s)
    try:
        return fn(*args)
    except BaseException as e:
        # Record when this rank failed, before tearing down the group makes its peers fail too:
        # the earliest failure is the root cause (the agent's own records have 1 s resolution).
        _record_failure(failure_dir, e)
        raise
    finally:
        dist.destroy_process_group()


def _record_failure(failure_dir: str, error: BaseException) -> None:
    record = {
        "rank": dist.get_rank(),
        "time": time.time(),
        "message": f"{type(error).__name__}: {error}\n"
        + "".join(traceback.format_exception(type(error), error, error.__traceback__)).strip(),
    }
    path = os.path.join(failure_dir, f"rank{record['rank']}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _first_recorded_failure(failure_dir: str) -> dict | None:
    records = []
    for name in os.listdir(failure_dir):
        if name.endswith(".json"):
            with open(os.path.join(failure_dir, name), encoding="utf-8") as f:
                records.append(json.load(f))
    return min(records, key=lambda r: r["time"]) if records else None


def launch(
    fn: Callable,
    args: tuple = (),
    nproc: int = 1,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Run `fn(*args)` on `nproc` local workers (see the module docstring); returns rank 0's result.

    `fn` and `args` must be picklable when `nproc > 1` (a module-level function). `backend` defaults to
    nccl when CUDA is available, else gloo; `timeout_s` bounds every collective and the rendezvous.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if under_torchrun():
        launcher_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if nproc not in (1, launcher_world):
            warnings.warn(
                f"nproc={nproc} ignored: running under torchrun, which started {launcher_world} local workers",
                RuntimeWarning,
                stacklevel=2,
            )
        return _run_in_process_group(fn, args, backend, timeout_s)
    if nproc == 1:
        return fn(*args)
    cpus = os.cpu_count() or 1
    if nproc > cpus:
        warnings.warn(
            f"nproc={nproc} is more than the {cpus} CPUs here: workers will time-share cores and run slower",
            RuntimeWarning,
            stacklevel=2,
        )
    return _elastic_launch(fn, args, nproc, backend, timeout_s, threads=max(1, cpus // nproc))


def _elastic_launch(fn: Callable, args: tuple, nproc: int, backend: str | None, timeout_s: float, threads: int):
    # Imported here: the elastic agent is only needed when spawning.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"thinkscale-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # port 0: the rendezvous store binds a free port itself
        rdzv_configs={"timeout": int(timeout_s)},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    with tempfile.TemporaryDirectory(prefix="thinkscale-launch-") as failure_dir:
        try:
            results = elastic_launch(config, _worker_entry)(fn, args, backend, timeout_s, threads, failure_dir)
        except SignalException as e:
            # The agent has already stopped the workers; Ctrl-C reads as Ctrl-C to the caller.
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise
        except ChildFailedError as e:
            first = _first_recorded_failure(failure_dir)
            if first is not None:
                raise WorkerFailedError(first["rank"], first["message"]) from None
            # No worker raised: one died (signal, os._exit) or failed before its function ran.
            failed_rank, failure = e.get_first_failure()
            raise WorkerFailedError(failed_rank, _failure_message(failure), failure.exitcode) from None
    return results[0]


def _failure_message(failure) -> str:
    """The worker's exception text and traceback when it recorded one, else its exit code/signal."""
    data = failure.error_file_data
    if isinstance(data, dict) and isinstance(data.get("message"), dict):
        message = data["message"]
        text = message.get("message", "")
        stack = message.get("extraInfo", {}).get("py_callstack", "")
        return f"{text}\n{stack}".strip() if stack else text
    if failure.signal_name() != "<N/A>":
        return f"killed by {failure.signal_name()} (exit code {failure.exitcode})"
    return f"exited with code {failure.exitcode}: {failure.message}"

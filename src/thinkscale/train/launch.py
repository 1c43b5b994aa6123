"""Run a training function on N local worker processes, or in-process under `torchrun`.

    result = launch(train_fn, args=(config,), nproc=2)   # rank 0's return value

Three cases, one call:
- under `torchrun` (RANK and WORLD_SIZE set): init the process group here and call `fn` in-process;
- `nproc > 1` (or `max_restarts > 0`): spawn workers with torchrun's own machinery (elastic agent,
  c10d rendezvous on 127.0.0.1), each of which inits the process group and calls `fn`;
- `nproc == 1`: call `fn` directly, no process group (relax's DataParallel is then a plain wrapper).
A worker that raises or dies (SIGKILL, OOM) makes the agent stop the other workers, so nobody waits
forever in a collective; a worker that hangs is caught by the collective timeout (`timeout_s`): its
peers' next collective fails. Then, up to `max_restarts` times, the agent starts all workers again
(`restart_count()` tells `fn` it is a restart, so it can resume from its last checkpoint); after that
`launch` raises `WorkerFailedError` carrying the first failed worker's error. Ctrl-C in the parent stops
all workers before `launch` re-raises it as KeyboardInterrupt.

Inside `fn`, use `rank()`, `world_size()`, `is_main_process()` and `barrier()`; they work in all three
cases.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
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

from thinkscale.relax.comm import end_process_group, exit_process

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class WorkerFailedError(RuntimeError):
    """A worker process failed. `error`: its exception ("ValueError: data.jsonl:3: ...") or how it died;
    `details`: its traceback when it had one. The message holds both; `brief` is its first line."""

    def __init__(self, rank: int, error: str, details: str = "", exitcode: int | None = None):
        self.rank, self.error, self.details, self.exitcode = rank, error, details, exitcode
        super().__init__(f"worker rank {rank} failed: {error}" + (f"\n{details}" if details else ""))

    @property
    def brief(self) -> str:
        return str(self).splitlines()[0]


def restart_count() -> int:
    """How many times the launcher has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


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
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend=backend, timeout=timeout, store=_store_of_this_attempt(timeout),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    logger.debug("rank %d/%d: process group up (%s)", dist.get_rank(), dist.get_world_size(), backend)


def _store_of_this_attempt(timeout: timedelta) -> dist.Store:
    """The elastic agent's store, with keys private to this attempt. The agent keeps one store across
    restarts, so a restarted worker would read its peers' addresses of the failed attempt (gloo then
    fails with "Connection refused", or connects depending on who writes first)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"thinkscale/attempt_{restart_count()}", store)


def _run_in_process_group(fn: Callable, args: tuple, backend: str | None, timeout_s: float) -> Any:
    """Under torchrun: the process is the caller's, so it ends the process itself (the `thinkscale`
    command with `relax.comm.exit_process`, see its docstring for why)."""
    init_process_group(backend, timeout_s)
    try:
        return fn(*args)
    finally:
        end_process_group(barrier=False)


def _worker_entry(
    fn: Callable, args: tuple, backend: str | None, timeout_s: float, threads: int, failure_dir: str
) -> Any:
    """Body of a spawned worker (module level so that spawn can pickle it)."""
    # Workers share the machine's cores: without this each would start one thread per core.
    torch.set_num_threads(threads)
    # torch's spawn wrapper hands our result to the agent after we return; the process then exits
    # through interpreter finalization, which a gloo thread still alive can turn into SIGABRT. So a
    # worker that succeeded exits in an atexit handler instead, skipping finalization
    # (relax.comm.exit_process); registered first, it runs after the handlers `fn` registers. A worker
    # that failed exits as before: not sooner than its peer that a signal killed, whom the agent (it
    # reports the first failure it sees) must see first; an abort on its way out does not hide its
    # recorded error (see _elastic_launch).
    succeeded = [False]
    atexit.register(lambda: exit_process(0) if succeeded[0] else None)
    try:
        init_process_group(backend, timeout_s)
        result = fn(*args)
        pickle.dumps(result)  # fails here, with our error, not in the agent's queue after we claimed success
    except BaseException as e:
        # Record when this rank failed, before tearing down the group makes its peers fail too:
        # the earliest failure is the root cause (the agent's own records have 1 s resolution).
        _record_failure(failure_dir, e)
        raise
    finally:
        end_process_group(barrier=False)
    succeeded[0] = True
    return result


def _record_failure(failure_dir: str, error: BaseException) -> None:
    record = {
        "rank": int(os.environ["RANK"]),
        "attempt": restart_count(),
        "time": time.time(),
        "error": f"{type(error).__name__}: {error}",
        "details": "".join(traceback.format_exception(type(error), error, error.__traceback__)).strip(),
    }
    path = os.path.join(failure_dir, f"rank{record['rank']}-attempt{record['attempt']}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _recorded_failures(failure_dir: str) -> list[dict]:
    """The failures recorded in the last attempt (earlier attempts were followed by a restart)."""
    records = []
    for name in os.listdir(failure_dir):
        if name.endswith(".json"):
            with open(os.path.join(failure_dir, name), encoding="utf-8") as f:
                records.append(json.load(f))
    last = max((r["attempt"] for r in records), default=0)
    return [r for r in records if r["attempt"] == last]


def launch(
    fn: Callable,
    args: tuple = (),
    nproc: int = 1,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_restarts: int = 0,
) -> Any:
    """Run `fn(*args)` on `nproc` local workers (see the module docstring); returns rank 0's result.

    `fn` and `args` must be picklable when spawning (a module-level function). `backend` defaults to
    nccl when CUDA is available, else gloo; `timeout_s` bounds every collective and the rendezvous;
    `max_restarts`: how often a failed worker group is started again (under torchrun, torchrun's own
    --max-restarts applies instead).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if under_torchrun():
        launcher_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if nproc not in (1, launcher_world):
            warnings.warn(
                f"nproc={nproc} ignored: running under torchrun, which started {launcher_world} local workers",
                RuntimeWarning,
                stacklevel=2,
            )
        return _run_in_process_group(fn, args, backend, timeout_s)
    if nproc == 1 and max_restarts == 0:
        return fn(*args)
    cpus = os.cpu_count() or 1
    if nproc > cpus:
        warnings.warn(
            f"nproc={nproc} is more than the {cpus} CPUs here: workers will time-share cores and run slower",
            RuntimeWarning,
            stacklevel=2,
        )
    return _elastic_launch(fn, args, nproc, backend, timeout_s, max_restarts, threads=max(1, cpus // nproc))


def _elastic_launch(fn: Callable, args: tuple, nproc: int, backend: str | None, timeout_s: float,
                    max_restarts: int, threads: int):
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
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    with tempfile.TemporaryDirectory(prefix="thinkscale-launch-") as failure_dir, _quiet_agent():
        try:
            results = elastic_launch(config, _worker_entry)(fn, args, backend, timeout_s, threads, failure_dir)
        except SignalException as e:
            # The agent has already stopped the workers; Ctrl-C reads as Ctrl-C to the caller.
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise
        except ChildFailedError as e:
            # A worker killed by a signal (SIGKILL, OOM, a segfault) records nothing, and its peers then
            # fail in a collective: the signal is the root cause. SIGTERM is the agent stopping the others.
            # A rank that recorded an exception and then died of a signal on its way out is reported by
            # its exception.
            recorded = _recorded_failures(failure_dir)
            raised = {r["rank"] for r in recorded}
            killed = [(r, f) for r, f in sorted(e.failures.items())
                      if f.signal_name() not in ("<N/A>", "SIGTERM") and r not in raised]
            if killed:
                failed_rank, failure = killed[0]
                raise WorkerFailedError(failed_rank, *_failure_message(failure), exitcode=failure.exitcode) from None
            if recorded:
                first = min(recorded, key=lambda r: r["time"])
                raise WorkerFailedError(first["rank"], first["error"], first["details"]) from None
            # No worker raised: one died (signal, os._exit) or failed before its function ran.
            failed_rank, failure = e.get_first_failure()
            raise WorkerFailedError(failed_rank, *_failure_message(failure), exitcode=failure.exitcode) from None
    return results[0]


@contextlib.contextmanager
def _quiet_agent():
    """The elastic agent logs every worker failure with its traceback; `launch` reports the failure
    itself (WorkerFailedError), so the agent speaks only when thinkscale logs at DEBUG (`-v`)."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith(prefixes)]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _failure_message(failure) -> tuple[str, str]:
    """(error, traceback) of a worker from the agent's record, else how it ended (exit code, signal)."""
    data = failure.error_file_data
    if isinstance(data, dict) and isinstance(data.get("message"), dict):
        message = data["message"]
        return message.get("message", ""), message.get("extraInfo", {}).get("py_callstack", "")
    if failure.signal_name() != "<N/A>":
        return f"killed by {failure.signal_name()} (exit code {failure.exitcode})", ""
    return f"exited with code {failure.exitcode}: {failure.message}", ""

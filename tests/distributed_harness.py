"""Run a function on N gloo ranks in spawned processes, with a hard timeout, and collect results.

    results = run_ranks(fn, world_size=2, args=(...), env={"LOCAL_WORLD_SIZE": "2"})

`fn(rank, world_size, *args)` runs after the default process group is initialized (gloo, 127.0.0.1, a
free port, one thread per rank; backend="nccl" binds rank r to cuda:r first). Its return value is saved
with torch.save and returned in rank order.
A rank that raises makes run_ranks raise with that rank's traceback; ranks still running after
`timeout` are killed and run_ranks raises TimeoutError (a hang is a test failure, never a stuck suite).
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from thinkscale.relax.comm import end_process_group, exit_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, out_dir, env, args, pg_timeout_s, backend):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), **(env or {})})
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)  # skip destroy: peers may be gone, and we must not hang on exit
    end_process_group(barrier=False)
    exit_process(0)  # not a normal exit: see exit_process (issue 23)


def run_ranks(fn, world_size: int, args: tuple = (), env: dict | None = None, timeout: float = 120.0,
              pg_timeout_s: float = 60.0, allow_failures: bool = False, backend: str = "gloo"):
    """Returns the list of per-rank results (None for a rank that failed when allow_failures).
    With allow_failures, returns (results, errors) where errors maps rank -> traceback text."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry,
                             args=(fn, r, world_size, port, out_dir, env, args, pg_timeout_s, backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        errors = {}
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.err")
            if os.path.exists(path):
                with open(path) as f:
                    errors[r] = f.read()
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s; errors from others: {errors}")
    if allow_failures:
        return results, errors
    if errors:
        rank, text = next(iter(errors.items()))
        raise RuntimeError(f"rank {rank} failed:\n{text}")
    missing = [r for r, res in enumerate(results) if res is None and procs[r].exitcode != 0]
    if missing:
        raise RuntimeError(f"ranks {missing} exited with codes {[procs[r].exitcode for r in missing]}")
    return results


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc): the workers a command line started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found

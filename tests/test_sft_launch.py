"""train.launch: 2 spawned workers, a crashing worker, a hung worker restarted, Ctrl-C, in-process and
torchrun modes."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from thinkscale.train.launch import WorkerFailedError, launch, rank, restart_count, world_size


def sum_of_ranks(offset):
    t = torch.tensor([float(rank() + offset)])
    dist.all_reduce(t)
    return rank(), world_size(), t.item(), torch.get_num_threads()


def rank_one_raises():
    if rank() == 1:
        raise ValueError("bad shard on rank 1")
    dist.all_reduce(torch.zeros(1))  # rank 0 waits here for a peer that is gone
    return "unreachable"


def rank_one_hangs_on_the_first_attempt():
    if restart_count() == 0 and rank() == 1:
        time.sleep(120)  # hung: never reaches the collective its peer waits in
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return restart_count(), t.item()


def rank_one_is_killed():
    if rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no exception, no record
    dist.all_reduce(torch.zeros(1))  # rank 0 fails here, as a consequence
    return "unreachable"


def report_group():
    return dist.is_initialized(), rank(), world_size()


def test_two_workers_run_and_return_rank_zero_result():
    # ranks 0 and 1 contribute 10 and 11
    assert launch(sum_of_ranks, args=(10,), nproc=2, timeout_s=60) == (0, 2, 21.0, max(1, (os.cpu_count() or 1) // 2))


def test_a_crashing_worker_fails_the_launch_with_its_error():
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="worker rank 1 failed: ValueError: bad shard on rank 1") as info:
        launch(rank_one_raises, nproc=2, timeout_s=60)
    assert info.value.rank == 1
    assert "rank_one_raises" in str(info.value)  # the worker's traceback travels too
    assert time.monotonic() - start < 30  # the waiting peer is stopped, not left to time out


def test_a_killed_worker_is_named_as_the_cause_not_its_peer():
    with pytest.raises(WorkerFailedError, match=r"^worker rank 1 failed: killed by SIGKILL") as info:
        launch(rank_one_is_killed, nproc=2, timeout_s=60)
    assert info.value.exitcode == -signal.SIGKILL


def test_a_hung_worker_is_caught_by_the_collective_timeout_and_the_workers_restart():
    start = time.monotonic()
    assert launch(rank_one_hangs_on_the_first_attempt, nproc=2, timeout_s=8, max_restarts=1) == (1, 2.0)
    assert time.monotonic() - start < 60  # the hung rank was stopped, not waited for (120 s)


def test_more_workers_than_cpus_warns(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.warns(RuntimeWarning, match="more than the 1 CPUs"):
        assert launch(sum_of_ranks, args=(0,), nproc=2, timeout_s=60)[2] == 1.0


def test_single_process_runs_in_process_without_a_group():
    assert launch(report_group, nproc=1) == (False, 0, 1)
    with pytest.raises(ValueError, match="nproc"):
        launch(report_group, nproc=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_inits_the_group_in_process(monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    with pytest.warns(RuntimeWarning, match="nproc=4 ignored"):
        assert launch(report_group, nproc=4, timeout_s=30) == (True, 0, 1)
    assert not dist.is_initialized()


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from thinkscale.train.launch import launch

    def hang(pid_dir):
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()
        time.sleep(120)

    if __name__ == "__main__":
        try:
            launch(hang, args=(sys.argv[1],), nproc=2, timeout_s=60)
        except KeyboardInterrupt:
            sys.exit(130)
    """
)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_leaves_no_orphan_workers(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(CTRL_C_SCRIPT)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(pid_dir)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(pid_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(name) for name in os.listdir(pid_dir)]
        assert len(workers) == 2
        parent.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the launcher
        assert parent.wait(timeout=30) == 130
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)

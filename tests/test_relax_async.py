"""async: warm-up allreduce, background weight averaging, abort/resume, uneven speeds, clean exit."""
import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed_harness import run_ranks
from relax_models import gather_all, least_squares, params_vector, small_mlp
from thinkscale.relax import DataParallel, algorithms
from thinkscale.relax.algorithms.async_model_average import WeightLock

INTERVAL_MS = 20


def _train(model, opt, x, y, steps, sleep_s=0.0):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sleep_s:
            time.sleep(sleep_s)


def _loss(module, x, y):
    with torch.no_grad():
        return nn.functional.mse_loss(module(x), y).item()


def _async_ranks(rank, world):
    out = {}
    x, y = least_squares(rank, seed=3)
    torch.manual_seed(rank)  # different init per rank: the start broadcast fixes it
    lin = nn.Linear(10, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    model = DataParallel(lin, opt, algorithm="async", sync_interval_ms=INTERVAL_MS, warmup_steps=3,
                         timeout_s=30)
    out["start_loss"] = _loss(lin, x, y)

    # warm-up: synchronous gradient allreduce keeps replicas identical, no averaging thread yet
    _train(model, opt, x, y, 3)
    out["warmup_equal"] = all(torch.equal(p, params_vector(lin)) for p in gather_all(params_vector(lin)))
    out["running_in_warmup"] = model._impl.running

    # uneven speeds: rank 1 is slow and takes few steps; averaging pulls it along with rank 0
    if rank == 0:
        _train(model, opt, x, y, 150, sleep_s=0.002)
    else:
        _train(model, opt, x, y, 10, sleep_s=0.03)
    out["rounds_while_training"] = model._impl.rounds
    dist.barrier()  # averaging keeps running meanwhile
    time.sleep(5 * INTERVAL_MS / 1000)
    out["end_loss"] = _loss(lin, x, y)
    replicas = gather_all(params_vector(lin))
    out["end_gap"] = (replicas[0] - replicas[1]).abs().max().item()

    # abort: no more averaging, even when replicas differ
    model.abort()
    out["running_after_abort"] = model._impl.running
    with torch.no_grad():
        lin.bias.add_(float(rank))  # make the replicas differ
    before = params_vector(lin)
    time.sleep(5 * INTERVAL_MS / 1000)
    out["unchanged_while_aborted"] = torch.equal(before, params_vector(lin))
    out["gap_after_abort"] = (gather_all(before)[0] - gather_all(before)[1]).abs().max().item()

    # resume: averaging again; with no training, every replica becomes the mean
    dist.barrier()
    model.resume()
    deadline = time.monotonic() + 10
    rounds = model._impl.rounds
    while model._impl.rounds < rounds + 2 and time.monotonic() < deadline:
        time.sleep(INTERVAL_MS / 1000)
    expected = (gather_all(before)[0] + gather_all(before)[1]) / 2
    out["resumed_gap"] = (params_vector(lin) - expected).abs().max().item()
    model.close()  # aborts the loop
    out["running_after_close"] = model._impl is None
    return out


def test_async_two_ranks_converge_abort_resume_uneven_speeds():
    results = run_ranks(_async_ranks, 2, timeout=120)
    for rank, r in enumerate(results):
        assert r["warmup_equal"] and not r["running_in_warmup"], r
        assert r["rounds_while_training"] >= 2, r
        # the slow rank too: 10 local steps alone leave it far higher (next test)
        assert r["end_loss"] < 0.05 * r["start_loss"], r
        assert r["end_gap"] < 1e-2, r  # replicas end close
        assert not r["running_after_abort"]
        assert r["unchanged_while_aborted"] and r["gap_after_abort"] > 0.5, r
        assert r["resumed_gap"] < 1e-6, r
        assert r["running_after_close"]


def test_slow_rank_would_not_converge_alone():
    # the reference for the assertion above: 10 local SGD steps from the same start leave a high loss
    x, y = least_squares(1, seed=3)
    torch.manual_seed(0)
    lin = nn.Linear(10, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    start = _loss(lin, x, y)
    _train(lin, opt, x, y, 13)
    assert _loss(lin, x, y) > 0.05 * start


def _abort_then_exit(rank, world):
    x, y = least_squares(rank)
    lin = nn.Linear(10, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    model = DataParallel(lin, opt, algorithm="async", sync_interval_ms=INTERVAL_MS, timeout_s=30)
    _train(model, opt, x, y, 5)
    if rank == 0:
        model.abort()  # and leave at once
        return "aborted"
    # rank 1 keeps training; rank 0's "stop" vote ends its averaging thread too
    deadline = time.monotonic() + 10
    while model._impl.running and time.monotonic() < deadline:
        _train(model, opt, x, y, 1, sleep_s=0.01)
    stopped_by_peer = not model._impl.running
    model.close()
    return stopped_by_peer


def test_abort_then_exit_never_hangs():
    assert run_ranks(_abort_then_exit, 2, timeout=60) == ["aborted", True]


# ----- single process ---------------------------------------------------------------------------------
def test_weight_lock_gives_a_waiting_averager_the_next_turn():
    lock, stop, order = WeightLock(), threading.Event(), []
    lock.acquire_trainer(5)

    def averager():
        assert lock.acquire_averager(stop)
        order.append("averager")
        lock.release()

    thread = threading.Thread(target=averager)
    thread.start()
    time.sleep(0.1)  # the averager is waiting now
    lock.release()
    lock.acquire_trainer(5)  # must wait for the averager's turn
    order.append("trainer")
    lock.release()
    thread.join(5)
    assert order == ["averager", "trainer"]


def test_weight_lock_averager_gives_up_when_stopping():
    lock, stop = WeightLock(), threading.Event()
    lock.acquire_trainer(5)
    stop.set()
    assert lock.acquire_averager(stop) is False
    lock.release()
    lock.acquire_trainer(1)  # not left blocked by the averager that gave up


def test_config_errors():
    with pytest.raises(ValueError, match="peer_selection_mode='shift_one' is not supported; only"):
        algorithms.resolve("async", peer_selection_mode="shift_one")
    with pytest.raises(ValueError, match="sync_interval_ms must be > 0"):
        algorithms.resolve("async", sync_interval_ms=0)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        algorithms.resolve("async", warmup_steps=-1)
    with pytest.raises(ValueError, match="needs the optimizer"):
        DataParallel(small_mlp(), None, algorithm="async")


def test_single_process_is_plain_and_abort_resume_are_no_ops():
    module = small_mlp()
    model = DataParallel(module, torch.optim.SGD(module.parameters(), lr=0.1), algorithm="async")
    model.abort()
    model.resume()
    x = torch.randn(2, 8)
    assert torch.equal(model(x), module(x))
    model.close()

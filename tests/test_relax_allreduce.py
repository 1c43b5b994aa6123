"""gradient_allreduce equals torch DDP; buckets, no_sync, state round trip, dead ranks."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_harness import run_ranks
from relax_models import params_vector, rank_batch, small_mlp
from thinkscale.relax import DataParallel
from thinkscale.relax.buckets import plan_buckets


def _train_vs_ddp(rank, world, hierarchical, steps, bucket_size_mb):
    base = small_mlp(seed=rank)  # different init per rank: the start broadcast must fix it
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours_opt = torch.optim.SGD(ours_module.parameters(), lr=0.05, momentum=0.9)
    ours = DataParallel(ours_module, ours_opt, algorithm="gradient_allreduce", hierarchical=hierarchical,
                        bucket_size_mb=bucket_size_mb)
    ddp = DDP(ddp_module)
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, y = rank_batch(rank, step)
        for model, opt in ((ours, ours_opt), (ddp, ddp_opt)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return params_vector(ours_module), params_vector(ddp_module), ours.topology.hierarchical


@pytest.mark.parametrize("world,hierarchical", [(2, False), (4, False), (4, True)])
def test_matches_torch_ddp(world, hierarchical):
    env = {"LOCAL_WORLD_SIZE": "2"}  # 4 ranks = 2 pretend nodes x 2 processes
    # a tiny bucket size gives several buckets, exercising in-order launch
    results = run_ranks(_train_vs_ddp, world, args=(hierarchical, 20, 0.0005), env=env)
    for ours, ddp, was_hierarchical in results:
        assert was_hierarchical == hierarchical
        assert torch.allclose(ours, ddp, atol=1e-6, rtol=0), (ours - ddp).abs().max()
    assert torch.equal(results[0][0], results[-1][0])  # replicas agree


def test_bucket_plan_reversed_per_dtype_and_size():
    a = nn.Parameter(torch.zeros(10))
    b = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    c = nn.Parameter(torch.zeros(30))
    d = nn.Parameter(torch.zeros(5))
    plan = plan_buckets([a, b, c, d], bucket_bytes=100)  # 25 float32 elements per bucket
    ids = [[id(p) for p in bucket] for bucket in plan]
    # reversed order: d, c (closes float32 bucket at 140 bytes), b (float64, open), a (float32, open)
    assert ids == [[id(d), id(c)], [id(b)], [id(a)]]


def test_bucket_plan_by_kind_is_ordered_by_completion():
    """Biases in a bucket of their own (another kind) complete with the first layer's bias: the weight
    bucket that closed earlier in backward comes first, so it can start communicating during backward."""
    w1, b1, w2, b2 = (nn.Parameter(torch.zeros(*shape)) for shape in [(4, 4), (4,), (8, 8), (8,)])
    plan = plan_buckets([w1, b1, w2, b2], bucket_bytes=200, kind=lambda p: "1d" if p.dim() == 1 else "")
    ids = [[id(p) for p in bucket] for bucket in plan]
    # reversed: b2, w2 (256 bytes: closes the 2-D bucket), b1, w1; the biases stay open until the end
    assert ids == [[id(w2)], [id(b2), id(b1)], [id(w1)]]


def _no_sync_accumulates(rank, world):
    module = small_mlp(seed=0)
    reference = copy.deepcopy(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    model = DataParallel(module, opt)
    calls = []
    model.executor.submit = (lambda submit: lambda what, fn: (calls.append(what), submit(what, fn)))(
        model.executor.submit)
    micro = [rank_batch(rank, i) for i in range(3)]
    with model.no_sync():
        for x, y in micro[:2]:
            nn.functional.mse_loss(model(x), y).backward()
    assert calls == []  # nothing communicated inside no_sync
    x, y = micro[2]
    nn.functional.mse_loss(model(x), y).backward()
    communicated = len([what for what in calls if "bucket" in what])
    grads = [p.grad.clone() for p in module.parameters()]
    # reference: sum of the three micro-batch grads on this rank, averaged over ranks by hand
    total = [torch.zeros_like(p) for p in reference.parameters()]
    for x, y in micro:
        reference.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        for t, p in zip(total, reference.parameters()):
            t += p.grad
    for t in total:
        torch.distributed.all_reduce(t)
        t /= world
    return communicated, len(model.buckets), grads, total


def test_no_sync_accumulates_then_communicates_once():
    for communicated, n_buckets, grads, expected in run_ranks(_no_sync_accumulates, 2):
        assert communicated == n_buckets  # each bucket exactly once
        for g, e in zip(grads, expected):
            assert torch.allclose(g, e, atol=1e-6)


def test_single_process_is_a_plain_wrapper():
    module = small_mlp()
    model = DataParallel(module, torch.optim.SGD(module.parameters(), lr=0.1), algorithm="bytegrad")
    x, y = rank_batch(0, 0)
    assert torch.equal(model(x), module(x))
    assert model.world_size == 1 and model.buckets == []


def test_unknown_algorithm_lists_choices():
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'.*gradient_allreduce"):
        DataParallel(small_mlp(), algorithm="sgd")


def test_non_floating_parameter_is_rejected():
    module = small_mlp()
    module.register_parameter("steps", nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match="'steps' has dtype torch.int64"):
        DataParallel(module)


def _dies(rank, world):
    model = DataParallel(small_mlp(), None, timeout_s=10)
    if rank == 1:
        import os
        os._exit(3)  # simulate a crash mid-training
    x, y = rank_batch(rank, 0)
    nn.functional.mse_loss(model(x), y).backward()  # must raise, not hang
    return "no error"


def test_dead_rank_raises_instead_of_hanging():
    results, errors = run_ranks(_dies, 2, timeout=60, allow_failures=True)
    assert results[0] is None
    assert "CommunicationError" in errors[0], errors


# ----- issue 10: failure paths ------------------------------------------------------------------------
def test_executor_wait_is_bounded_by_one_deadline_and_recovers():
    import time

    from thinkscale.relax import CommunicationError
    from thinkscale.relax.comm import OrderedExecutor

    executor = OrderedExecutor(timeout_s=0.5)
    for i in range(3):  # each job alone fits in the timeout; the three together do not
        executor.submit(f"job {i}", lambda: time.sleep(0.3))
    start = time.monotonic()
    with pytest.raises(CommunicationError, match="job 1 did not finish"):
        executor.wait()
    assert time.monotonic() - start < 0.7
    done = []  # job 2 was dropped with the error: a new job does not queue behind it
    executor.submit("after", lambda: done.append(1))
    executor.wait()
    assert done == [1]
    executor.shutdown()


def _stalls(rank, world):
    import io
    import time

    from thinkscale.relax import CommunicationError

    model = DataParallel(small_mlp(), None, timeout_s=2, bucket_size_mb=0.0002)  # several buckets
    if rank == 1:
        time.sleep(6)  # alive but not calling in
        return None
    x, y = rank_batch(rank, 0)
    start = time.monotonic()
    try:
        nn.functional.mse_loss(model(x), y).backward()
        return "no error"
    except CommunicationError as exc:
        elapsed, message = time.monotonic() - start, str(exc)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # the process can still checkpoint, then exit
    model.close()
    return {"elapsed": elapsed, "message": message, "buckets": len(model.buckets),
            "checkpoint_bytes": len(buffer.getvalue())}


def test_stuck_peer_raises_within_the_timeout_and_leaves_a_usable_engine():
    result = run_ranks(_stalls, 2, timeout=60)[0]
    assert isinstance(result, dict), result
    assert result["buckets"] > 2
    assert result["elapsed"] < 2 + 2.0, result  # one deadline, not buckets x timeout
    assert "bucket" in result["message"] and result["checkpoint_bytes"] > 0

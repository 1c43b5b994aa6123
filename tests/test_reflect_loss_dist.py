"""SPR loss with a process group: P and N (and the class guard's decision) are global counts, everything
else stays per rank."""
from __future__ import annotations

import math
import socket
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from thinkscale.reflect import spr_loss
from thinkscale.relax import end_process_group, exit_process

# rank 0 and rank 1 batches: (step logits, mask, outcome)
BATCHES = [
    ([[0.5, -1.0, 2.0], [-0.5, 1.0, -3.0]], [[1, 1, 1], [1, 1, 0]], [1, 0]),
    ([[1.5, 0.2, -0.7], [-2.0, -0.1, 0.3]], [[1, 1, 1], [1, 1, 1]], [1, 1]),
]


def reference_loss(rank: int, min_class_share: float = 0.0) -> float:
    """The spec formula with plain floats; P and N counted over both ranks' batches; a class of which the
    filter keeps less than `min_class_share` of its steps (over both ranks) is trained whole."""
    def scored(batch):
        s, mask, y = batch
        return [(v, yy) for row, mrow, yy in zip(s, mask, y) for v, mm in zip(row, mrow) if mm]

    def agrees(v, yy):
        return (v > 0 and yy == 1) or (v < 0 and yy == 0)

    everything = scored(BATCHES[0]) + scored(BATCHES[1])
    whole = {c for c in (0, 1) if sum(agrees(v, yy) for v, yy in everything if yy == c)
             < min_class_share * sum(1 for _, yy in everything if yy == c)}

    def kept(steps):
        return [(v, yy) for v, yy in steps if yy in whole or agrees(v, yy)]

    P = sum(1 for _, yy in kept(everything) if yy == 1) + 1
    N = sum(1 for _, yy in kept(everything) if yy == 0) + 1
    T = P + N
    num = den = 0.0
    for v, yy in kept(scored(BATCHES[rank])):
        w = 1.5 * N / T if yy == 1 else P / T
        bce = math.log1p(math.exp(-v)) if yy == 1 else math.log1p(math.exp(v))
        num += w * bce
        den += w
    return num / (den + 1e-5)


# the filter keeps 5 of 9 correct steps (0.56) and 1 of 2 wrong ones (0.5) over both ranks; rank 1 alone
# keeps 3 of its 6 correct steps (0.5), so a local decision would differ from the global one there
MIN_CLASS_SHARE = 0.55


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        s, mask, y = BATCHES[rank]
        loss, stats = spr_loss(torch.tensor(s), torch.tensor(mask, dtype=torch.bool), torch.tensor(y),
                               process_group=dist.group.WORLD)
        guarded, guarded_stats = spr_loss(torch.tensor(s), torch.tensor(mask, dtype=torch.bool), torch.tensor(y),
                                          process_group=dist.group.WORLD, min_class_share=MIN_CLASS_SHARE)
        queue.put((rank, loss.item(), stats["P"], stats["N"], guarded.item(), guarded_stats["N"],
                   guarded_stats["unfiltered_classes"]))
    finally:
        end_process_group(barrier=False)
    queue.close()
    queue.join_thread()  # the result is in the pipe before the process skips its finalization
    exit_process(0)  # not a normal exit: see exit_process (issue 23)


def test_spr_loss_counts_are_summed_over_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(2):
            rank, *result = queue.get(timeout=120)
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    # rank 0 keeps 0.5, 2.0 (correct) and -0.5 (wrong); rank 1 keeps 1.5, 0.2, 0.3 (all correct)
    for rank in range(2):
        loss, P, N, guarded, guarded_N, unfiltered = results[rank]
        assert (P, N) == (6, 2)
        assert loss == pytest.approx(reference_loss(rank), rel=1e-6)
        # the class guard decides on global counts: only the wrong class is trained whole, on both ranks
        assert (guarded_N, unfiltered) == (3, 1)
        assert guarded == pytest.approx(reference_loss(rank, MIN_CLASS_SHARE), rel=1e-6)
    # and it differs from what a rank would get with only its own counts
    s, mask, y = BATCHES[0]
    local, _ = spr_loss(torch.tensor(s), torch.tensor(mask, dtype=torch.bool), torch.tensor(y))
    assert abs(local.item() - results[0][0]) > 1e-3

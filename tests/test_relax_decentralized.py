"""decentralized (D-PSGD, "all" / "shift_one") and low_precision_decentralized (DCD-PSGD ring) against
the spec's formulas, step by step, plus convergence checks. One spawn per world size (module fixtures)."""
import math

import pytest
import torch
from torch import nn

from distributed_harness import run_ranks
from relax_models import least_squares, params_vector, rank_batch, small_mlp
from thinkscale.relax import DataParallel
from thinkscale.relax.algorithms import Decentralized, LowPrecisionDecentralized
from thinkscale.relax.algorithms.decentralized import shift_one_peer
from thinkscale.relax.buckets import flatten
from thinkscale.relax.quantize import compress_eager, decompress_eager

LR = 0.05


# ----- the shift_one schedule as a pure function ------------------------------------------------------
def _spec_peer(r, n, k):
    """spec/relax.md, written out separately from the implementation."""
    if r < n / 2:
        return ((k + r) % math.ceil(n / 2)) + math.floor(n / 2)
    return (r - math.floor(n / 2) - k) % math.floor(n / 2)


# hand-computed pairings, indexed [k][rank]
HAND_TABLE = {
    2: [[1, 0], [1, 0]],
    4: [[2, 3, 0, 1], [3, 2, 1, 0], [2, 3, 0, 1]],
    6: [[3, 4, 5, 0, 1, 2], [4, 5, 3, 2, 0, 1], [5, 3, 4, 1, 2, 0]],
}


@pytest.mark.parametrize("n", [2, 4, 6])
def test_shift_one_peer_matches_spec_and_hand_table(n):
    for k in range(3 * n):
        assert [shift_one_peer(r, n, k) for r in range(n)] == [_spec_peer(r, n, k) for r in range(n)]
    for k, row in enumerate(HAND_TABLE[n]):
        assert [shift_one_peer(r, n, k) for r in range(n)] == row


@pytest.mark.parametrize("n", [2, 4, 6, 8])
def test_shift_one_is_a_perfect_matching_that_visits_every_upper_rank(n):
    half = n // 2
    for k in range(2 * n):
        peers = [shift_one_peer(r, n, k) for r in range(n)]
        assert all(peers[p] == r and p != r for r, p in enumerate(peers))  # an involution without fixed points
        assert all(p >= half for p in peers[:half])  # lower half pairs with upper half
    for r in range(half):  # over n/2 consecutive communications a lower rank meets each upper rank once
        assert sorted(shift_one_peer(r, n, k) for k in range(half)) == list(range(half, n))


def test_shift_one_peer_rejects_odd_n():
    with pytest.raises(ValueError, match="even number"):
        shift_one_peer(0, 3, 0)


def test_config_validation():
    with pytest.raises(ValueError, match="peer_selection_mode must be one of"):
        Decentralized(peer_selection_mode="ring")
    with pytest.raises(ValueError, match="communication_interval must be >= 1"):
        Decentralized(communication_interval=0)
    with pytest.raises(TypeError, match="communication_interval must be an int"):
        LowPrecisionDecentralized(communication_interval=1.5)


# ----- rank functions -----------------------------------------------------------------------------------
def _grad_at(x_vec, batch):
    """Reference gradient of the MSE loss of small_mlp at weights x_vec (a separate, unwrapped model)."""
    ref = small_mlp(seed=0)
    torch.nn.utils.vector_to_parameters(x_vec, ref.parameters())
    x, y = batch
    nn.functional.mse_loss(ref(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in ref.parameters()])


def _decentralized_trace(rank, steps, **options):
    """Per step: weights before, reference grad there, weights after, whether a communication launched.
    Replicas are perturbed per rank after the start broadcast so that the first average is not trivial."""
    module = small_mlp(seed=0)
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    model = DataParallel(module, opt, algorithm="decentralized", **options)
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    launched = []
    submit = model.executor.submit
    model.executor.submit = lambda what, fn: (launched.append(what), submit(what, fn))
    records = []
    for step in range(steps):
        batch = rank_batch(rank, step)
        before, count = params_vector(module), len(launched)
        opt.zero_grad()
        nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
        opt.step()
        records.append({"before": before, "grad": _grad_at(before, batch), "after": params_vector(module),
                        "communicated": len(launched) - count})
    model.close()
    return records


def _lpd_trace(rank, steps, **options):
    """Per step: the replicas (w, l, r) before, the weights right after the local optimizer step (before
    the ring communication), and the replicas and weights after, all per bucket."""
    module = small_mlp(seed=0)
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    holder = {}
    # registered before the wrapper's hook, so it runs first: sees x after SGD, before communication
    opt.register_step_post_hook(lambda *_: holder.__setitem__(
        "local", [flatten(b.params) for b in holder["model"].buckets]))
    model = holder["model"] = DataParallel(module, opt, algorithm="low_precision_decentralized",
                                           bucket_size_mb=0.0005, **options)

    def replicas():
        saved = model.algorithm_state_dict()["state"]["replicas"]
        return None if saved is None else [[t.clone() for t in triple] for triple in saved]

    records = []
    for step in range(steps):
        x, y = rank_batch(rank, step)
        before = replicas()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        records.append({"before": before, "local": holder["local"], "after": replicas(),
                        "x": [flatten(b.params) for b in model.buckets]})
    model.close()
    return records


def _least_squares_fit(rank, algorithm, steps, lr):
    x, y = least_squares(rank)
    torch.manual_seed(0)
    module = nn.Linear(x.shape[1], 1, bias=False)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    model = DataParallel(module, opt, algorithm=algorithm, hierarchical=False)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.close()
    return params_vector(module)


class _Point(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim))

    def forward(self):
        return self.x


def _quadratic_targets(world, dim=5):
    return torch.randn(world, dim, generator=torch.Generator().manual_seed(7)) * 3


def _quadratic(rank, world, steps, lr):
    """f_i(x) = 0.5 ||x - c_i||^2, each rank its own target c_i; returns the final x."""
    target = _quadratic_targets(world)[rank]
    module = _Point(target.numel())
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    model = DataParallel(module, opt, algorithm="decentralized", hierarchical=False)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (model() - target).pow(2).sum()).backward()
        opt.step()
    model.close()
    return module.x.detach().clone()


def _eval_forward_does_not_communicate(rank):
    module = small_mlp(seed=0)
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    model = DataParallel(module, opt, algorithm="decentralized", hierarchical=False)
    launched = []
    submit = model.executor.submit
    model.executor.submit = lambda what, fn: (launched.append(what), submit(what, fn))
    x, y = rank_batch(rank, 0)
    if rank == 0:  # evaluation on one rank only must not start a collective the others never join
        with torch.no_grad():
            model(x)
    counts = [len(launched)]
    for _ in range(2):  # two forwards in one step: one communication
        loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    counts.append(len(launched))
    model.close()
    return counts


def _world2(rank, world):
    return {
        "eval_forward": _eval_forward_does_not_communicate(rank),
        "shift_one": _decentralized_trace(rank, 2, peer_selection_mode="shift_one", hierarchical=False),
        "lpd": _lpd_trace(rank, 3, hierarchical=False),
    }


def _world3(rank, world):
    module = small_mlp()
    try:
        DataParallel(module, torch.optim.SGD(module.parameters(), lr=LR),
                     algorithm="decentralized", peer_selection_mode="shift_one")
        odd_error = None
    except ValueError as exc:
        odd_error = str(exc)
    return {
        "odd_error": odd_error,
        "all_interval3": _decentralized_trace(rank, 6, peer_selection_mode="all", communication_interval=3,
                                              hierarchical=False),
        "quadratic": _quadratic(rank, world, steps=300, lr=LR),
    }


def _world4(rank, world):  # LOCAL_WORLD_SIZE=2: hierarchical=True means 2 nodes x 2 processes
    return {
        "shift_one": _decentralized_trace(rank, 3, peer_selection_mode="shift_one", hierarchical=False),
        "shift_one_hier": _decentralized_trace(rank, 2, peer_selection_mode="shift_one", hierarchical=True),
        "lpd": _lpd_trace(rank, 3, hierarchical=False),
        "lpd_hier": _lpd_trace(rank, 2, hierarchical=True),
        "ls_allreduce": _least_squares_fit(rank, "gradient_allreduce", 150, 0.05),
        "ls_lpd": _least_squares_fit(rank, "low_precision_decentralized", 150, 0.05),
    }


@pytest.fixture(scope="module")
def world2():
    return run_ranks(_world2, 2)


@pytest.fixture(scope="module")
def world3():
    return run_ranks(_world3, 3)


@pytest.fixture(scope="module")
def world4():
    return run_ranks(_world4, 4, env={"LOCAL_WORLD_SIZE": "2"})


# ----- decentralized ---------------------------------------------------------------------------------------
def _check_trace(results, key, average, interval=1):
    """Every rank, every step: x_{t+1} = average(x_t of all ranks, k) - lr * grad f_i(x_t) on communication
    steps, x_t - lr * grad on the others."""
    n, k = len(results), 0
    for step in range(len(results[0][key])):
        records = [res[key][step] for res in results]
        communicates = step % interval == 0
        assert [rec["communicated"] for rec in records] == [int(communicates)] * n, step
        xs = torch.stack([rec["before"] for rec in records])
        for r, rec in enumerate(records):
            base = average(xs, r, k) if communicates else xs[r]
            expected = base - LR * rec["grad"]
            assert torch.allclose(rec["after"], expected, atol=1e-6, rtol=0), (step, r)
        k += int(communicates)


def _pair_average(xs, r, k):
    return (xs[r] + xs[_spec_peer(r, len(xs), k)]) / 2


def test_shift_one_step_is_pair_average_minus_lr_grad_n2(world2):
    _check_trace(world2, "shift_one", _pair_average)


def test_only_the_first_training_forward_of_a_step_communicates(world2):
    for result in world2:
        assert result["eval_forward"] == [0, 1]


def test_shift_one_step_is_pair_average_minus_lr_grad_n4(world4):
    _check_trace(world4, "shift_one", _pair_average)  # steps 0, 1, 2: k = 0, 1, 2 (two different pairings)


def test_shift_one_hierarchical_averages_nodes_then_pairs_leaders(world4):
    def node_then_pair(xs, r, k):  # 2 nodes of 2: the leaders' pair average is the mean of the node means
        nodes = [(xs[0] + xs[1]) / 2, (xs[2] + xs[3]) / 2]
        return (nodes[0] + nodes[1]) / 2

    _check_trace(world4, "shift_one_hier", node_then_pair)


def test_shift_one_with_odd_world_size_is_a_clear_error(world3):
    for result in world3:
        assert "even number of participants" in result["odd_error"]
        assert "world size 3" in result["odd_error"]


def test_communication_interval_and_local_steps_between(world3):
    # "all" with interval 3 over 6 steps: communications on steps 1 and 4 only; local SGD in between
    _check_trace(world3, "all_interval3", lambda xs, r, k: xs.mean(dim=0), interval=3)
    launched = sum(rec["communicated"] for rec in world3[0]["all_interval3"])
    assert launched == 2
    for step in (1, 2, 4, 5):  # replicas disagree between communications (different data per rank)
        xs = [res["all_interval3"][step]["before"] for res in world3]
        assert (xs[0] - xs[1]).abs().max() > 1e-4, step


def test_all_mode_reaches_consensus_on_quadratic(world3):
    finals = torch.stack([res["quadratic"] for res in world3])
    targets = _quadratic_targets(len(world3))
    # the mean of the replicas goes to the mean target
    assert torch.allclose(finals.mean(dim=0), targets.mean(dim=0), atol=1e-5)
    # fixed point of x_i = mean(x) - lr (x_i - c_i):  x_i - x_j = lr / (1 + lr) (c_i - c_j)
    for i in range(len(world3)):
        for j in range(len(world3)):
            expected = LR / (1 + LR) * (targets[i] - targets[j])
            assert torch.allclose(finals[i] - finals[j], expected, atol=1e-5)
    spread = torch.cdist(finals, finals).max()
    assert spread < 0.05 * torch.cdist(targets, targets).max()  # local SGD alone would end at the targets


# ----- low_precision_decentralized -------------------------------------------------------------------------
def _check_ring(results, key, local=None):
    """`local(r, step, b)`: the x the ring step started from (default: rank r's weights after SGD)."""
    n = len(results)
    local = local or (lambda r, step, b: results[r][key][step]["local"][b])
    for step in range(len(results[0][key])):
        for r in range(n):
            left, right = (r - 1) % n, (r + 1) % n
            rec = results[r][key][step]
            for b, (w, l, rr) in enumerate(rec["after"]):
                assert torch.equal(l, results[left][key][step]["after"][b][0]), (step, r, b)
                assert torch.equal(rr, results[right][key][step]["after"][b][0]), (step, r, b)
                assert torch.equal(rec["x"][b], w)  # the model's weights are its own replica
                # the update itself, spec formula with the eager reference quantizer
                w0, l0, r0 = rec["before"][b]
                z = local(r, step, b) + l0 / 3 + r0 / 3 - 5 * w0 / 3
                assert torch.equal(w, w0 + decompress_eager(*compress_eager(z)).reshape(-1)), (step, r, b)


def test_ring_replicas_track_neighbours_exactly_n2(world2):
    assert len(world2[0]["lpd"][0]["after"]) > 1  # several buckets
    _check_ring(world2, "lpd")


def test_ring_replicas_track_neighbours_exactly_n4(world4):
    _check_ring(world4, "lpd")


def test_ring_hierarchical_runs_among_leaders_and_broadcasts(world4):
    leaders = [world4[0], world4[2]]  # ranks 0 and 2 lead nodes {0,1} and {2,3}

    def node_mean(node, step, b):  # full-precision average inside the node comes first
        ranks = (2 * node, 2 * node + 1)
        return (world4[ranks[0]]["lpd_hier"][step]["local"][b] + world4[ranks[1]]["lpd_hier"][step]["local"][b]) / 2

    _check_ring(leaders, "lpd_hier", node_mean)
    for step in range(2):
        assert world4[1]["lpd_hier"][step]["after"] is None  # non-leaders hold no replicas
        for leader, member in ((0, 1), (2, 3)):
            for a, b in zip(world4[leader]["lpd_hier"][step]["x"], world4[member]["lpd_hier"][step]["x"]):
                assert torch.equal(a, b)


def test_low_precision_decentralized_converges_like_allreduce(world4):
    reference = world4[0]["ls_allreduce"]
    for res in world4:
        assert torch.equal(res["ls_allreduce"], reference)
        relative = (res["ls_lpd"] - reference).norm() / reference.norm()
        assert relative < 0.01, relative


def _exchange_big(rank, world_size):
    import torch.distributed as dist

    from thinkscale.relax.comm import EXCHANGE_CHUNK, Comm

    comm = Comm(dist.group.WORLD)
    numel = 2 * EXCHANGE_CHUNK + 12345 * 8  # three messages, the last one short
    mine = torch.arange(numel, dtype=torch.float32).reshape(-1, 8) * (rank + 1)
    got = comm.exchange(mine, 1 - rank)
    peer = torch.arange(numel, dtype=torch.float32).reshape(-1, 8) * (2 - rank)
    return got.shape == mine.shape and torch.equal(got, peer) and torch.equal(comm.exchange(mine, rank), mine)


def test_exchange_splits_large_tensors_into_chunks_and_keeps_them_in_order():
    assert run_ranks(_exchange_big, 2) == [True, True]


def test_ring_step_compiled_passes_equal_the_spec_formula():
    """Big enough for the fused, compiled passes (>= 1 << 20 elements): the same bytes as the formula
    with the eager quantizer. One process, so the ring's neighbours are this rank itself."""
    from thinkscale.relax import quantize
    from thinkscale.relax.algorithms.low_precision_decentralized import dcd_step_
    from thinkscale.relax.comm import Comm

    g = torch.Generator().manual_seed(0)
    x, w, l, r = (torch.randn(1 << 20, generator=g) for _ in range(4))
    w0, l0, r0 = w.clone(), l.clone(), r.clone()
    z = x + l0 / 3 + r0 / 3 - 5 * w0 / 3
    change = decompress_eager(*compress_eager(z)).reshape(-1)
    dcd_step_(x, w, l, r, Comm(None))
    assert torch.equal(w, w0 + change) and torch.equal(x, w)
    assert torch.equal(l, l0 + change) and torch.equal(r, r0 + change)  # n = 1: both neighbours are me
    if quantize._COMPILE_ENABLED:
        status = quantize.compiled_status()
        assert status["dcd_compress_difference"] == status["dcd_apply_differences"] == "compiled"

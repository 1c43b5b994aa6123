"""relax against torch DDP(find_unused_parameters=True) in the loops people run (issue 10): unused and
frozen parameters, BatchNorm buffers, clipping between backward and step, AMP with overflowing steps,
bf16 parameters. One spawned 2-rank gloo run holds every case; the tests below read its results."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_harness import run_ranks
from relax_models import Branchy, gather_all, rank_batch, uses_sometimes
from thinkscale.relax import DataParallel

STEPS = 7
FREEZE_AT, UNFREEZE_AT = 2, 5  # mid.weight is frozen for steps 2-4, after wrapping


def _grads(module: nn.Module) -> dict:
    return {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}


def _branchy_loop(rank, algorithm):
    """Train relax (`algorithm`) and DDP side by side; record grads after backward and weights."""
    torch.manual_seed(rank)  # different init per rank: both wrappers broadcast rank 0's
    base = Branchy()
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours = DataParallel(ours_module, algorithm=algorithm, bucket_size_mb=0.001, hierarchical=False)
    ddp = DDP(ddp_module, find_unused_parameters=True)
    pairs = [(ours, ours_module, torch.optim.AdamW(ours_module.parameters(), lr=0.01, weight_decay=0.1)),
             (ddp, ddp_module, torch.optim.AdamW(ddp_module.parameters(), lr=0.01, weight_decay=0.1))]
    record = {"grads": [], "weights": [], "frozen_weight": [], "busy_after_backward": []}
    for step in range(STEPS):
        x, y = rank_batch(rank, step)
        step_grads = []
        for model, module, opt in pairs:
            module.mid.weight.requires_grad_(not FREEZE_AT <= step < UNFREEZE_AT)
            opt.zero_grad()
            nn.functional.mse_loss(model(x, uses_sometimes(rank, step)), y).backward()
            step_grads.append(_grads(module))
            if model is ours:
                record["busy_after_backward"].append(ours.executor.busy)
            torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
            opt.step()
        record["grads"].append(step_grads)
        record["weights"].append([copy.deepcopy(m.state_dict()) for _, m, _ in pairs])
        record["frozen_weight"].append(ours_module.mid.weight.detach().clone())
    record["buckets_rebuilt_params"] = len(ours.params)
    ours.close()
    return record


def _amp_loop(rank, algorithm, steps=5, overflow_step=2):
    """bf16 autocast + GradScaler; rank 1's loss overflows at `overflow_step` only."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours_opt = torch.optim.SGD(ours_module.parameters(), lr=0.05)
    ours = DataParallel(ours_module, ours_opt, algorithm=algorithm, hierarchical=False)
    ddp = DDP(ddp_module, find_unused_parameters=True)
    ddp_opt = torch.optim.SGD(ddp_module.parameters(), lr=0.05)
    out = {"scales": [], "steps_taken": None}
    for model, opt in ((ours, ours_opt), (ddp, ddp_opt)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scales = []
        for step in range(steps):
            x, y = rank_batch(rank, step)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            if rank == 1 and step == overflow_step:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        out["scales"].append(scales)
    out["steps_taken"] = ours.steps_taken
    out["ours"] = torch.cat([p.detach().reshape(-1) for p in ours_module.parameters()])
    out["ddp"] = torch.cat([p.detach().reshape(-1) for p in ddp_module.parameters()])
    ours.close()
    return out


def _bf16_loop(rank, steps=4):
    """bf16 parameters (one bucket per dtype: a float32 head stays apart), SGD, against DDP."""
    torch.manual_seed(rank)
    base = nn.Sequential(nn.Linear(8, 16).to(torch.bfloat16), nn.Tanh(), nn.Linear(16, 4).to(torch.bfloat16))
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours_opt = torch.optim.SGD(ours_module.parameters(), lr=0.05)
    ours = DataParallel(ours_module, ours_opt)
    ddp = DDP(ddp_module)
    ddp_opt = torch.optim.SGD(ddp_module.parameters(), lr=0.05)
    for step in range(steps):
        x, y = rank_batch(rank, step)
        for model, opt in ((ours, ours_opt), (ddp, ddp_opt)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
            opt.step()
    ours.close()
    return (torch.cat([p.detach().reshape(-1) for p in ours_module.parameters()]),
            torch.cat([p.detach().reshape(-1) for p in ddp_module.parameters()]))


def _qadam_unused(rank, steps=6):
    """QAdam past warm-up with a branch only rank 0 uses at some steps: the averaged first moment moves
    every parameter on every rank, so replicas stay bit-identical."""
    from thinkscale.relax.algorithms import QAdamOptimizer

    torch.manual_seed(0)
    module = Branchy()
    opt = QAdamOptimizer(module.parameters(), lr=0.01, warmup_steps=2, weight_decay=0.01)
    model = DataParallel(module, opt, algorithm="qadam", hierarchical=False, bucket_size_mb=0.001)
    for step in range(steps):
        x, y = rank_batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x, uses_sometimes(rank, step)), y).backward()
        opt.step()
    model.close()
    return gather_all(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))


def _without_used_bitmap(rank):
    """find_unused_parameters=False: no bitmap allreduce; a parameter no rank used gets zeros."""
    torch.manual_seed(0)
    module = Branchy()
    model = DataParallel(module, find_unused_parameters=False)
    x, y = rank_batch(rank, 0)
    nn.functional.mse_loss(model(x, uses_sometimes(rank, 0)), y).backward()  # 'sometimes': rank 0 only
    grads = {"never": module.never.weight.grad.clone(), "sometimes": module.sometimes.weight.grad.clone()}
    model.close()
    return grads


def _frozen_needs_rewrap(rank):
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    model = DataParallel(module, opt, algorithm="low_precision_decentralized", hierarchical=False)
    module[0].weight.requires_grad_(False)
    try:
        model(torch.ones(2, 4))
    except ValueError as exc:
        return str(exc)
    finally:
        model.close()


def _buffers_off(rank):
    torch.manual_seed(rank)
    module = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    model = DataParallel(module, broadcast_buffers=False)
    x, _ = rank_batch(rank, 0)
    model(x).sum().backward()
    model(x).sum().backward()
    means = gather_all(module[1].running_mean)
    model.close()
    return means


def _all_cases(rank, world):
    return {
        "allreduce": _branchy_loop(rank, "gradient_allreduce"),
        "bytegrad": _branchy_loop(rank, "bytegrad"),
        "amp_allreduce": _amp_loop(rank, "gradient_allreduce"),
        "amp_bytegrad": _amp_loop(rank, "bytegrad"),
        "bf16": _bf16_loop(rank),
        "qadam_unused": _qadam_unused(rank),
        "no_bitmap": _without_used_bitmap(rank),
        "rewrap_error": _frozen_needs_rewrap(rank),
        "buffers_off": _buffers_off(rank),
    }


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_cases, 2, timeout=180)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradients_after_backward_equal_ddp_with_unused_and_frozen_parameters(ranks):
    for result in ranks:
        rec = result["allreduce"]
        assert not any(rec["busy_after_backward"])  # nothing still in flight when backward returns
        for step, (ours, ddp) in enumerate(rec["grads"]):
            assert {k for k, g in ours.items() if g is None} == {k for k, g in ddp.items() if g is None}, step
            assert _max_diff({k: g for k, g in ours.items() if g is not None},
                             {k: g for k, g in ddp.items() if g is not None}) <= 1e-6, step
        never = [ours["never.weight"] for ours, _ in rec["grads"]]
        assert all(g is None for g in never)  # unused on every rank: grad stays None
        sometimes = [ours["sometimes.weight"] is None for ours, _ in rec["grads"]]
        assert sometimes == [False, True, False, False, False, True, False]  # averaged when one rank used it


def test_weights_equal_ddp_after_clipping_adamw_and_freezing(ranks):
    for result in ranks:
        for ours, ddp in result["allreduce"]["weights"]:
            assert _max_diff(ours, ddp) <= 1e-6


def test_frozen_parameter_never_moves_and_trains_again_when_unfrozen(ranks):
    rec = ranks[0]["allreduce"]
    frozen = rec["frozen_weight"]
    for step in range(FREEZE_AT, UNFREEZE_AT):  # weight decay must not touch it while frozen
        assert torch.equal(frozen[step], frozen[FREEZE_AT - 1])
        assert rec["grads"][step][0]["mid.weight"] is None
    assert not torch.equal(frozen[UNFREEZE_AT], frozen[UNFREEZE_AT - 1])
    assert rec["buckets_rebuilt_params"] == len(list(Branchy().parameters()))  # every param again


def test_buffers_are_rank0s_at_every_forward(ranks):
    # each forward starts from rank 0's running stats, then adds this rank's batch: as DDP does
    for result in ranks:
        for ours, ddp in result["allreduce"]["weights"]:
            for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
                assert torch.allclose(ours[key].double(), ddp[key].double(), atol=1e-6, rtol=0), key


def test_broadcast_buffers_off_leaves_buffers_local(ranks):
    means = ranks[0]["buffers_off"]
    assert not torch.equal(means[0], means[1])


def test_bytegrad_gradients_final_and_identical_across_ranks_with_unused_parameters(ranks):
    rank0, rank1 = ranks[0]["bytegrad"], ranks[1]["bytegrad"]
    for step in range(STEPS):
        ours0, ddp0 = rank0["grads"][step]
        ours1, _ = rank1["grads"][step]
        assert {k for k, g in ours0.items() if g is None} == {k for k, g in ddp0.items() if g is None}
        for name, g in ours0.items():
            if g is not None:
                assert torch.equal(g, ours1[name]), (step, name)
    assert not any(rank0["busy_after_backward"])


@pytest.mark.parametrize("algorithm", ["allreduce", "bytegrad"])
def test_grad_scaler_overflow_skips_on_every_rank_together(ranks, algorithm):
    results = [r[f"amp_{algorithm}"] for r in ranks]
    for res in results:
        ours_scales, ddp_scales = res["scales"]
        assert ours_scales == ddp_scales  # the overflow step halved the scale, once, on every rank
        assert ours_scales[2] == ours_scales[1] / 2
        assert res["steps_taken"] == 4  # 5 steps, one skipped: counts steps that happened
    assert torch.equal(results[0]["ours"], results[1]["ours"])
    if algorithm == "allreduce":
        for res in results:
            assert torch.allclose(res["ours"], res["ddp"], atol=1e-6, rtol=0)


def test_bf16_parameters_equal_ddp(ranks):
    for ours, ddp in (r["bf16"] for r in ranks):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, ddp)


def test_freezing_under_a_weight_space_algorithm_asks_to_rewrap(ranks):
    for result in ranks:
        assert "wrap the module again" in result["rewrap_error"]
        assert "low_precision_decentralized" in result["rewrap_error"]


def test_qadam_with_unused_parameters_keeps_replicas_identical(ranks):
    first, second = ranks[0]["qadam_unused"]
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_without_the_used_bitmap_unused_parameters_get_zeros(ranks):
    for result in ranks:
        assert torch.equal(result["no_bitmap"]["never"], torch.zeros(4, 16))
        assert result["no_bitmap"]["sometimes"].abs().sum() > 0  # rank 0's gradient, halved, on both
    assert torch.equal(ranks[0]["no_bitmap"]["sometimes"], ranks[1]["no_bitmap"]["sometimes"])

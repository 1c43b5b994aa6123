"""The GPU path on 2 processes with NCCL (one GPU each): gradient_allreduce against torch DDP with unused
parameters and BatchNorm, ByteGrad bit-identical across ranks, decentralized shift_one (point-to-point
through batch_isend_irecv) by its formula, low_precision_decentralized's ring, async's CUDA control flag.
Skipped, with the reason, where fewer than two GPUs exist (the CPU suite covers the same math on gloo)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_harness import run_ranks
from relax_models import Branchy, gather_all, params_vector, rank_batch, uses_sometimes
from thinkscale.relax import DataParallel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs >= 2 CUDA GPUs for 2-process NCCL (not available here)"),
]
STEPS = 5


def _versus_ddp(rank, device):
    torch.manual_seed(rank)
    base = Branchy().to(device)
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours = DataParallel(ours_module, bucket_size_mb=0.001)
    ddp = DDP(ddp_module, device_ids=[rank], find_unused_parameters=True)
    pairs = [(ours, ours_module, torch.optim.AdamW(ours_module.parameters(), lr=0.01)),
             (ddp, ddp_module, torch.optim.AdamW(ddp_module.parameters(), lr=0.01))]
    for step in range(STEPS):
        x, y = (t.to(device) for t in rank_batch(rank, step))
        for model, module, opt in pairs:
            opt.zero_grad()
            nn.functional.mse_loss(model(x, uses_sometimes(rank, step)), y).backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
            opt.step()
    ours.close()
    return {"diff": (params_vector(ours_module) - params_vector(ddp_module)).abs().max().item(),
            "never_grad_none": ours_module.never.weight.grad is None}


def _train(rank, device, algorithm, **options):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    model = DataParallel(module, opt, algorithm=algorithm, hierarchical=False, **options)
    seen, errors = [], []
    opt.register_step_pre_hook(lambda *_: errors.append(
        None if not seen else (params_vector(module) - seen[-1]).abs().max().item()))
    for step in range(STEPS):
        if algorithm == "decentralized":  # shift_one with 2 ranks: the pair average of both replicas
            parts = gather_all(params_vector(module))
            seen.append((parts[0] + parts[1]) / 2)
        x, y = (t.to(device) for t in rank_batch(rank, step))
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.close()
    return {"ranks": gather_all(params_vector(module)), "errors": errors}


def _nccl_cases(rank, world):
    device = torch.device("cuda", rank)
    return {"ddp": _versus_ddp(rank, device),
            "bytegrad": _train(rank, device, "bytegrad"),
            "decentralized": _train(rank, device, "decentralized", peer_selection_mode="shift_one"),
            "low_precision": _train(rank, device, "low_precision_decentralized"),
            "async": _train(rank, device, "async", sync_interval_ms=10)}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_nccl_cases, 2, timeout=240, backend="nccl")


def test_nccl_gradient_allreduce_equals_ddp(ranks):
    for result in ranks:
        assert result["ddp"]["diff"] <= 1e-6 and result["ddp"]["never_grad_none"]


def test_nccl_bytegrad_bit_identical(ranks):
    first, second = ranks[0]["bytegrad"]["ranks"]
    assert torch.equal(first, second)


def test_nccl_decentralized_shift_one_by_its_formula(ranks):
    for result in ranks:
        assert max(result["decentralized"]["errors"]) == 0.0


@pytest.mark.parametrize("name", ["low_precision", "async"])
def test_nccl_weight_space_algorithms_run(ranks, name):
    for result in ranks:
        assert all(torch.isfinite(t).all() for t in result[name]["ranks"])

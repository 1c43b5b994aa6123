"""gradient_allreduce(wire_dtype="bf16"|"fp16") against torch DDP with its bf16/fp16 compress hooks,
flat and hierarchical."""
import copy

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_harness import run_ranks
from relax_models import rank_batch, small_mlp
from thinkscale.relax import DataParallel
from thinkscale.relax.algorithms import GradientAllReduce

# bf16_compress_hook refuses gloo (it asks for NCCL); the function behind both hooks does the work
HOOKS = {"fp16": default_hooks.fp16_compress_hook,
         "bf16": lambda group, bucket: default_hooks._compress_hook(torch.bfloat16, group, bucket)}


def _against_ddp_hook(rank, world, wire):
    base = small_mlp(seed=0)
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours = DataParallel(ours_module, algorithm="gradient_allreduce", wire_dtype=wire, bucket_size_mb=0.001)
    # one bucket per tensor in both (tiny caps), so every tensor is averaged on its own in both
    ddp = DDP(ddp_module, bucket_cap_mb=0.0001)
    ddp.register_comm_hook(None, HOOKS[wire])
    out = []
    for step in range(3):
        x, y = rank_batch(rank, step)
        grads = []
        for model, module in ((ours, ours_module), (ddp, ddp_module)):
            module.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in module.parameters()])
        out.append(grads)
    return out


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_16bit_wire_equals_ddp_compress_hook(wire):
    results = run_ranks(_against_ddp_hook, 2, args=(wire,))
    for steps in results:
        for ours, theirs in steps:
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b)


def _hierarchical(rank, world, wire):
    torch.manual_seed(0)
    module = nn.Linear(6, 3)
    model = DataParallel(module, algorithm="gradient_allreduce", wire_dtype=wire, hierarchical=True,
                         local_world_size=2)
    local = torch.randn(3, 6, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
    (module.weight * local).sum().backward()  # grad of the weight = local, of the bias = none (zeros)
    return local, module.weight.grad.clone(), model.topology.hierarchical


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_16bit_wire_hierarchical_two_nodes_of_two(wire):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[wire]
    results = run_ranks(_hierarchical, 4, args=(wire,))
    locals_ = [r[0] for r in results]
    assert all(r[2] for r in results)  # 2 nodes x 2 ranks: hierarchical mode on
    # fp32 mean inside each node, then the leaders' 16-bit allreduce: cast, / 2 leaders, sum, back to fp32
    node_means = [(locals_[0] + locals_[1]) / 2, (locals_[2] + locals_[3]) / 2]
    expected = sum(m.to(dtype).div_(2) for m in node_means).float()
    for _, grad, _ in results:
        assert torch.equal(grad, expected)
    assert not torch.equal(expected, sum(node_means) / 2)  # the 16-bit wire did round


def test_wire_dtype_rejects_unknown_values():
    with pytest.raises(ValueError, match="wire_dtype must be one of fp32, bf16, fp16, got 'int8'"):
        GradientAllReduce(wire_dtype="int8")

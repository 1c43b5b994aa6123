"""relax's exchanges as torch DDP comm hooks (relax/hooks.py), on 2 gloo ranks.

The layout is pinned with DDP's `bucket_cap_mb_list=[cap]`, which applies `cap` to the first iteration's
buckets as well as to the rebuilt ones (with `bucket_cap_mb` alone torch 2.13 puts every parameter in one
bucket, in registration order, for the first iteration), and a cap below the smallest tensor on both
sides: DDP's buckets and relax's then hold one tensor each, in the same order (reverse registration),
before and after DDP's rebuild."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_harness import run_ranks
from relax_models import Branchy, rank_batch, small_mlp, uses_sometimes
from thinkscale.relax import DataParallel
from thinkscale.relax.hooks import (ByteGradHookState, Wire16HookState, bytegrad_hook, fold_residuals,
                                    wire16_hook)

BIG_BUCKET_MB = 25
TENSOR_BUCKET_MB = 1e-5  # 10 bytes: below any tensor of small_mlp, so one tensor per bucket


def _step(model, module, optimizer, rank, step, micro_batches=1):
    optimizer.zero_grad()
    for micro in range(micro_batches):
        x, y = rank_batch(rank, 10 * step + micro)
        last = micro == micro_batches - 1
        with (model.no_sync() if not last else torch.enable_grad()):
            nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in module.parameters()]
    optimizer.step()
    return grads


def _hook_vs_dataparallel(rank, world, options, steps, micro_batches):
    base = small_mlp(seed=0)
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours_opt = torch.optim.SGD(ours_module.parameters(), lr=0.1, momentum=0.9)
    ddp_opt = torch.optim.SGD(ddp_module.parameters(), lr=0.1, momentum=0.9)
    ours = DataParallel(ours_module, ours_opt, algorithm="bytegrad", bucket_size_mb=TENSOR_BUCKET_MB, **options)
    ddp = DDP(ddp_module, bucket_cap_mb_list=[TENSOR_BUCKET_MB])
    state = ByteGradHookState(ddp, **options)
    ddp.register_comm_hook(state, bytegrad_hook)
    out = []
    for step in range(steps):
        a = _step(ours, ours_module, ours_opt, rank, step, micro_batches)
        b = _step(ddp, ddp_module, ddp_opt, rank, step, micro_batches)
        out.append((a, b))
    weights = ([p.detach().clone() for p in ours_module.parameters()],
               [p.detach().clone() for p in ddp_module.parameters()])
    return out, weights, len(state.layouts), state.state_dict()


@pytest.mark.parametrize("options, micro_batches", [
    ({}, 1), ({"error_feedback": True}, 1), ({"error_feedback": True}, 2)],
    ids=["plain", "error_feedback", "error_feedback-no_sync"])
def test_pinned_layout_equals_dataparallel_bytegrad(options, micro_batches):
    results = run_ranks(_hook_vs_dataparallel, 2, args=(options, 4, micro_batches))
    for steps, (ours_w, ddp_w), layouts, saved in results:
        assert layouts == 6  # 3 weights quantized, 3 biases in full precision
        for ours, theirs in steps:
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b)
        for a, b in zip(ours_w, ddp_w):
            assert torch.equal(a, b)
        if options.get("error_feedback"):  # the residuals are live and saved, the exchange ran every step
            # the weights' buckets are shorter than ranks x block: all of each goes through the padded tail
            tails = [e["exchanges"][1] for e in saved["layouts"] if e["names"][0].endswith("weight")]
            assert len(tails) == 3 and all(t["calls"] == 4 and t["residual_sent"].abs().sum() > 0 for t in tails)
    assert torch.equal(results[0][1][1][0], results[1][1][1][0])  # the ranks agree


def _wide_mlp_under_ddp(**options):
    """A model of ~110k parameters in DDP's own buckets (0.2 MB: one bucket in the first iteration, two
    after the rebuild), with the ByteGrad hook."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 8))
    reference = copy.deepcopy(module)
    ddp = DDP(module, bucket_cap_mb=0.2)
    state = ByteGradHookState(ddp, block_size=256, **options)
    ddp.register_comm_hook(state, bytegrad_hook)
    return module, reference, ddp, state


def _default_layout(rank, world, stochastic_rounding):
    """Two iterations under DDP's own buckets: the first iteration's single bucket, then the rebuilt ones."""
    module, reference, ddp, state = _wide_mlp_under_ddp(stochastic_rounding=stochastic_rounding)
    g = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(2):
        module.zero_grad(), reference.zero_grad()
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        nn.functional.mse_loss(ddp(x), y).backward()
        nn.functional.mse_loss(reference(x), y).backward()
        out.append(([p.grad.clone() for p in module.parameters()], [p.grad.clone() for p in reference.parameters()],
                    len(state.layouts)))
    return out


@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_default_layout_within_one_quantization_step(stochastic_rounding):
    """Round to nearest drops at most half a step in each of the two quantizations (the senders' and the
    owner's); stochastic rounding at most a whole one in each."""
    steps_allowed = 2 if stochastic_rounding else 1
    rank0, rank1 = run_ranks(_default_layout, 2, args=(stochastic_rounding,))
    assert [layouts for _, _, layouts in rank0] == [1, 2]  # one bucket, then DDP's two rebuilt ones
    for (hooked0, local0, _), (hooked1, local1, _) in zip(rank0, rank1):
        # a block's step is its range / 255; blocks run across the tensors of a bucket, so the range of
        # every value quantized bounds it
        weights = [(l0, l1) for l0, l1 in zip(local0, local1) if l0.dim() > 1]
        values = torch.cat([t.reshape(-1) for l0, l1 in weights for t in (l0, l1, (l0 + l1) / 2)])
        step = (values.max() - values.min()) / 255
        quantized_somewhere = False
        for hooked, other, l0, l1 in zip(hooked0, hooked1, local0, local1):
            assert torch.equal(hooked, other)  # bit-identical on every rank
            exact = (l0 + l1) / 2
            if hooked.dim() <= 1:  # biases: full precision, DDP's arithmetic
                assert torch.equal(hooked, exact)
                continue
            error = (hooked - exact).abs().max()
            assert error <= steps_allowed * step * 1.001, (error, step)
            quantized_somewhere |= bool(error > 0)
        assert quantized_somewhere


def _rebuild_with_error_feedback(rank, world):
    module, _, ddp, state = _wide_mlp_under_ddp(error_feedback=True)
    g = torch.Generator().manual_seed(rank)
    seen = []
    for _ in range(3):
        module.zero_grad()
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        nn.functional.mse_loss(ddp(x), y).backward()
        saved = state.state_dict()
        sent = sum(float(e["residual_sent"].abs().sum()) for layout in saved["layouts"] for e in layout["exchanges"]
                   if e["residual_sent"] is not None)
        seen.append((len(saved["layouts"]), sent, len(state.residuals), len(state._released),
                     [layout["exchanges"][0]["calls"] for layout in saved["layouts"]]))
    return seen


def test_error_feedback_residuals_follow_ddps_rebuild():
    """Iteration 1: one bucket; iteration 2: DDP's two rebuilt ones take every residual of the first
    (nothing left waiting), and carry them on."""
    for seen in run_ranks(_rebuild_with_error_feedback, 2):
        assert [s[0] for s in seen] == [1, 2, 2]
        assert all(s[1] > 0 for s in seen)
        assert all(s[2] == 0 and s[3] == 0 for s in seen)  # no residual dropped or left behind
        assert seen[1][4] == [1, 1] and seen[2][4] == [2, 2]  # the new layouts' exchanges, called on


def _release_and_take(rank, world):
    """After an iteration with error feedback in DDP's first single bucket, a new layout of some of its
    parameters (as DDP's rebuild makes) starts from exactly the folded residuals of those parameters."""
    from thinkscale.relax.hooks import fold_residuals

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 8))
    ddp = DDP(module)
    state = ByteGradHookState(ddp, block_size=256, error_feedback=True, piece_size_mb=0.25)
    ddp.register_comm_hook(state, bytegrad_hook)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().mean().backward()
    (layout,) = state.state_dict()["layouts"]
    numels, full, prefix, tail = state.geometry(layout["names"])
    parts = [fold_residuals(e["residual_sent"], e["residual_owned"], world, rank, 256, 2**16)
             for e in layout["exchanges"] if e["residual_sent"] is not None]
    folded, expected, offset = torch.cat(parts), {}, 0
    for i, (name, numel) in enumerate(zip(layout["names"], numels)):
        if i not in full:
            expected[name] = folded[offset:offset + numel]
        offset += numel
    new = state._layout_for(["2.weight", "0.weight"], torch.device("cpu"))  # what a rebuild would bring
    sent = torch.cat([e.residual_sent for e in new.exchanges if e.residual_sent is not None])
    taken = {"2.weight": sent[:8 * 300], "0.weight": sent[8 * 300:8 * 300 + 300 * 64]}
    return ({name: torch.equal(taken[name], expected[name]) for name in taken}, sorted(state.residuals),
            float(expected["0.weight"].abs().sum()))


def test_release_folds_and_a_new_layout_takes_every_residual():
    for same, waiting, magnitude in run_ranks(_release_and_take, 2):
        assert same == {"2.weight": True, "0.weight": True} and magnitude > 0
        assert waiting == []  # biases are averaged in fp32: no residual; the weights were taken up


def _failing_exchange(rank, world):
    from thinkscale.relax import hooks

    def broken(self, buffer, comm):
        raise RuntimeError("boom")

    hooks._Layout.exchange = broken
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 8))
    ddp = DDP(module, bucket_cap_mb_list=[0.2])  # several buckets from the first iteration
    ddp.register_comm_hook(ByteGradHookState(ddp, timeout_s=30), bytegrad_hook)
    try:
        ddp(torch.randn(4, 64)).sum().backward()
    except Exception as exc:  # noqa: BLE001
        return str(exc)
    return "no error"


def test_a_failed_exchange_fails_the_backward_and_the_queued_buckets_run_nothing():
    for message in run_ranks(_failing_exchange, 2, timeout=60):
        assert "bytegrad_hook, bucket" in message and "boom" in message


def _bf16_bucket(rank, world):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)).to(torch.bfloat16)
    reference = copy.deepcopy(module)
    ddp = DDP(module)
    ddp.register_comm_hook(ByteGradHookState(ddp, block_size=64), bytegrad_hook)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    ddp(x).float().square().mean().backward()
    reference(x).float().square().mean().backward()
    return [p.grad.clone() for p in module.parameters()], [p.grad.clone() for p in reference.parameters()]


def test_bf16_gradients_are_averaged_in_an_fp32_copy():
    (hooked0, local0), (hooked1, local1) = run_ranks(_bf16_bucket, 2)
    values = torch.cat([t.float().reshape(-1) for t in local0 + local1 if t.dim() > 1])  # one bucket's blocks
    step = (values.max() - values.min()) / 255
    for hooked, other, l0, l1 in zip(hooked0, hooked1, local0, local1):
        assert hooked.dtype == torch.bfloat16 and torch.equal(hooked, other)
        exact = (l0.float() + l1.float()) / 2
        allowed = step + exact.abs().max() / 128  # a quantization step, and bf16's rounding
        assert (hooked.float() - exact).abs().max() <= allowed


def _unused_parameters(rank, world):
    torch.manual_seed(0)
    base = Branchy()
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours = DataParallel(ours_module, algorithm="bytegrad", bucket_size_mb=BIG_BUCKET_MB)
    ddp = DDP(ddp_module, bucket_cap_mb=BIG_BUCKET_MB, find_unused_parameters=True)
    ddp.register_comm_hook(ByteGradHookState(ddp), bytegrad_hook)
    out = []
    for step in range(4):
        x, _ = rank_batch(rank, step, d_in=8)
        grads = []
        for model, module in ((ours, ours_module), (ddp, ddp_module)):
            module.zero_grad(set_to_none=True)
            model(x, uses_sometimes(rank, step)).square().mean().backward()
            grads.append({name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()})
        out.append(grads)
    return out


def test_find_unused_parameters():
    for steps in run_ranks(_unused_parameters, 2):
        for ours, theirs in steps:
            assert ours.keys() == theirs.keys()
            assert theirs["never.weight"] is None and ours["never.weight"] is None  # no rank used it
            for name in ours:
                if ours[name] is not None:
                    assert torch.allclose(ours[name], theirs[name], atol=1e-6), name


def _resume(rank, world, other_layout):
    """3 steps, save, 3 more: against a fresh model, DDP and state loaded from the save, 3 steps."""
    options = {"error_feedback": True}

    def build(module):
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        ddp = DDP(module, bucket_cap_mb_list=[TENSOR_BUCKET_MB])
        state = ByteGradHookState(ddp, **options)
        ddp.register_comm_hook(state, bytegrad_hook)
        return ddp, opt, state

    module = small_mlp(seed=0)
    ddp, opt, state = build(module)
    for step in range(3):
        _step(ddp, module, opt, rank, step)
    saved = copy.deepcopy({"model": module.state_dict(), "optimizer": opt.state_dict(), "hook": state.state_dict()})
    for step in range(3, 6):
        _step(ddp, module, opt, rank, step)
    straight = [p.detach().clone() for p in module.parameters()]

    resumed_module = small_mlp(seed=1)
    resumed_module.load_state_dict(saved["model"])
    if other_layout:  # one bucket, where the saved ones held a tensor each: the residuals fold
        ddp2 = DDP(resumed_module, bucket_cap_mb=BIG_BUCKET_MB)
        opt2 = torch.optim.SGD(resumed_module.parameters(), lr=0.1, momentum=0.9)
        state2 = ByteGradHookState(ddp2, **options)
        ddp2.register_comm_hook(state2, bytegrad_hook)
    else:
        ddp2, opt2, state2 = build(resumed_module)
    opt2.load_state_dict(saved["optimizer"])
    state2.load_state_dict(saved["hook"])
    for step in range(3, 6):
        _step(ddp2, resumed_module, opt2, rank, step)
    resumed = [p.detach().clone() for p in resumed_module.parameters()]
    return straight, resumed, len(state2.residuals), len(state2.layouts)


def test_checkpoint_round_trip_resumes_bit_for_bit():
    for straight, resumed, pending, _ in run_ranks(_resume, 2, args=(False,)):
        assert pending == 0
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)


def test_checkpoint_into_other_buckets_keeps_the_residuals():
    for straight, resumed, pending, layouts in run_ranks(_resume, 2, args=(True,)):
        assert layouts == 1 and pending == 0  # every parameter's residual was taken up by the new bucket
        for a, b in zip(straight, resumed):
            assert torch.allclose(a, b, atol=1e-2)


def test_fold_moves_the_owners_residual_to_what_it_sends():
    # 2 ranks, blocks of 2, one piece of 8: rank 0 owns elements 0-3, scaled by n = 2 when averaging
    sent, owned = torch.arange(8.0), torch.tensor([1.0, -1.0, 0.5, 0.0])
    assert fold_residuals(sent, owned, 2, 0, 2, 8).tolist() == [2, -1, 3, 3, 4, 5, 6, 7]
    assert fold_residuals(sent, owned, 2, 0, 2, 8, average=False).tolist() == [1, 0, 2.5, 3, 4, 5, 6, 7]
    # two pieces of 4 elements: rank 1 owns 2-3 of the first and 6-7 of the second
    assert fold_residuals(torch.zeros(8), owned, 2, 1, 2, 4).tolist() == [0, 0, 2, -2, 0, 0, 1, 0]


def _wire16(rank, world, wire, cap_mb):
    base = small_mlp(seed=0)
    ours_module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    ours = DataParallel(ours_module, algorithm="gradient_allreduce", wire_dtype=wire, bucket_size_mb=cap_mb)
    ddp = DDP(ddp_module, bucket_cap_mb_list=[cap_mb])
    state = Wire16HookState(wire_dtype=wire)
    ddp.register_comm_hook(state, wire16_hook)
    out = []
    for step in range(3):
        x, y = rank_batch(rank, step)
        pair = []
        for model, module in ((ours, ours_module), (ddp, ddp_module)):
            module.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            pair.append([p.grad.clone() for p in module.parameters()])
        out.append(pair)
    return out


@pytest.mark.parametrize("wire, cap_mb", [("bf16", BIG_BUCKET_MB), ("fp16", BIG_BUCKET_MB), ("bf16", TENSOR_BUCKET_MB)],
                         ids=["bf16", "fp16", "bf16-tensor-buckets"])
def test_wire16_hook_equals_dataparallel_16bit_wire(wire, cap_mb):
    """One bucket, and a bucket per tensor: small_mlp's two 16-element biases are then buckets of one size
    in flight together, each with its own message."""
    for steps in run_ranks(_wire16, 2, args=(wire, cap_mb)):
        for ours, theirs in steps:
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b)


def _bad_state(rank, world):
    module = small_mlp()
    errors = []
    for make in (lambda: ByteGradHookState(module, block_size=12),
                 lambda: Wire16HookState(wire_dtype="int8"),
                 lambda: ByteGradHookState(module, timeout_s=0)):
        try:
            make()
        except ValueError as exc:
            errors.append(str(exc))
    subgroup = torch.distributed.new_group([0])  # collective: every rank makes it
    if rank == 0:
        try:
            ByteGradHookState(module, subgroup)
        except ValueError as exc:
            errors.append(str(exc))
    state = ByteGradHookState(module, error_feedback=True)
    for bad in ({"version": 99}, {**state.state_dict(), "options": {**state.options(), "block_size": 8}},
                {**state.state_dict(), "residuals": {"nope.weight": torch.zeros(1)}}):
        try:
            state.load_state_dict(bad)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def test_bad_options_and_states_are_refused_in_one_line(caplog):
    errors = run_ranks(_bad_state, 2)[0]
    assert len(errors) == 7
    assert "block_size must be a positive multiple of 8, got 12" in errors[0]
    assert "wire_dtype must be one of bf16, fp16, got 'int8'" in errors[1]
    assert "timeout_s must be > 0" in errors[2]
    assert "a hook state over a subgroup (1 of 2 ranks) is not supported" in errors[3]
    assert "version 1" in errors[4] and "block_size" in errors[5] and "nope.weight" in errors[6]
    with pytest.raises(RuntimeError, match="needs an initialized process group"):
        ByteGradHookState(small_mlp())


def _other_rank_state(rank, world):
    module = small_mlp()
    state = ByteGradHookState(module, error_feedback=True)
    saved = {**state.state_dict(), "rank": 1 - rank, "residuals": {"0.weight": torch.ones(16, 8)}}
    logging.basicConfig()
    state.load_state_dict(saved)
    return len(state.residuals)


def test_residuals_of_another_rank_start_at_zero():
    assert run_ranks(_other_rank_state, 2) == [0, 0]


def test_the_module_examples_run():
    import doctest

    from thinkscale.relax import hooks

    result = doctest.testmod(hooks, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0

"""QAdam: warm-up equals Adam + allreduce (and torch DDP + Adam), the compressed phase by hand (v tracked
from the recovered gradient, or frozen), weight decay after warm-up, warmup_steps=0, config errors."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_harness import run_ranks
from relax_models import least_squares, params_vector, rank_batch, small_mlp
from thinkscale.relax import DataParallel, algorithms
from thinkscale.relax.algorithms import QAdam, QAdamOptimizer
from thinkscale.relax.algorithms.qadam import recover_gradient_

LR, WD, BETAS, EPS = 1e-2, 0.01, (0.9, 0.999), 1e-8


def _step_all(pairs, x, y):
    """One training step of each (model, optimizer) pair on the same batch."""
    for model, opt in pairs:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# ----- single process: the optimizer's math ----------------------------------------------------------
@pytest.mark.parametrize("warmup", [10, 2])  # all 6 steps warm-up; 4 compressed steps, v tracked
def test_optimizer_alone_equals_torch_adam(warmup):
    ours_module = small_mlp(seed=0)
    ref_module = copy.deepcopy(ours_module)
    ours = QAdamOptimizer(ours_module.parameters(), lr=LR, warmup_steps=warmup, weight_decay=WD)
    assert ours.second_moment == "tracked"  # the default
    ref = torch.optim.Adam(ref_module.parameters(), lr=LR, weight_decay=WD)
    for step in range(6):
        _step_all(((ours_module, ours), (ref_module, ref)), *rank_batch(0, step))
    assert ours.next_step_is_warmup == (warmup > 6)
    assert torch.equal(params_vector(ours_module), params_vector(ref_module))


def test_recover_gradient_inverts_the_momentum_update():
    previous = torch.tensor([0.5, -2.0, 0.0])
    g = torch.tensor([1.0, 3.0, -0.25])
    m = 0.9 * previous + 0.1 * g
    recover_gradient_(previous, m, 0.9)
    assert torch.allclose(previous, g, atol=1e-6, rtol=0)


def _scalar_qadam_reference(x, grads, lr, warmup, beta1, beta2, eps, wd):
    """The documented update rule with a frozen v for one scalar, in Python floats."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        g = g + wd * x
        m = beta1 * m + (1 - beta1) * g
        if t <= warmup or t == 1:  # v: Adam during warm-up; initialised at step 1 when warmup == 0
            v = beta2 * v + (1 - beta2) * g * g
        x = x - lr / (1 - beta1 ** t) * m / ((v / (1 - beta2 ** t)) ** 0.5 + eps)
    return x, m, v


@pytest.mark.parametrize("warmup", [0, 2])
def test_zero_gradient_parameter_decays_by_the_formula_after_warmup(warmup):
    start = [2.0, -1.0]
    p = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = QAdamOptimizer([p], lr=0.1, warmup_steps=warmup, weight_decay=0.5, second_moment="frozen")
    for _ in range(5):
        p.grad = torch.zeros_like(p)
        opt.step()
    for i, x0 in enumerate(start):
        x, m, v = _scalar_qadam_reference(x0, [0.0] * 5, 0.1, warmup, *BETAS, EPS, 0.5)
        assert p[i].item() == pytest.approx(x, rel=1e-12)
        assert opt.state[p]["exp_avg"][i].item() == pytest.approx(m, rel=1e-12)
        assert opt.state[p]["exp_avg_sq"][i].item() == pytest.approx(v, rel=1e-12)
    assert abs(p[0].item()) < 2.0 - 0.2  # it did shrink after warm-up (no decay would keep it near 2)


def test_switch_step_folds_in_its_gradient():
    grads = [0.3, -0.2, 0.5, 0.1]  # warm-up steps 1-2, switch at step 3
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = QAdamOptimizer([p], lr=0.05, warmup_steps=2, weight_decay=WD, second_moment="frozen")
    for g in grads:
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    x, m, v = _scalar_qadam_reference(1.0, grads, 0.05, 2, *BETAS, EPS, WD)
    assert p.item() == pytest.approx(x, rel=1e-12)
    assert opt.state[p]["exp_avg"].item() == pytest.approx(m, rel=1e-12)
    assert opt.state[p]["exp_avg_sq"].item() == pytest.approx(v, rel=1e-12)  # frozen after step 2


def _least_squares_loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("second_moment", ["tracked", "frozen"])
def test_warmup_zero_alone_trains_without_nan(second_moment):
    x, y = least_squares(0)
    model = nn.Linear(10, 1)
    opt = QAdamOptimizer(model.parameters(), lr=0.1, warmup_steps=0, second_moment=second_moment)
    first = _least_squares_loss(model, x, y).item()
    for _ in range(60):
        opt.zero_grad()
        _least_squares_loss(model, x, y).backward()
        opt.step()
    last = _least_squares_loss(model, x, y).item()
    assert torch.isfinite(params_vector(model)).all()
    assert last < 0.05 * first, (first, last)


def test_state_dict_round_trip_restores_the_phase():
    module = small_mlp()
    opt = QAdamOptimizer(module.parameters(), warmup_steps=3)
    for step in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(module(rank_batch(0, step)[0]), rank_batch(0, step)[1]).backward()
        opt.step()
    fresh = QAdamOptimizer(module.parameters(), warmup_steps=3)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.steps_taken == 4 and not fresh.next_step_is_warmup


# ----- configuration ----------------------------------------------------------------------------------
def test_config_takes_hyper_parameters_from_the_optimizer():
    module = small_mlp()
    opt = QAdamOptimizer(module.parameters(), lr=3e-3, warmup_steps=7, weight_decay=0.1, second_moment="frozen")
    config = QAdam(opt)
    assert (config.lr, config.warmup_steps, config.betas, config.weight_decay) == (3e-3, 7, BETAS, 0.1)
    assert config.second_moment == "frozen"
    DataParallel(module, opt, algorithm=config)  # same optimizer: fine
    DataParallel(module, opt, algorithm="qadam", lr=3e-3)  # matching explicit value: fine
    assert isinstance(algorithms.resolve("qadam"), QAdam)


def test_config_errors():
    module = small_mlp()
    opt = QAdamOptimizer(module.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="needs a thinkscale.relax.algorithms.QAdamOptimizer, got Adam"):
        DataParallel(module, torch.optim.Adam(module.parameters()), algorithm="qadam")
    with pytest.raises(ValueError, match="lr=0.5 differs from the optimizer's lr=0.001"):
        DataParallel(module, opt, algorithm="qadam", lr=0.5)
    with pytest.raises(ValueError, match="warmup_steps=5 differs"):
        QAdam(opt, warmup_steps=5)
    with pytest.raises(ValueError, match="second_moment='frozen' differs from the optimizer's second_moment='tracked'"):
        QAdam(opt, second_moment="frozen")
    with pytest.raises(ValueError, match="second_moment must be 'tracked' or 'frozen', got 'fixed'"):
        QAdamOptimizer(module.parameters(), second_moment="fixed")
    other = QAdamOptimizer(module.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="different optimizer"):
        DataParallel(module, other, algorithm=QAdam(opt))
    with pytest.raises(ValueError, match="needs the optimizer"):
        DataParallel(module, None, algorithm="qadam")
    with pytest.raises(ValueError, match="eps must be > 0"):
        QAdamOptimizer(module.parameters(), eps=0.0)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        QAdamOptimizer(module.parameters(), warmup_steps=-1)


# ----- distributed ------------------------------------------------------------------------------------
def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    return [p.grad.detach().clone() for p in module.parameters()]


def _qadam_ranks(rank, world):
    out = {}
    # A: 5 warm-up steps against torch DDP + torch Adam (different init per rank: broadcast fixes it).
    base = small_mlp(seed=rank)
    module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
    opt = QAdamOptimizer(module.parameters(), lr=LR, warmup_steps=6, weight_decay=WD)
    model = DataParallel(module, opt, algorithm="qadam", bucket_size_mb=0.0005)  # several buckets
    ddp = DDP(ddp_module)
    ddp_opt = torch.optim.Adam(ddp.parameters(), lr=LR, weight_decay=WD)
    for step in range(5):
        _step_all(((model, opt), (ddp, ddp_opt)), *rank_batch(rank, step))
    out["warmup_diff"] = (params_vector(module) - params_vector(ddp_module)).abs().max().item()
    out["buckets"] = len(model.buckets)

    # A': step 6 (last warm-up), then the switch step 7 checked by hand.
    for step in (5, 6):
        if step == 6:
            params = list(module.parameters())
            x6 = [p.detach().clone() for p in params]
            m6 = [opt.state[p]["exp_avg"].clone() for p in params]
            v6 = [opt.state[p]["exp_avg_sq"].clone() for p in params]
            ref = copy.deepcopy(module)
            x, y = rank_batch(rank, step)
            local = _grads(ref, nn.functional.mse_loss(ref(x), y))
            # expected averaged momentum: mean over ranks of beta1 m + (1 - beta1)(g_r + wd x)
            expected_m = [BETAS[0] * m + (1 - BETAS[0]) * (g + WD * w) for m, g, w in zip(m6, local, x6)]
            for t in expected_m:
                torch.distributed.all_reduce(t)
                t /= world
        x, y = rank_batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    m7 = [opt.state[p]["exp_avg"] for p in params]
    v7 = [opt.state[p]["exp_avg_sq"] for p in params]
    t = 7
    formula = [w - LR / (1 - BETAS[0] ** t) * m / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
               for w, m, v in zip(x6, m7, v7)]
    out["switch_m_err"] = max((a - b).abs().max().item() for a, b in zip(m7, expected_m))
    # what dropping the switch step's gradient would give instead
    out["switch_m_without_grad"] = max((a - BETAS[0] * b).abs().max().item() for a, b in zip(m7, m6))
    out["switch_m_range"] = max((m.max() - m.min()).item() for m in expected_m)
    out["switch_x_err"] = max((p.detach() - f).abs().max().item() for p, f in zip(params, formula))
    # v tracked: Adam's update with the gradient recovered from the two averaged momenta, and that
    # gradient is the true mean gradient up to the 8-bit error of m magnified by 1 / (1 - beta1)
    recovered = [(m - BETAS[0] * b) / (1 - BETAS[0]) for m, b in zip(m7, m6)]
    expected_v = [BETAS[1] * v + (1 - BETAS[1]) * g * g for v, g in zip(v6, recovered)]
    out["switch_v_err"] = max(((a - b).abs() / (b + 1e-12)).max().item() for a, b in zip(v7, expected_v))
    true_g = [(e - BETAS[0] * b) / (1 - BETAS[0]) for e, b in zip(expected_m, m6)]
    out["switch_g_err"] = max((a - b).abs().max().item() for a, b in zip(recovered, true_g))

    # B: a regression task keeps improving after warm-up; a zero-gradient parameter decays by the rule.
    torch.manual_seed(0)
    lin = nn.Linear(10, 1)
    lin.register_parameter("idle", nn.Parameter(torch.tensor([2.0, -1.0])))
    opt_b = QAdamOptimizer(lin.parameters(), lr=0.1, warmup_steps=5, weight_decay=0.5, second_moment="frozen")
    model_b = DataParallel(lin, opt_b, algorithm="qadam", bucket_size_mb=1e-6)  # a bucket per tensor
    xb, yb = least_squares(rank)
    losses = []
    for _ in range(40):
        opt_b.zero_grad()
        loss = nn.functional.mse_loss(model_b(xb), yb) + 0.0 * lin.idle.sum()
        loss.backward()
        opt_b.step()
        losses.append(loss.item())
    out["b_losses"] = losses
    out["b_params"] = params_vector(lin)

    # C: warmup_steps=0, frozen v; v after step 1 = (1 - beta2) * (full-precision mean gradient)^2.
    torch.manual_seed(1)
    lin_c = nn.Linear(10, 1)
    opt_c = QAdamOptimizer(lin_c.parameters(), lr=0.1, warmup_steps=0, second_moment="frozen")
    model_c = DataParallel(lin_c, opt_c, algorithm="qadam")
    ref_c = copy.deepcopy(lin_c)
    mean_g = _grads(ref_c, nn.functional.mse_loss(ref_c(xb), yb))
    for g in mean_g:
        torch.distributed.all_reduce(g)
        g /= world
    losses_c = []
    for step in range(60):
        opt_c.zero_grad()
        loss = nn.functional.mse_loss(model_c(xb), yb)
        loss.backward()
        opt_c.step()
        losses_c.append(loss.item())
        if step == 0:
            out["c_v_err"] = max((opt_c.state[p]["exp_avg_sq"] - (1 - BETAS[1]) * g * g).abs().max().item()
                                 for p, g in zip(lin_c.parameters(), mean_g))
    out["c_losses"] = losses_c
    out["c_params"] = params_vector(lin_c)

    # D: after a short warm-up on the MLP, tracked v stays next to DDP + Adam, frozen v drifts away.
    for rule in ("tracked", "frozen"):
        base = small_mlp(seed=0)
        module, ddp_module = copy.deepcopy(base), copy.deepcopy(base)
        opt_d = QAdamOptimizer(module.parameters(), lr=LR, warmup_steps=2, second_moment=rule)
        model_d = DataParallel(module, opt_d, algorithm="qadam")
        ddp = DDP(ddp_module)
        ddp_opt = torch.optim.Adam(ddp.parameters(), lr=LR)
        for step in range(20):
            _step_all(((model_d, opt_d), (ddp, ddp_opt)), *rank_batch(rank, step))
        moved = (params_vector(ddp_module) - params_vector(base)).norm()
        out[f"d_{rule}_distance"] = ((params_vector(module) - params_vector(ddp_module)).norm() / moved).item()
        out[f"d_{rule}_params"] = params_vector(module)
    return out


def test_qadam_two_ranks():
    results = run_ranks(_qadam_ranks, 2, timeout=180)
    r0, r1 = results
    for r in results:
        # warm-up: exactly DDP + Adam
        assert r["buckets"] > 1
        assert r["warmup_diff"] < 1e-6, r["warmup_diff"]
        # switch step: its gradient is in m (up to two 8-bit quantizations of values within the range)
        assert r["switch_m_err"] <= 2 * r["switch_m_range"] / 255 + 1e-6, r
        assert r["switch_m_without_grad"] > 10 * r["switch_m_err"], r
        assert r["switch_x_err"] < 1e-6, r
        assert r["switch_v_err"] < 1e-5, r
        assert r["switch_g_err"] <= 2 * r["switch_m_range"] / 255 / (1 - BETAS[0]) + 1e-5, r
        # regression after warm-up keeps falling, no NaN
        losses = r["b_losses"]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < 0.1 * losses[0] and losses[-1] < 0.5 * losses[5], losses  # step 5: warm-up ends
        # warmup_steps=0
        assert r["c_v_err"] < 1e-7, r["c_v_err"]
        assert torch.isfinite(torch.tensor(r["c_losses"])).all()
        assert r["c_losses"][-1] < 0.05 * r["c_losses"][0], r["c_losses"]
    # ByteGrad leaves every rank bit-identical, so replicas never drift apart
    assert torch.equal(r0["b_params"], r1["b_params"])
    assert torch.equal(r0["c_params"], r1["c_params"])
    assert torch.equal(r0["d_tracked_params"], r1["d_tracked_params"])
    print("distance to DDP + Adam, relative to the distance moved:", r0["d_tracked_distance"], r0["d_frozen_distance"])
    assert r0["d_tracked_distance"] < 0.05, r0["d_tracked_distance"]
    assert r0["d_tracked_distance"] < 0.5 * r0["d_frozen_distance"], (r0["d_tracked_distance"], r0["d_frozen_distance"])
    # zero-gradient parameter after warm-up: decays as the single-process formula says (m is exchanged
    # through 8-bit quantization, hence the tolerance: its block holds both values and zero padding, so
    # each exchanged m is off by up to (max - min) / 255 of that block, ~0.4 % here)
    idle = r0["b_params"][-2:]
    for value, x0 in zip(idle.tolist(), [2.0, -1.0]):
        x, _, _ = _scalar_qadam_reference(x0, [0.0] * 40, 0.1, 5, *BETAS, EPS, 0.5)
        assert value == pytest.approx(x, rel=1e-2)


def _hierarchical(rank, world):
    torch.manual_seed(0)
    lin = nn.Linear(10, 1)
    opt = QAdamOptimizer(lin.parameters(), lr=0.1, warmup_steps=2)
    model = DataParallel(lin, opt, algorithm="qadam")
    x, y = least_squares(rank)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.topology.hierarchical, losses, params_vector(lin)


def test_qadam_hierarchical_four_ranks():
    results = run_ranks(_hierarchical, 4, env={"LOCAL_WORLD_SIZE": "2"}, timeout=180)
    for hierarchical, losses, params in results:
        assert hierarchical
        assert losses[-1] < 0.5 * losses[0], losses
        assert torch.equal(params, results[0][2])


def test_training_asks_the_algorithm_for_its_optimizer():
    from thinkscale.relax import algorithms
    from thinkscale.train.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    qadam = make_optimizer(params, "qadam", 1e-3, 0.01, total_steps=50)
    assert isinstance(qadam, QAdamOptimizer) and qadam.warmup_steps == 10 and qadam.defaults["weight_decay"] == 0.01
    assert type(make_optimizer(params, "bytegrad", 1e-3, 0.0, total_steps=50)) is torch.optim.AdamW
    assert {n for n in algorithms.names() if algorithms.REGISTRY[n].quantizes} == {
        "bytegrad", "qadam", "low_precision_decentralized"}
    assert algorithms.QAdam.for_optimizer(qadam).warmup_steps == 10  # the config records what runs

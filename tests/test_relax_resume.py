"""Checkpoint/resume: algorithm state travels in DataParallel.state_dict() (nn.Module extra state), so a
run interrupted after 3 steps and resumed from a checkpoint ends bit-identical to an uninterrupted run."""
import copy
import io

import pytest
import torch
from torch import nn

from distributed_harness import run_ranks
from relax_models import params_vector, rank_batch, small_mlp
from thinkscale.relax import DataParallel

CONFIGS = {
    "gradient_allreduce": {"algorithm": "gradient_allreduce"},
    # n = 4: pairings differ between even and odd k, so a lost communication counter shows up
    "shift_one": {"algorithm": "decentralized", "peer_selection_mode": "shift_one", "hierarchical": False},
    # interval 2: communication steps depend on the restored iteration counter
    "low_precision": {"algorithm": "low_precision_decentralized", "hierarchical": False,
                      "communication_interval": 2, "bucket_size_mb": 0.0005},
}


def _build(seed, options):
    module = small_mlp(seed=seed)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    return module, opt, DataParallel(module, opt, **options)


def _train(rank, model, opt, steps):
    for step in steps:
        x, y = rank_batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _save(model, opt) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    return buffer.getvalue()


def _load(data: bytes) -> dict:
    return torch.load(io.BytesIO(data))  # the default weights_only=True must accept algorithm state


def _resume_scenario(rank, options):
    module, opt, model = _build(0, options)
    _train(rank, model, opt, range(6))
    straight = params_vector(module)
    model.close()

    module, opt, model = _build(0, options)
    _train(rank, model, opt, range(3))
    checkpoint = _save(model, opt)
    saved_algorithm_state = copy.deepcopy(model.algorithm_state_dict())
    model.close()

    # a fresh process would start from another init: the checkpoint must bring everything back
    module, opt, model = _build(50 + rank, options)
    state = _load(checkpoint)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    restored = copy.deepcopy(model.algorithm_state_dict())  # replicas are live references
    _train(rank, model, opt, range(3, 6))
    resumed = params_vector(module)
    model.close()

    # control: weights and optimizer only (algorithm state lost) must NOT reproduce the straight run
    module, opt, model = _build(50 + rank, options)
    state = _load(checkpoint)
    model.module.load_state_dict({k[len("module."):]: v for k, v in state["model"].items()
                                  if k.startswith("module.")})
    opt.load_state_dict(state["optimizer"])
    _train(rank, model, opt, range(3, 6))
    without_state = params_vector(module)
    model.close()
    return {"straight": straight, "resumed": resumed, "without_state": without_state,
            "saved": saved_algorithm_state, "restored": restored}


def _wrong_rank_error(rank):
    """A low_precision_decentralized checkpoint holds one rank's ring replicas: another rank refuses it."""
    module, opt, model = _build(0, CONFIGS["low_precision"])
    _train(rank, model, opt, range(1))
    state = _load(_save(model, opt))["model"]
    state["_extra_state"]["state"]["rank"] = (rank + 1) % model.world_size
    try:
        model.load_state_dict(state)
        return None
    except ValueError as exc:
        return str(exc)
    finally:
        model.close()


def _world4(rank, world):
    results = {name: _resume_scenario(rank, options) for name, options in CONFIGS.items()}
    results["wrong_rank_error"] = _wrong_rank_error(rank)
    return results


@pytest.fixture(scope="module")
def world4():
    return run_ranks(_world4, 4, timeout=240)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_run_equals_uninterrupted_run(world4, name):
    for rank, result in enumerate(world4):
        res = result[name]
        assert torch.equal(res["resumed"], res["straight"]), (name, rank)
    if name != "gradient_allreduce":  # decentralized replicas really differ per rank
        assert not torch.equal(world4[0][name]["straight"], world4[1][name]["straight"])


@pytest.mark.parametrize("name", ["shift_one", "low_precision"])
def test_losing_algorithm_state_changes_the_run(world4, name):
    # the control that makes the test above meaningful: the state in the checkpoint matters
    assert any(not torch.equal(r[name]["without_state"], r[name]["straight"]) for r in world4)


def test_restored_state_holds_counters_and_replicas(world4):
    for result in world4:
        for name in CONFIGS:
            saved, restored = result[name]["saved"], result[name]["restored"]
            assert restored["steps_taken"] == saved["steps_taken"] == 3
        assert result["shift_one"]["restored"]["state"] == {"communications": 3}
        saved = result["low_precision"]["saved"]["state"]["replicas"]
        restored = result["low_precision"]["restored"]["state"]["replicas"]
        assert len(saved) == len(restored) > 1
        for triple_saved, triple_restored in zip(saved, restored):
            assert all(torch.equal(a, b) for a, b in zip(triple_saved, triple_restored))


def test_checkpoint_of_another_rank_is_refused(world4):
    for result in world4:
        assert "save and load one checkpoint per rank" in result["wrong_rank_error"]


def test_checkpoint_of_another_algorithm_is_refused():
    module = small_mlp()
    source = DataParallel(module, torch.optim.SGD(module.parameters(), lr=0.1), algorithm="gradient_allreduce")
    target_module = small_mlp()
    target = DataParallel(target_module, torch.optim.SGD(target_module.parameters(), lr=0.1),
                          algorithm="decentralized")
    with pytest.raises(ValueError, match="algorithm 'gradient_allreduce'.*runs 'decentralized'.*strict=False"):
        target.load_state_dict(source.state_dict())


# ----- issue 10: QAdam through the wrapper, async under its lock, another algorithm's checkpoint -----
def _qadam_build(seed):
    from thinkscale.relax.algorithms import QAdamOptimizer

    module = small_mlp(seed=seed)
    opt = QAdamOptimizer(module.parameters(), lr=1e-2, warmup_steps=2, weight_decay=0.01)
    return module, opt, DataParallel(module, opt, algorithm="qadam", hierarchical=False)


def _qadam_resume(rank):
    module, opt, model = _qadam_build(0)
    _train(rank, model, opt, range(6))
    straight = params_vector(module)
    model.close()
    module, opt, model = _qadam_build(0)
    _train(rank, model, opt, range(3))  # past warm-up: the checkpoint holds compressed-phase moments
    checkpoint = _save(model, opt)
    model.close()
    module, opt, model = _qadam_build(50 + rank)
    state = _load(checkpoint)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    _train(rank, model, opt, range(3, 6))
    resumed = params_vector(module)
    model.close()
    return straight, resumed


def _async_state_dict_waits_for_the_averager(rank):
    """A thread plays the averager mid-write (holding the weight lock, weights half updated): a
    state_dict taken meanwhile must wait for the write to finish, and hold copies afterwards."""
    import threading
    import time

    module = small_mlp(seed=0)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    model = DataParallel(module, opt, algorithm="async", sync_interval_ms=60_000)
    lock, holding = model._impl.lock, threading.Event()

    def averager_write():
        lock.acquire_averager(threading.Event())
        holding.set()
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
                time.sleep(0.05)  # a reader without the lock would see some tensors updated, some not
        lock.release()

    before = params_vector(module)
    writer = threading.Thread(target=averager_write)
    writer.start()
    holding.wait()
    state = model.state_dict()
    writer.join()
    taken = torch.cat([state[f"module.{name}"].reshape(-1) for name, _ in module.named_parameters()])
    with torch.no_grad():
        for p in module.parameters():
            p.add_(5.0)  # the checkpoint holds copies: later training does not change it
    after = torch.cat([state[f"module.{name}"].reshape(-1) for name, _ in module.named_parameters()])
    model.close()
    return {"complete_write": torch.equal(taken, before + 1.0), "copies": torch.equal(after, taken)}


def _world2(rank, world):
    return {"qadam": _qadam_resume(rank), "async": _async_state_dict_waits_for_the_averager(rank)}


@pytest.fixture(scope="module")
def world2():
    return run_ranks(_world2, 2, timeout=120)


def test_qadam_resume_through_the_wrapper_continues_identically(world2):
    for result in world2:
        straight, resumed = result["qadam"]
        assert torch.equal(resumed, straight)
    assert torch.equal(world2[0]["qadam"][0], world2[1]["qadam"][0])


def test_async_state_dict_never_reads_weights_mid_write(world2):
    for result in world2:
        assert result["async"] == {"complete_write": True, "copies": True}


def test_checkpoint_of_another_algorithm_with_strict_false_loads_weights_and_says_so(caplog):
    module = small_mlp(seed=1)
    source = DataParallel(module, torch.optim.SGD(module.parameters(), lr=0.1), algorithm="gradient_allreduce")
    target_module = small_mlp(seed=2)
    target = DataParallel(target_module, torch.optim.SGD(target_module.parameters(), lr=0.1),
                          algorithm="decentralized")
    with caplog.at_level("WARNING", logger="thinkscale.relax.wrapper"):
        result = target.load_state_dict(source.state_dict(), strict=False)
    assert torch.equal(params_vector(target_module), params_vector(module))
    assert result.missing_keys == ["_extra_state"]
    assert "'gradient_allreduce', this model runs 'decentralized'" in caplog.text

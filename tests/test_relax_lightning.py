"""RelaxStrategy in real Lightning `Trainer.fit` runs on 2 CPU processes (tests/lightning_fit.py, launched
under torchrun and with plain `python`), against relax's own loop on the same model, data and optimizer."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distributed_harness import free_port, run_ranks
from relax_models import rank_batch, small_mlp
from thinkscale.relax import DataParallel, algorithms

SCRIPT = Path(__file__).with_name("lightning_fit.py")
STEPS = 6
ACCUMULATE = 2  # gradient accumulation through DataParallel.no_sync
# name -> (algorithm, options); qadam gets Adam from configure_optimizers and the strategy replaces it
RUNS = {
    "gradient_allreduce": ("gradient_allreduce", {}),
    "bytegrad_ef": ("bytegrad", {"error_feedback": True}),
    "qadam": ("qadam", {"warmup_steps": 2}),
    "decentralized": ("decentralized", {}),
    "async": ("async", {"sync_interval_ms": 5}),
}


def run_spec(name: str) -> str:
    algorithm, options = RUNS[name]
    items = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{name}:{algorithm}" + (f":{items}" if items else "")


def env() -> dict:
    # one thread per process, as torchrun sets it: the same float arithmetic under both launchers
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}


def fit(out: Path, *extra: str, torchrun: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 f"--master_port={free_port()}"] if torchrun else [sys.executable])
    return subprocess.run(launcher + [str(SCRIPT), "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=timeout, env=env())


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """Every run of RUNS in one torchrun launch (one Trainer.fit each), with a checkpoint at each epoch."""
    out = tmp_path_factory.mktemp("lightning")
    args = [a for name in RUNS for a in ("--fit", run_spec(name))]
    done = fit(out, *args, "--steps", str(STEPS), "--accumulate", str(ACCUMULATE), "--checkpoint-every-epoch",
               torchrun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _our_loop(rank, world, algorithm, options):
    torch.set_num_threads(1)
    module = small_mlp(seed=0)
    config = algorithms.REGISTRY[algorithm]
    optimizer = config.make_optimizer(module.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0,
                                      total_steps=STEPS, **{k: v for k, v in options.items() if k == "warmup_steps"})
    optimizer = optimizer or torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    model = DataParallel(module, optimizer, algorithm=config.for_optimizer(optimizer, **options), timeout_s=60)
    batches = [rank_batch(rank, i) for i in range(3 * ACCUMULATE)]
    for step in range(STEPS):
        optimizer.zero_grad()
        for micro in range(ACCUMULATE):
            x, y = batches[(step * ACCUMULATE + micro) % len(batches)]
            with model.no_sync() if micro < ACCUMULATE - 1 else torch.enable_grad():
                (nn.functional.mse_loss(model(x), y) / ACCUMULATE).backward()
        optimizer.step()
    model.close()
    return module.state_dict()


@pytest.mark.parametrize("name", ["gradient_allreduce", "bytegrad_ef", "qadam", "decentralized"])
def test_lightning_fit_equals_our_loop(lightning_runs, name):
    algorithm, options = RUNS[name]
    ours = run_ranks(_our_loop, 2, args=(algorithm, options))
    for rank in range(2):  # decentralized replicas differ by rank: each against its own
        theirs = torch.load(lightning_runs / f"{name}.rank{rank}.pt")
        for key, value in ours[rank].items():
            assert torch.allclose(theirs[key], value, atol=1e-6, rtol=0), (name, rank, key)
    if name == "qadam":  # the strategy replaced Adam by the algorithm's optimizer
        assert '"optimizer": "QAdamOptimizer"' in (lightning_runs / "qadam.json").read_text()


def test_checkpoints_hold_every_ranks_algorithm_state(lightning_runs):
    for name, (algorithm, _) in RUNS.items():
        checkpoint = torch.load(lightning_runs / f"{name}-step=3.ckpt", weights_only=False)
        relax = checkpoint["relax"]
        assert relax["world_size"] == 2 and len(relax["per_rank"]) == 2
        assert all(state["algorithm"] == algorithm for state in relax["per_rank"])
        assert set(checkpoint["state_dict"]) == {f"net.{k}" for k in small_mlp().state_dict()}
    ef = torch.load(lightning_runs / "bytegrad_ef-step=3.ckpt", weights_only=False)["relax"]["per_rank"]
    assert [s["state"]["rank"] for s in ef] == [0, 1]  # each rank's own residuals


def test_killed_run_resumed_from_lightning_checkpoint_ends_as_uninterrupted(lightning_runs, tmp_path):
    """Plain `python` launch (Lightning starts the second process): killed at step 4, resumed from the
    step-3 checkpoint, the weights equal the uninterrupted run's (error-feedback residuals included)."""
    spec = ["--fit", run_spec("bytegrad_ef"), "--steps", str(STEPS), "--accumulate", str(ACCUMULATE)]
    killed = fit(tmp_path, *spec, "--checkpoint-every-epoch", "--kill-at", "4")
    assert killed.returncode == 3, killed.stderr[-3000:]
    assert not (tmp_path / "bytegrad_ef.rank0.pt").exists()
    resumed = fit(tmp_path, *spec, "--resume", str(tmp_path / "bytegrad_ef-step=3.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in range(2):
        straight = torch.load(lightning_runs / f"bytegrad_ef.rank{rank}.pt")
        again = torch.load(tmp_path / f"bytegrad_ef.rank{rank}.pt")
        for key in straight:
            assert torch.equal(straight[key], again[key]), (rank, key)


def test_bad_strategy_options_fail_at_construction():
    from thinkscale.relax.lightning import RelaxStrategy

    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        RelaxStrategy("nope")
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 8"):
        RelaxStrategy("bytegrad", block_size=12)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        RelaxStrategy("bytegrad", timeout_s=0)


def test_the_module_examples_run():
    """check_accumulation: async refuses gradient accumulation (its averaging thread and no_sync)."""
    import doctest

    from thinkscale.relax import lightning

    result = doctest.testmod(lightning, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0

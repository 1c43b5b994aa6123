"""examples/train_relax.py runs end to end: under torchrun with 2 gloo ranks and under plain python."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_harness import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_relax.py"
# A tiny model keeps the run fast and every bucket below the quantizer's compile threshold.
TINY = ["--d-in", "16", "--hidden", "32", "--layers", "2", "--batch-size", "8", "--log-every", "2"]
LOSS_LINE = re.compile(r"^\[train_relax\] step (\d+)/(\d+) loss (\d+\.\d+) step_ms (\d+\.\d+)$", re.M)


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("algorithm", ["gradient_allreduce", "bytegrad"])
def test_torchrun_two_ranks(tmp_path, algorithm):
    out = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(EXAMPLE), "--algorithm", algorithm, "--steps", "5", "--json-out", str(out), *TINY]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = LOSS_LINE.findall(proc.stdout)
    # One line per --log-every 2 steps plus the last step, from rank 0 only.
    assert [int(step) for step, *_ in lines] == [2, 4, 5]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["algorithm"] == algorithm
    assert summary["params"] == 16 * 32 + 32 + 32 * 10 + 10
    assert len(summary["step_ms"]) == 5 and summary["timing_warmup"] == 1
    assert float(lines[-1][2]) == pytest.approx(summary["final_loss"], abs=1e-4)


def test_plain_python_world_size_one(tmp_path):
    out = tmp_path / "summary.json"
    proc = _run([sys.executable, str(EXAMPLE), "--algorithm", "bytegrad", "--steps", "3",
                 "--json-out", str(out), *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(LOSS_LINE.findall(proc.stdout)) == 2  # steps 2 and 3
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 1 and summary["backend"] is None


def _load_example():
    spec = importlib.util.spec_from_file_location("train_relax_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_arguments_are_rejected_with_the_allowed_values(capsys):
    example = _load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--algorithm", "no_such_algorithm"])
    err = capsys.readouterr().err
    assert "unknown --algorithm 'no_such_algorithm'" in err and "gradient_allreduce" in err and "ddp" in err
    with pytest.raises(SystemExit, match="has no option"):
        example.algorithm_options(example.parse_args(["--algorithm", "bytegrad", "--warmup-steps", "3"]))
    args = example.parse_args(["--algorithm", "bytegrad", "--hierarchical", "false", "--steps", "10"])
    assert example.algorithm_options(args) == {"hierarchical": False}
    assert args.lr == 0.05 and args.timing_warmup == 2


def test_qadam_gets_its_optimizer_and_options():
    example = _load_example()
    from thinkscale.relax import algorithms
    from torch import nn

    args = example.parse_args(["--algorithm", "qadam", "--warmup-steps", "7"])
    optimizer = example.make_optimizer(args, nn.Linear(2, 2).parameters())
    assert isinstance(optimizer, algorithms.QAdamOptimizer)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.warmup_steps == 7
    assert example.algorithm_options(args) == {"warmup_steps": 7, "lr": 1e-3}
    sgd = example.make_optimizer(example.parse_args(["--algorithm", "ddp"]), nn.Linear(2, 2).parameters())
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9

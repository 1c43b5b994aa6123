"""Training that survives failures (issue 14): periodic checkpoints, exact resume, and a worker killed
with SIGKILL mid-run that the launcher restarts - through the real CLI, in SFT and in GRPO - ending
bit-identical to an uninterrupted run (gradient_allreduce on CPU)."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from distributed_harness import descendants
from thinkscale.cli import main
from thinkscale.commands import sft as sft_command
from thinkscale.tasks.policy import PolicyConfig
from thinkscale.train import checkpoint
from thinkscale.train.sft import SFTOptions, run_sft

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY = ["--hidden-size", "32", "--layers", "2", "--heads", "2"]
SFT_ARGS = ["--num-train", "256", "--num-test", "4", "--num-hard", "0", *TINY, "--batch-size", "8", "--steps", "80",
            "--eval-questions", "0", "--nproc", "2", "--save-every", "10"]
GRPO_ARGS = ["--nproc", "2", "--steps", "12", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "12",
             "--eval-questions", "0", "--save-every", "2"]


def thinkscale(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinkscale", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def resumed_step(stderr: str) -> int:
    """The step the restarted workers resumed from, as they log it (a fresh start would pass the
    bit-identity checks too: this is what shows the checkpoint was used)."""
    found = re.findall(r"workers restarted after a failure \(restart 1\): resuming from step (\d+)", stderr)
    assert len(found) == 1, stderr[-3000:]
    return int(found[0])


def worker_pids(pid: int) -> list[int]:
    """The worker processes the launcher in process `pid` spawned (not its resource tracker)."""
    found = []
    for child in descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:  # exited meanwhile
            pass
    return sorted(found)


def run_and_kill_a_worker(args: list, out: Path, logs: Path, timeout: float = 240):
    """Start `thinkscale *args`, SIGKILL one of its workers (the first spawned, usually rank 0, the one
    that writes checkpoints) once the first checkpoint is on disk, and wait for the command to end. Returns (exit status, stderr, the newest checkpoint's step at the kill)."""
    stdout, stderr = open(logs / "stdout", "w+"), open(logs / "stderr", "w+")  # files: pipes could fill up
    proc = subprocess.Popen([sys.executable, "-m", "thinkscale", *map(str, args)], env=ENV, stdout=stdout,
                            stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not checkpoint.finished_checkpoints(out):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.02)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2 and not checkpoint.is_done(out)
        step_at_kill = checkpoint.finished_checkpoints(out)[-1][0]
        os.kill(workers[0], signal.SIGKILL)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr.seek(0)
    return proc.returncode, stderr.read(), step_at_kill


@pytest.fixture(scope="module")
def sft_uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "straight"
    result = thinkscale("sft", "--out", out, *SFT_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_checkpoints_are_periodic_kept_in_the_output_and_pruned(sft_uninterrupted):
    steps = [step for step, _ in checkpoint.finished_checkpoints(sft_uninterrupted)]
    assert steps == [70, 80]  # every 10 steps, the newest 2 kept (--keep-checkpoints default), carried into out
    state = checkpoint.load_state(checkpoint.checkpoint_path(sft_uninterrupted, 80))
    assert state["step"] == 80 and state["world_size"] == 2 and state["options"]["save_every"] == 10
    names = sorted(p.name for p in checkpoint.checkpoint_path(sft_uninterrupted, 80).iterdir())
    assert names == ["done", "rank0.pt", "rank1.pt", "shared.pt", "stage_state.json"]
    rank0 = torch.load(checkpoint.checkpoint_path(sft_uninterrupted, 80) / "rank0.pt", weights_only=True)
    assert set(rank0) >= {"model", "optimizer", "scheduler", "rng"}
    assert rank0["model"]["_extra_state"]["algorithm"] == "gradient_allreduce"  # relax state travels too


def test_sft_worker_killed_mid_run_restarts_and_ends_bit_identical(sft_uninterrupted, tmp_path):
    out = tmp_path / "killed"
    status, stderr, step_at_kill = run_and_kill_a_worker(["sft", "--out", out, *SFT_ARGS, "--max-restarts", "1"],
                                                         out, tmp_path)
    assert status == 0, stderr[-3000:]
    assert 10 <= step_at_kill <= resumed_step(stderr) < 80
    assert_bit_identical(weights(out), weights(sft_uninterrupted))


def test_grpo_worker_killed_mid_run_restarts_and_ends_bit_identical(sft_uninterrupted, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "killed"
    result = thinkscale("grpo", "--model", sft_uninterrupted, "--out", straight, *GRPO_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    status, stderr, step_at_kill = run_and_kill_a_worker(
        ["grpo", "--model", sft_uninterrupted, "--out", out, *GRPO_ARGS, "--max-restarts", "1"], out, tmp_path)
    assert status == 0, stderr[-3000:]
    assert 2 <= step_at_kill <= resumed_step(stderr) < 12
    assert_bit_identical(weights(out), weights(straight))
    assert_bit_identical(weights(out, "sprm_head.safetensors"), weights(straight, "sprm_head.safetensors"))
    # the metrics so far travel in the checkpoint: every step is in metrics.jsonl once, in order
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def tiny_options(out, **overrides):
    base = dict(out=str(out), num_train=128, num_test=4, num_hard=0, steps=6, batch_size=8, lr=3e-3, warmup_steps=2,
                log_every=2, eval_questions=0, save_every=2, keep_checkpoints=3,
                policy=PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    return SFTOptions(**{**base, **overrides})


def test_resume_from_a_mid_run_checkpoint_ends_bit_identical(tmp_path):
    straight = run_sft(tiny_options(tmp_path / "straight"))
    # what a run killed after step 4 leaves behind: its checkpoints, no finished output
    out = tmp_path / "resumed"
    shutil.copytree(checkpoint.checkpoint_path(tmp_path / "straight", 4), checkpoint.checkpoint_path(out, 4))
    resumed = run_sft(tiny_options(out, resume=True))
    assert_bit_identical(weights(out), weights(tmp_path / "straight"))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    step4 = torch.load(checkpoint.checkpoint_path(out, 4) / "rank0.pt", weights_only=True)["model"]
    assert any(not torch.equal(step4[f"module.{k}"], v) for k, v in weights(out).items())  # steps 5-6 did train


def test_a_checkpoint_is_whole_or_absent_and_only_a_written_one_prunes(tmp_path):
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {}, {}, keep=2)
    with pytest.raises(Exception):  # the write fails midway (a lambda cannot be saved), as on a full disk
        checkpoint.save_checkpoint(tmp_path, 3, {"w": torch.zeros(2), "bad": lambda: 0}, {}, {}, keep=2)
    assert [step for step, _ in checkpoint.finished_checkpoints(tmp_path)] == [1, 2]
    assert sorted(p.name for p in checkpoint.checkpoints_dir(tmp_path).iterdir()) == ["step-00000001", "step-00000002"]
    step, mine, _ = checkpoint.load_checkpoint(tmp_path, {})
    assert step == 2 and torch.equal(mine["w"], torch.full((2,), 2.0))
    checkpoint.save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {}, {}, keep=2)
    assert [step for step, _ in checkpoint.finished_checkpoints(tmp_path)] == [2, 3]


def test_a_fresh_run_forgets_older_checkpoints(tmp_path):
    out = tmp_path / "run"
    checkpoint.save_stage(checkpoint.checkpoint_path(out, 99), state={"step": 99})  # an older run's, "newer"
    run_sft(tiny_options(out, steps=2))
    assert checkpoint.finished_checkpoints(out) == [(2, checkpoint.checkpoint_path(out, 2))]


def test_cli_refuses_to_forget_or_mix_unfinished_runs(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "--out", str(out), *SFT_ARGS]
    parser = argparse.ArgumentParser()
    sft_command.add_arguments(parser)
    options = checkpoint.jsonable(asdict(sft_command.options_from_args(parser.parse_args(args[1:]))))
    checkpoint.save_stage(checkpoint.checkpoint_path(out, 5),
                          state={"step": 5, "world_size": 2, "options": {**options, "lr": 0.5}})
    assert main(args) == 2
    assert "holds checkpoints of an unfinished run (newest: step-00000005): add --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "step-00000005: written with other options (" in err and "lr 0.5 -> 0.002" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    args[args.index("--nproc") + 1] = "1"
    assert main(args + ["--resume", "--lr", "0.5"]) == 2
    assert "step-00000005: written by 2 workers, this run has 1; resume with --nproc 2" in capsys.readouterr().err

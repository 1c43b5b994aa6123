"""thinkscale.bench.relax_worker: 2 gloo ranks under torchrun on 127.0.0.1, tiny models."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_harness import free_port
from thinkscale.bench import relax_worker as rw

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
TINY_MLP = ["--mlp-d-in", "16", "--mlp-hidden", "32", "--mlp-layers", "3", "--batch-size", "8"]
TINY_PARAMS = 16 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
SHIFT_ONE = "decentralized:peer_selection_mode=shift_one,communication_interval=2"
FIELDS = {
    "workload", "contender", "algorithm", "options", "world_size", "params", "grad_bytes", "batch_size", "steps",
    "timing_warmup", "step_ms", "step_ms_max_over_ranks", "median_step_ms", "mean_step_ms", "losses_per_rank",
    "mean_loss_per_step", "final_loss", "eval_loss", "tx_bytes_per_step", "rx_bytes_per_step", "quantizer",
    "torch", "elapsed_s",
}


def _run(args: list[str], torchrun: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), "-m", "thinkscale.bench.relax_worker"] if torchrun
                else ["-m", "thinkscale.bench.relax_worker"])
    return subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


_cache: dict[str, dict] = {}


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """contender -> JSON summary of a 2-rank tiny mlp run (each contender run once per module)."""
    def get(contender: str) -> dict:
        if contender not in _cache:
            out = tmp_path_factory.mktemp("run") / "w.json"
            proc = _run(["--workload", "mlp", "--contender", contender, "--steps", str(STEPS), "--timing-warmup",
                         "2", "--iface", "lo", "--timeout-s", "60", "--json-out", str(out), *TINY_MLP])
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
            _cache[contender] = json.loads(out.read_text())
        return _cache[contender]

    return get


@pytest.mark.parametrize("contender", ["ddp", "ddp_fp16", "ddp_powersgd", "ddp_bytegrad", "bytegrad", SHIFT_ONE])
def test_mlp_contender_summary(mlp_run, contender):
    s = mlp_run(contender)
    assert FIELDS <= set(s)
    assert s["contender"] == contender and s["algorithm"] == contender.split(":")[0]
    assert s["world_size"] == 2 and s["params"] == TINY_PARAMS and s["grad_bytes"] == 4 * TINY_PARAMS
    assert s["batch_size"] == 8 and s["steps"] == STEPS and s["timing_warmup"] == 2
    assert len(s["step_ms"]) == len(s["step_ms_max_over_ranks"]) == STEPS
    assert all(m >= r for m, r in zip(s["step_ms_max_over_ranks"], s["step_ms"]))
    assert len(s["losses_per_rank"]) == 2 and all(len(l) == STEPS for l in s["losses_per_rank"])
    assert all(math.isfinite(x) for x in s["mean_loss_per_step"]) and math.isfinite(s["eval_loss"])
    assert s["final_loss"] == pytest.approx(rw.final_loss(s["losses_per_rank"]))
    # lo is shared by both ranks, so each sees traffic; the numbers are bytes per timed step
    assert len(s["tx_bytes_per_step"]) == 2 and all(b > 0 for b in s["tx_bytes_per_step"])
    assert all(b > 0 for b in s["rx_bytes_per_step"])


def test_ddp_and_gradient_allreduce_train_alike(mlp_run):
    ddp, relax = mlp_run("ddp"), mlp_run("gradient_allreduce")
    for a, b in zip(ddp["losses_per_rank"], relax["losses_per_rank"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert ddp["eval_loss"] == pytest.approx(relax["eval_loss"], abs=1e-5)
    # synchronous training: every rank ends with the same replica
    assert ddp["eval_loss_per_rank"][0] == pytest.approx(ddp["eval_loss_per_rank"][1], abs=1e-6)


def test_powersgd_starts_with_plain_allreduce(mlp_run):
    ddp, psgd = mlp_run("ddp"), mlp_run("ddp_powersgd")
    assert psgd["comm_config"]["start_powerSGD_iter"] == 2 and psgd["comm_config"]["matrix_approximation_rank"] == 1
    # steps 1-2 are allreduce, so the loss of step 3 (after two updates) still matches DDP
    assert psgd["mean_loss_per_step"][:3] == pytest.approx(ddp["mean_loss_per_step"][:3], abs=1e-5)


def test_decentralized_replicas_differ_after_a_local_step(mlp_run):
    s = mlp_run(SHIFT_ONE)
    assert s["options"] == {"peer_selection_mode": "shift_one", "communication_interval": 2}
    assert s["comm_config"]["communication_interval"] == 2
    # step 6 is local (steps 1, 3, 5 communicate): the two replicas evaluate differently
    assert s["eval_loss_per_rank"][0] != s["eval_loss_per_rank"][1]


def test_policy_workload(tmp_path):
    out = tmp_path / "p.json"
    proc = _run(["--workload", "policy", "--contender", "gradient_allreduce", "--steps", "3", "--timing-warmup", "1",
                 "--batch-size", "4", "--policy-train-examples", "200", "--timeout-s", "60", "--json-out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
    s = json.loads(out.read_text())
    assert s["workload"] == "policy" and s["optimizer"] == "AdamW" and s["batch_size"] == 4
    assert s["params"] > 1_000_000 and s["tx_bytes_per_step"] is None
    assert all(math.isfinite(x) for x in s["mean_loss_per_step"]) and math.isfinite(s["eval_loss"])
    assert s["eval_loss_per_rank"][0] == pytest.approx(s["eval_loss_per_rank"][1], abs=1e-6)


def test_bad_contender_spec_fails_before_training():
    proc = _run(["--contender", "bytegrad:warmup_steps=3"], torchrun=False, timeout=60)
    assert proc.returncode == 2
    assert ("contender 'bytegrad' has no option 'warmup_steps'; valid: average, block_size, error_feedback, "
            "full_precision_1d, hierarchical, piece_size_mb, stochastic_rounding") in proc.stderr


def test_bytegrad_as_ddp_hook_trains_like_bytegrad(mlp_run):
    """Different buckets (DDP's vs relax's), so not bit for bit (tests/test_relax_hooks.py pins that)."""
    hook, ours = mlp_run("ddp_bytegrad"), mlp_run("bytegrad")
    assert hook["comm_config"]["block_size"] == 1024
    for a, b in zip(hook["losses_per_rank"], ours["losses_per_rank"]):
        assert a == pytest.approx(b, abs=2e-2)


def test_parse_contender():
    c = rw.parse_contender(SHIFT_ONE)
    assert (c.name, c.options, c.is_ddp) == ("decentralized",
                                             {"peer_selection_mode": "shift_one", "communication_interval": 2}, False)
    assert rw.parse_contender("qadam:warmup_steps=10,lr=0.001").options == {"warmup_steps": 10, "lr": 0.001}
    assert rw.parse_contender("ddp_powersgd:matrix_approximation_rank=4").options == {"matrix_approximation_rank": 4}
    with pytest.raises(ValueError, match="unknown contender 'nope'; valid: ddp, ddp_fp16, ddp_powersgd, .*bytegrad"):
        rw.parse_contender("nope")
    with pytest.raises(ValueError, match="'ddp' has no option 'x'; valid: none"):
        rw.parse_contender("ddp:x=1")
    with pytest.raises(ValueError, match="not key=value"):
        rw.parse_contender("bytegrad:hierarchical")
    with pytest.raises(ValueError, match="peer_selection_mode must be one of"):
        rw.parse_contender("decentralized:peer_selection_mode=ring")
    assert rw.parse_contender("ddp_bytegrad:error_feedback=true").options == {"error_feedback": True}
    with pytest.raises(ValueError, match="'ddp_bytegrad:block_size=12': block_size must be a positive multiple of 8"):
        rw.parse_contender("ddp_bytegrad:block_size=12")
    with pytest.raises(ValueError, match="wire_dtype must be one of bf16, fp16, got 'int8'"):
        rw.parse_contender("ddp_wire16:wire_dtype=int8")


def test_pure_helpers():
    assert [rw.parse_value(v) for v in ("3", "0.5", "True", "shift_one")] == [3, 0.5, True, "shift_one"]
    assert rw.max_over_ranks([[1.0, 5.0], [2.0, 3.0]]) == [2.0, 5.0]
    assert rw.mean_over_ranks([[1.0, 5.0], [2.0, 3.0]]) == [1.5, 4.0]
    assert rw.final_loss([[9.0, 1.0, 2.0, 3.0], [9.0, 3.0, 4.0, 5.0]]) == 3.0
    assert rw.bytes_per_step(100, 500, 4) == 100.0
    with pytest.raises(rw.WorkerError, match="/sys/class/net/no_such_dev0/statistics/tx_bytes does not exist"):
        rw.read_counters("no_such_dev0")


def test_profile_times_bytegrad_through_the_engines_hook(tmp_path):
    out = tmp_path / "w.json"
    proc = _run(["--workload", "mlp", "--contender", "bytegrad", "--steps", "4", "--timing-warmup", "1", "--iface",
                 "lo", "--timeout-s", "60", "--json-out", str(out), "--profile", *TINY_MLP])
    assert proc.returncode == 0, proc.stderr[-6000:]
    profile = json.loads(out.read_text())["profile_ms_per_step"]
    assert len(profile) == 2  # one per rank
    for rank in profile:
        assert {"forward", "backward", "step", "comm_wait", "comm_jobs", "quantize_blocks", "reduce_requantize",
                "decode_blocks", "wait_all_to_all", "wait_all_gather"} <= set(rank)
        assert rank["comm_jobs"] > 0 and rank["quantize_blocks"] > 0

"""`thinkscale demo`: the real CLI as a user runs it (--quick), its report, resume, --fresh, Ctrl-C and errors;
plus the stage runner and the report's target arithmetic, checked by hand."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_harness import descendants
from thinkscale.cli import main
from thinkscale.commands.demo import nproc_warning
from thinkscale.pipeline.evaluation import shard_indices
from thinkscale.pipeline.report import targets
from thinkscale.pipeline.stages import RAN, SKIPPED, Stage, mark_done, read_record, remove_outputs, run_stages
from thinkscale.reflect.evaluate import CANDIDATES_FILE, summarize
from thinkscale.reflect.candidate import Candidate
from thinkscale.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
THINKSCALE = [sys.executable, "-m", "thinkscale.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUICK_TIMEOUT_S = 420
KS = [1, 2, 4, 8, 16, 32]
MODES = {"low": 2, "medium": 8, "high": 32}
LABELS = {"sprm", "sprm:agg=min", "sprm:agg=last", "maj", "weighted", "logprob", "confidence", "deepconf:eta=10",
          "deepconf:eta=90", "deepconf:eta=10,measure=tail", "self_certainty", "first", "pass"}
PNGS = ["training_curves.png", "sprm_separation.png", "accuracy_vs_k_test.png", "accuracy_vs_k_hard.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo(out: Path, *extra: str, timeout: float = QUICK_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*THINKSCALE, "demo", "--quick", "--out", str(out), *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real `thinkscale demo --quick` run, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("demo") / "run"
    start = time.perf_counter()
    result = demo(out)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result, seconds


def load_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ----------------------------------------------------------------------------- the quick run

def test_quick_run_prints_stages_and_the_final_table(quick_run):
    out, result, seconds = quick_run
    for i, name in enumerate(["data", "sft", "grpo", "eval"], start=1):
        assert f"[{i}/4] {name}:" in result.stdout
    assert "| split | effort | k | pass@1 | maj@k | sprm@k | weighted@k | logprob@k | deepconf@k | self_certainty@k | pass@k |" in result.stdout
    assert "| split | SFT pass@1 | GRPO pass@1 |" in result.stdout
    assert "sft:" in result.stderr and "grpo:" in result.stderr and "eval:" in result.stderr  # progress bars
    assert seconds < 300, f"--quick took {seconds:.0f} s"


def test_report_json_structure(quick_run):
    out, _, _ = quick_run
    report = load_report(out)
    assert report["profile"] == "quick"
    assert report["ks"] == KS and report["modes"] == MODES
    assert report["options"]["nproc"] == 2 and report["options"]["algorithm"] == "gradient_allreduce"
    assert {name: s["status"] for name, s in report["stages"].items()} == dict.fromkeys(
        ["data", "sft", "grpo", "eval"], RAN)
    assert set(report["splits"]) == {"test", "hard"} == set(report["targets"])
    for name, split in report["splits"].items():
        assert sorted(split["accuracy"], key=int) == [str(k) for k in KS]
        assert split["samples_per_question"] == 32
        assert split["num_questions"] == report["data"][name]
        for k, row in split["accuracy"].items():
            assert set(row) == LABELS
            assert all(0.0 <= v <= 1.0 for v in row.values()), (name, k, row)
            assert row["pass"] >= max(row.values()) - 1e-12  # the oracle bounds every strategy
        # with one sample per group every strategy picks that sample: all equal pass@1
        assert all(abs(v - split["pass@1"]) < 1e-12 for v in split["accuracy"]["1"].values())
        for key in ("pass@1", "sft_pass@1", "answered_fraction", "truncated_fraction"):
            assert 0.0 <= split[key] <= 1.0
        sep = split["score_separation"]
        assert sep["num_correct"] + sep["num_wrong"] == 32 * split["num_questions"]
        for key in ("correct_mean", "wrong_mean"):
            assert sep[key] is None or 0.0 <= sep[key] <= 1.0
    sft, grpo = report["training"]["sft"], report["training"]["grpo"]
    assert sft["steps"] == 60 and sft["loss_curve"][-1][0] == 60
    assert grpo["steps"] == 3 and [p[0] for p in grpo["curves"]["reward"]] == [1, 2, 3]
    assert all(0.0 <= p[1] <= 1.0 for p in grpo["curves"]["reward"])


def test_report_numbers_match_the_merged_candidates(quick_run):
    """The split's numbers are recomputed here from the candidates both workers wrote."""
    out, _, _ = quick_run
    report = load_report(out)
    for split in ("test", "hard"):
        questions = [json.loads(line) for line in (out / "eval" / f"grpo-{split}" / CANDIDATES_FILE).open()]
        data = [json.loads(line) for line in (out / "data" / f"{split}.jsonl").open()]
        assert [q["index"] for q in questions] == list(range(len(data)))
        assert [q["question"] for q in questions] == [d["question"] for d in data]
        shards = sorted(p.name for p in (out / "eval" / f"grpo-{split}" / "shards").iterdir())
        assert shards == ["0-of-2", "1-of-2"]
        candidates = [[Candidate.from_dict(c) for c in q["candidates"]] for q in questions]
        expected = summarize(candidates, KS)
        assert report["splits"][split]["pass@1"] == pytest.approx(expected["pass@1"])
        for k in KS:
            got = report["splits"][split]["accuracy"][str(k)]
            assert got["sprm"] == pytest.approx(expected["by_k"][str(k)]["accuracy"]["sprm"])
            assert got["maj"] == pytest.approx(expected["by_k"][str(k)]["accuracy"]["majority"])
            assert got["pass"] == pytest.approx(expected["by_k"][str(k)]["accuracy"]["oracle"])
            assert got["logprob"] == pytest.approx(expected["by_k"][str(k)]["accuracy"]["logprob"])
            assert got["deepconf:eta=10"] == pytest.approx(expected["by_k"][str(k)]["accuracy"]["deepconf:eta=10"])


def test_report_md_and_pngs(quick_run):
    out, _, _ = quick_run
    text = (out / "report.md").read_text()
    assert "| split | effort | k | pass@1 | maj@k | sprm@k | weighted@k | logprob@k | deepconf@k | self_certainty@k | pass@k |" in text
    for split in ("test", "hard"):
        for mode, k in MODES.items():
            assert f"| {split} | {mode} | {k} |" in text
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 400 and height >= 300, (name, width, height)
        assert f"]({name})" in text
    for stage in ("data", "sft", "grpo", "eval"):
        assert checkpoint.is_done(out / stage)
    assert (out / "logs" / "demo.log").is_file() and (out / "logs" / "sft-rank1.log").is_file()


def test_rerun_skips_finished_stages(quick_run):
    out, _, _ = quick_run
    grpo_marker = (out / "grpo" / checkpoint.DONE_MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    result = demo(out, timeout=180)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 60, f"a rerun with every stage finished took {seconds:.0f} s"
    report = load_report(out)
    assert {s["status"] for s in report["stages"].values()} == {SKIPPED}
    assert all(s["seconds"] < 1.0 for s in report["stages"].values())
    assert report["stages"]["sft"]["seconds_when_run"] > 1.0  # kept from the run that did the work
    assert result.stdout.count("finished earlier, skipped") == 4
    assert (out / "grpo" / checkpoint.DONE_MARKER).stat().st_mtime_ns == grpo_marker


def test_a_rerun_continues_an_interrupted_training_stage_from_its_checkpoint(quick_run, tmp_path):
    """What a demo killed after SFT's last step leaves: sft/ with that checkpoint only. A plain rerun
    resumes from it (no training again), skips the finished stages, and ends with the same model."""
    from safetensors.torch import load_file

    finished, _, _ = quick_run
    out = tmp_path / "run"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("logs"))
    shutil.rmtree(out / "sft")
    shutil.copytree(checkpoint.checkpoint_path(finished / "sft", 60), checkpoint.checkpoint_path(out / "sft", 60))
    result = demo(out, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/4] sft: supervised fine-tuning" in result.stdout and result.stdout.count("finished earlier") == 3
    assert "step-00000060 (step 60)" in (out / "logs" / "sft-rank0.log").read_text()  # "resuming from ..."
    resumed, original = load_file(out / "sft" / "model.safetensors"), load_file(finished / "sft" / "model.safetensors")
    assert resumed.keys() == original.keys() and all(torch.equal(resumed[k], original[k]) for k in original)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_fresh_starts_over_and_ctrl_c_leaves_no_workers_and_no_partial_stage(quick_run, tmp_path):
    finished, _, _ = quick_run
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "logs")  # so that the worker log below can only come from the new run
    data_marker = (out / "data" / checkpoint.DONE_MARKER).read_text()
    proc = subprocess.Popen([*THINKSCALE, "demo", "--quick", "--fresh", "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "logs" / "sft-rank1.log").exists():  # both SFT workers are up
                workers = descendants(proc.pid)
                if len(workers) >= 2:
                    break
            time.sleep(0.2)
        assert workers, "the SFT workers never started"
        assert not (out / "report.json").exists()  # --fresh removed the old report ...
        assert not checkpoint.is_done(out / "grpo")  # ... and the finished stages
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted during stage sft" in stderr
    assert "[1/4] data: generate" in stdout  # the data stage ran again
    assert (out / "data" / checkpoint.DONE_MARKER).read_text() != data_marker
    time.sleep(1.0)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived Ctrl-C"
    # the interrupted stage is absent, complete or holds only whole checkpoints, never half-written
    sft = out / "sft"
    assert not sft.exists() or checkpoint.is_done(sft) or os.listdir(sft) == [checkpoint.CHECKPOINTS_DIR]
    assert all(checkpoint.is_done(p) for p in checkpoint.checkpoints_dir(sft).glob("step-*"))  # a killed save may leave .step-*.tmp-*
    assert not list(out.glob(".sft.tmp-*"))


def test_a_crashing_worker_fails_the_command_with_its_error(quick_run, tmp_path):
    finished, _, _ = quick_run
    out = tmp_path / "run"
    shutil.copytree(finished / "data", out / "data")
    with open(out / "data" / "train.jsonl", "a") as f:
        f.write("{this is not json\n")
    result = demo(out, timeout=180)
    assert result.returncode == 1
    assert "stage sft failed: worker rank" in result.stderr
    assert "train.jsonl" in result.stderr and "malformed JSON" in result.stderr
    assert not checkpoint.is_done(out / "sft")


# ----------------------------------------------------------------------------- CLI input checks (in-process)

def test_unknown_algorithm_lists_the_valid_ones(capsys, tmp_path):
    assert main(["demo", "--algorithm", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown algorithm 'nope'" in err and "gradient_allreduce" in err and "bytegrad" in err
    assert not (tmp_path / "x").exists()


def test_bad_nproc_is_rejected_and_too_many_warns(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--nproc", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    assert nproc_warning(2, 2) is None
    assert "--nproc 3 is more than the 2 CPUs" in nproc_warning(3, 2)


# ----------------------------------------------------------------------------- stage runner

def _stage(tmp_path, name, calls, fail=False, finish=True):
    def body():
        calls.append(name)
        if fail:
            raise RuntimeError(f"{name} broke")
        if finish:
            mark_done(tmp_path / name)
    return Stage(name, tmp_path / name, body)


def test_stage_runner_skips_finished_stages_and_stops_at_a_failure(tmp_path):
    calls = []
    record = tmp_path / "pipeline.json"
    with pytest.raises(RuntimeError, match="b broke"):
        run_stages([_stage(tmp_path, "a", calls), _stage(tmp_path, "b", calls, fail=True),
                    _stage(tmp_path, "c", calls)], record=record)
    assert calls == ["a", "b"]
    assert read_record(record)["a"]["status"] == RAN and "b" not in read_record(record)
    calls.clear()
    results = run_stages([_stage(tmp_path, "a", calls), _stage(tmp_path, "b", calls),
                          _stage(tmp_path, "c", calls)], record=record)
    assert calls == ["b", "c"]
    assert [r.status for r in results] == [SKIPPED, RAN, RAN]
    assert results[0].seconds_when_run == read_record(record)["a"]["seconds_when_run"] is not None


def test_stage_runner_rejects_a_stage_that_does_not_finish(tmp_path):
    with pytest.raises(RuntimeError, match="without finishing"):
        run_stages([_stage(tmp_path, "a", [], finish=False)])
    with pytest.raises(ValueError, match="unique"):
        run_stages([_stage(tmp_path, "a", []), _stage(tmp_path, "a", [])])


def test_remove_outputs_touches_only_the_named_entries(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "model.safetensors").write_text("x")
    (tmp_path / ".sft.tmp-123").mkdir()
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    removed = remove_outputs(tmp_path, ["sft", "report.json", "grpo"])
    assert sorted(p.name for p in removed) == [".sft.tmp-123", "report.json", "sft"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_shards_cover_every_question_once():
    shards = [shard_indices(7, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError):
        shard_indices(7, 3, 3)


def test_targets_by_hand():
    split = {
        "pass@1": 0.5, "sft_pass@1": 0.55,
        "accuracy": {"1": {"sprm": 0.5, "maj": 0.5, "pass": 0.5},
                     "2": {"sprm": 0.6, "maj": 0.55, "pass": 0.7},
                     "32": {"sprm": 0.8, "maj": 0.85, "pass": 0.9}},
        "score_separation": {"gap": 0.25},
    }
    t = targets(split)
    assert t["k_max"] == 32 and t["sprm_rises_with_k"] is True
    assert t["sprm_minus_pass1"] == pytest.approx(0.3)
    assert t["sprm_minus_maj"] == pytest.approx(-0.05) and t["sprm_ge_maj"] is False
    assert t["gap_closed"] == pytest.approx(0.3 / 0.4)
    assert t["correct_scored_higher"] is True
    assert t["pass1_change_vs_sft"] == pytest.approx(-0.05) and t["pass1_not_worse_than_sft"] is False
    assert t["best_free_baseline"] is None and t["pair_accuracy"] is None  # none measured in this split
    # free-confidence baselines at k = 32: sprm 0.8 beats logprob 0.7, loses to deepconf 0.82
    split["accuracy"]["32"].update({"logprob": 0.7, "deepconf:eta=10": 0.82})
    split["scorers"] = {"steps": {"sprm": {"step_auc": 0.9}}, "traces": {"sprm": {"pair_accuracy": 0.86}}}
    t = targets(split)
    assert t["best_free_baseline"] == "deepconf:eta=10" and t["sprm_minus_best_free"] == pytest.approx(-0.02)
    assert t["sprm_ge_every_free_baseline"] is False and t["pair_accuracy"] == 0.86 and t["step_auc"] == 0.9
    split["accuracy"]["2"]["sprm"] = 0.45
    split["accuracy"]["32"]["pass"] = 0.5
    t = targets(split)
    assert t["sprm_rises_with_k"] is False and t["gap_closed"] is None


def test_head_refit_ran_and_the_probe_reads_the_demo_candidates(quick_run, tmp_path):
    out, _, _ = quick_run
    refit = load_report(out)["training"]["grpo"]["head_refit"]
    assert refit is not None and refit["rollouts"] == 32 * 4  # quick profile: 32 questions x 4 samples
    probe = subprocess.run([*THINKSCALE, "bench", "probe", "--model", str(out / "grpo"), "--candidates",
                            str(out / "eval" / "grpo-test" / CANDIDATES_FILE), "--out", str(tmp_path),
                            "--max-candidates", "100"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr
    result = json.loads((tmp_path / "probe.json").read_text())
    assert set(result["auc"]) == {"scored", "delimiter", "equals", "mean"}
    assert all(len(row) == 2 for row in result["auc"].values())  # the quick policy has 2 layers
    assert result["steps"] > 0 and "| scored |" in (tmp_path / "probe.md").read_text()
    missing = subprocess.run([*THINKSCALE, "bench", "probe", "--model", str(out / "grpo"), "--candidates",
                              str(tmp_path / "nope.jsonl")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert missing.returncode == 2 and "no candidates file" in missing.stderr and "Traceback" not in missing.stderr


def test_demo_refuses_another_tasks_folder(quick_run):
    out, _, _ = quick_run
    result = demo(out, "--task", "countdown")
    assert result.returncode == 2
    assert "holds a demo of task 'arithmetic', not 'countdown'" in result.stderr and "Traceback" not in result.stderr

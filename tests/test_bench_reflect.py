"""`thinkscale bench reflect` (thinkscale.bench.reflect_cost): the real command on the tiny pipeline
policy with a handful of tokens, bad input, and the pure helpers."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from thinkscale import cli
from thinkscale.bench import reflect_cost as rc


def test_tiny_pipeline_run_writes_report(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["bench", "reflect", "--models", "pipeline", "--pipeline-profile", "quick", "--k", "2",
                     "--new-tokens", "6", "--repeats", "2", "--step-delimiter", " ", "--parts", "scoring",
                     "--out", str(out)])
    assert code == 0
    md, js = out / "reflect_cost.md", out / "reflect_cost.json"
    assert md.is_file() and js.is_file()
    record = json.loads(js.read_text())
    assert record["machine"]["cpu_count"] >= 1 and record["machine"]["torch"]
    (model,) = record["models"]
    assert model["name"] == "pipeline" and model["tokens_identical"] is True
    assert model["max_score_diff"] < 1e-4  # fused and rescored step scores agree
    assert set(model["summary"]) == set(rc.MODES)
    for mode, s in model["summary"].items():
        assert s["tokens"] == 2 * 6  # k x new tokens, EOS ignored: the same in every mode
        assert len(model["wall_s"][mode]) == 2
        for key in ("median_s", "tokens_per_s", "time_ratio", "tokens_per_s_ratio", "cpu_ratio"):
            assert math.isfinite(s[key]) and s[key] > 0, (mode, key, s[key])
    assert model["summary"]["plain"]["time_ratio"] == 1.0
    assert math.isfinite(model["fused_postprocess_s"]) and model["fused_postprocess_s"] > 0
    printed = capsys.readouterr().out
    assert "| pipeline | sampling + fused SPRM scoring |" in printed
    assert "identical token ids in every mode and round: yes" in md.read_text()


def test_engine_part_measures_equal_work_and_natural_eos(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["bench", "reflect", "--models", "pipeline", "--pipeline-profile", "quick", "--parts", "engine",
                     "--batch-sizes", "2", "4", "--engine-tokens", "5", "--engine-prompts", "2", "--k", "3",
                     "--repeats", "2", "--out", str(out)])
    assert code == 0
    (model,) = json.loads((out / "reflect_cost.json").read_text())["models"]
    engine = model["engine"]
    assert "summary" not in model  # the scoring part did not run
    assert [row["batch"] for row in engine["equal_work"]] == [2, 4]
    for row in engine["equal_work"]:
        assert row["tokens"] == row["batch"] * 5 and len(row["bare_s"]) == len(row["engine_s"]) == 2
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    natural = engine["natural_eos"]
    assert natural["rows"] == 2 * 3 and 0 < natural["generated"]["engine"] <= 2 * 3 * 5
    # the sort_copy settings walk the same nucleus in the same order: the same tokens, so equal work
    assert natural["generated"]["engine"] == natural["generated"]["sort_copy"]
    assert "| batch | bare tokens/s | engine tokens/s | engine / bare |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--models", "gpt5"], "invalid choice: 'gpt5'"),
    (["--k", "0"], "expected a positive integer, got 0"),
    (["--new-tokens", "-3"], "expected a positive integer, got -3"),
])
@pytest.mark.parametrize("entry", ["cli", "module"])
def test_bad_arguments_are_usage_errors(entry, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "reflect", *argv]) if entry == "cli" else rc.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    rc.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("overrides, message", [
    ({"models": ["pipeline", "nope"]}, "unknown model(s) ['nope']"),
    ({"k": 0}, "--k must be an integer >= 1, got 0"),
    ({"top_p": 1.5}, "--top-p must be in (0, 1]"),
])
def test_run_rejects_bad_namespace(overrides, message, capsys, tmp_path):
    assert rc.run(_args(out=str(tmp_path), **overrides)) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_context_overflow_is_a_clear_error(capsys, tmp_path):
    # the demo policy has 512 positions: prompt + 600 new tokens cannot fit
    args = _args(models=["pipeline"], pipeline_profile="quick", new_tokens=600, k=1, repeats=1, out=str(tmp_path))
    assert rc.run(args) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_summary_math():
    s = rc.summarize_mode([2.0, 3.0, 2.2], [2.0, 3.0, 2.2], 100, [1.0, 2.0, 2.0], [1.0, 1.5, 2.0])
    assert s["median_s"] == 2.2 and s["min_s"] == 2.0 and s["max_s"] == 3.0
    assert s["tokens_per_s"] == pytest.approx(100 / 2.2)
    assert s["time_ratio"] == pytest.approx(1.5)  # per-round ratios 2.0, 1.5, 1.1
    assert s["tokens_per_s_ratio"] == pytest.approx(1 / 1.5)
    assert s["cpu_ratio"] == pytest.approx(2.0)  # 2.0, 2.0, 1.1
    assert s["overhead_pct"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        rc.per_round_ratios([1.0], [1.0, 2.0])
    assert rc.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rc.round_order(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert rc.max_abs_diff([[0.5, 0.25]], [[0.5, 0.5]]) == 0.25
    assert rc.max_abs_diff([[0.5]], [[0.5, 0.1]]) == math.inf

"""thinkscale.bench.real_model: the pure summaries and the report (the stages themselves take hours)."""
from __future__ import annotations

import json

import pytest

from thinkscale import cli
from thinkscale.bench import real_model as rmod


def cand(text, answer, correct, tokens=10):
    return {"text": text, "num_generated_tokens": tokens, "extra": {"answer": answer, "correct": correct}}


def test_screen_row_by_hand():
    records = [
        {"candidates": [cand("a\nb\n\\boxed{4}", "4", True), cand("x\n\\boxed{4.0}", "4.0", True),
                        cand("y\n", None, False), cand("z\n\\boxed{5}", "5", False)]},
        {"candidates": [cand("q", "7", False, 30)] * 4},
    ]
    row = rmod.screen_row("t", "gym:t", records, lambda a, b: float(a) == float(b))
    assert row["pass@1"] == 2 / 8 and row["pass@8"] == 0.5
    assert row["distinct_right_answers"] == 0.5  # "4" and "4.0" are one answer; the second question has none
    assert row["answered"] == 7 / 8 and row["mean_tokens"] == (40 + 120) / 8
    assert row["steps_per_trace"]["\n"] == pytest.approx((2 + 1 + 1 + 1) / 8)
    assert rmod.distinct_right_answers(records[0]["candidates"], None) == 2  # exact text: "4" and "4.0" differ


def test_steps_per_trace_counts_finished_nonblank_pieces():
    assert rmod.steps_per_trace(["a.\n\nb.\n\nc", "\n\nd.\n\n"], ".\n\n") == (2 + 1) / 2
    assert rmod.steps_per_trace([], "\n") == 0.0


def test_report_from_written_results(tmp_path, capsys):
    screen = [{"task": "gym:t", "pass@1": 0.25, "pass@8": 0.5, "distinct_right_answers": 1.0, "answered": 0.9,
               "mean_tokens": 40.0, "steps_per_trace": {d: 1.0 for d in rmod.DELIMITERS}}]
    (tmp_path / "screen.json").write_text(json.dumps(screen))
    assert cli.main(["bench", "real-model", "--stages", "report", "--results", str(tmp_path),
                     "--work", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert "| gym:t | 25.0 | 50.0 | 1.00 | 90.0 | 40 | 1.0 | 1.0 |" in printed
    assert (tmp_path / "summary.md").read_text() in printed


def test_largest_drop_by_hand():
    assert rmod.largest_drop([0.5, 0.6, 0.58, 0.61, 0.55]) == pytest.approx(0.06)
    assert rmod.largest_drop([0.1, 0.2]) == 0.0 and rmod.largest_drop([0.3]) == 0.0


def test_report_of_an_eval_states_each_target(tmp_path, capsys):
    accuracy = {"sprm": 0.5, "oracle": 0.9, **{b: 0.4 for b in rmod.BASELINES}}
    by_k = {"1": {"accuracy": {**accuracy, "sprm": 0.40}}, "2": {"accuracy": {**accuracy, "sprm": 0.45}},
            "32": {"accuracy": {**accuracy, "sprm": 0.43}}}
    interval = {"mean": 0.03, "low": 0.01, "high": 0.05, "excludes_zero": True}
    summary = {"num_questions": 2, "pass@1": 0.4, "by_k": by_k,
               "scorers": {"steps": {"sprm": {"step_auc": 0.7, "first_error": 0.5}},
                           "traces": {"sprm": {"pair_accuracy": 0.8}, "logprob": {"pair_accuracy": None}}}}
    eval_json = {"features": {"summary": summary,
                              "bootstrap_vs_sprm@32": {"majority": interval,
                                                       "logprob": {**interval, "low": -0.01, "excludes_zero": False}},
                              "bootstrap_vs_weighted@32": {"majority": {**interval, "mean": 0.055, "low": 0.02}}}}
    (tmp_path / "eval.json").write_text(json.dumps(eval_json))
    assert cli.main(["bench", "real-model", "--stages", "report", "--results", str(tmp_path),
                     "--work", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert "Largest fall of sprm@k from one k to the next: 2.0 points (target <= 1: not met)." in printed
    assert "- majority: +3.0 points [+1.0, +5.0] (excludes 0) met" in printed
    assert "- logprob: +3.0 points [-1.0, +5.0] not met" in printed
    assert "The SPRM-weighted vote (weighted@32) minus each other baseline @32" in printed
    assert "- majority: +5.5 points [+2.0, +5.0] (excludes 0)\n" in printed
    assert "| sprm | 0.800 | 0.700 | 0.500 |" in printed and "| logprob | n/a | n/a | n/a |" in printed


def test_gzipped_records_round_trip(tmp_path):
    records = [{"index": 0, "candidates": [cand("a", "1", True)]}, {"index": 1, "candidates": []}]
    path = tmp_path / "c.jsonl.gz"
    rmod.write_gzipped_records(str(path), records)
    assert rmod.read_records(path) == records


def test_grpo_table_by_hand():
    nan = float("nan")
    metrics = [{"step": 1, "reward_mean": 0.25, "score_correct": 0.6, "score_wrong": 0.2, "score_pair_acc": 0.75,
                "spr_trained_frac": 0.5},
               {"step": 2, "reward_mean": 0.0, "score_correct": nan, "score_wrong": 0.1, "score_pair_acc": None,
                "spr_trained_frac": 1.0},
               {"step": 3, "reward_mean": 0.5, "score_correct": 1e-10, "score_wrong": 1e-10, "score_pair_acc": 0.5,
                "spr_trained_frac": 0.5}]
    lines = rmod.grpo_table(metrics, window=2)
    # a step without right rollouts (NaN) or without pairs (None) is left out of that mean
    assert lines[2] == "| 1-2 | 0.125 | 0.600 | 0.150 | 0.750 | 0.750 |"
    assert lines[3] == "| 3-3 | 0.500 | 0.000 | 0.000 | 0.500 | 0.500 |"


def test_report_of_a_search(tmp_path, capsys):
    cells = [{"method": m, "k": 32, "questions": 2, "accuracy": {"sprm": a}, "pass": 100.0, "tokens": t,
              "rows": 32.0, "wall_s": 1.0} for m, a, t in (("best_of_n", 50.0, 1000.0), ("prune", 50.0, 400.0))]
    report = {"questions": 2, "selectors": ["sprm"], "ks": [32], "cells": cells, "config": {"max_new_tokens": 96},
              "targets": {"reference": {"k": 32, "tokens": 1000.0, "accuracy": {"sprm": 50.0}},
                          "tokens_at_sprm_accuracy": {"method": "prune", "k": 32, "tokens": 400.0, "fraction": 0.4},
                          "equal_tokens": []}}
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.json").write_text(json.dumps(report))
    assert cli.main(["bench", "real-model", "--stages", "report", "--results", str(tmp_path),
                     "--work", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert "## Search: 2 test questions, k = 32, 96 tokens at most per row" in printed
    assert "Fewest tokens within 1 point of it: prune k=32, 400 tokens = 40% of best_of_n's (target <= 50%)." in printed


def test_probe_lines_by_hand():
    probe = {"steps": 10, "train_steps": 5, "feature_layer": 2, "layers": [1, 2, 3],
             "auc": {"scored": [0.6, 0.7, None], "delimiter": [0.8, 0.5, 0.9]}}
    lines = rmod.probe_lines(probe)
    assert lines[2] == "| position | best layer | its AUC | AUC at the head's layer (2) |"
    assert lines[4:6] == ["| scored | 2 | 0.700 | 0.700 |", "| delimiter | 3 | 0.900 | 0.500 |"]

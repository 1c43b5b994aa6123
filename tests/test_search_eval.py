"""The search study's arithmetic by hand: per-cell summaries, interpolation at equal tokens, targets."""
from __future__ import annotations

import math

import pytest

from thinkscale.reflect.search_eval import SearchStudy, _interpolate, summarize_search


def record(method, k, i, tokens, sprm, majority, any_correct=True):
    return {"index": i, "method": method, "k": k, "generated_tokens": tokens, "rows": k, "wall_s": 0.5,
            "picks": {"sprm": sprm, "majority": majority}, "any_correct": any_correct, "candidates": []}


def test_interpolation_is_linear_in_log_tokens():
    curve = [(100, 50.0), (400, 70.0)]
    assert _interpolate(curve, 200) == pytest.approx(60.0)  # log2 halfway
    assert _interpolate(curve, 100) == 50.0 and _interpolate(curve, 400) == 70.0
    assert _interpolate(curve, 50) is None and _interpolate(curve, 800) is None


def test_summary_and_targets_by_hand():
    study = SearchStudy(methods=("best_of_n", "prune"), ks=(2, 8), selectors=("sprm", "majority"))
    records = [record("best_of_n", 2, 0, 100, True, False), record("best_of_n", 2, 1, 100, False, False),
               record("best_of_n", 8, 0, 400, True, True), record("best_of_n", 8, 1, 400, True, False),
               record("prune", 2, 0, 60, False, False), record("prune", 2, 1, 80, False, True),
               record("prune", 8, 0, 150, True, True), record("prune", 8, 1, 250, True, True)]
    report = summarize_search(records, study, questions=2)
    cells = {(c["method"], c["k"]): c for c in report["cells"]}
    assert cells[("best_of_n", 2)]["accuracy"] == {"sprm": 50.0, "majority": 0.0}
    assert cells[("prune", 8)]["tokens"] == 200.0 and cells[("prune", 8)]["accuracy"]["majority"] == 100.0
    t = report["targets"]
    assert t["reference"]["k"] == 8 and t["reference"]["accuracy"]["sprm"] == 100.0
    # prune k=8 reaches best_of_n k=8's sprm accuracy (100) at 200 of its 400 tokens
    assert t["tokens_at_sprm_accuracy"] == {"method": "prune", "k": 8, "tokens": 200.0, "fraction": 0.5}
    equal = {(e["method"], e["k"], e["selector"]): e for e in t["equal_tokens"]}
    # at 200 tokens best_of_n's sprm curve (100 -> 50 %, 400 -> 100 %) is halfway in log tokens: 75 %
    assert equal[("prune", 8, "sprm")]["best_of_n_at_equal_tokens"] == pytest.approx(75.0)
    assert equal[("prune", 8, "sprm")]["difference"] == pytest.approx(25.0)
    assert equal[("prune", 2, "sprm")]["difference"] is None  # 70 tokens: below best_of_n's cheapest cell
    assert not math.isnan(cells[("prune", 2)]["wall_s"])


def test_a_search_within_one_point_reaches_best_of_n():
    study = SearchStudy(methods=("best_of_n", "prune"), ks=(32,), selectors=("sprm",))
    # 201 questions: best_of_n right on 101 (50.25 %), prune on 99 (49.25 %, 0.995 points below), prune cheaper
    records = ([record("best_of_n", 32, i, 1000, i < 101, False) for i in range(201)]
               + [record("prune", 32, i, 300, i < 99, False) for i in range(201)])
    reach = summarize_search(records, study, questions=201)["targets"]["tokens_at_sprm_accuracy"]
    assert reach["method"] == "prune" and reach["fraction"] == pytest.approx(0.3)
    fewer = records[:201] + [record("prune", 32, i, 300, i < 98, False) for i in range(201)]  # 1.5 points below
    assert summarize_search(fewer, study, questions=201)["targets"]["tokens_at_sprm_accuracy"] is None

"""The head refit (reflect.head_fit) on synthetic rollouts: it learns from outcomes alone, chooses its
epoch and aggregation on held-out training questions, and says why when it cannot."""
from __future__ import annotations

import logging

import pytest
import torch

from thinkscale.reflect.head_fit import HeadFitOptions, StepRollout, fit_head

C = 8


def rollouts(n_questions=60, per_question=6, seed=0, signal=True):
    """Wrong rollouts have one step whose lowest log-prob (confidence input 0) is low; features are noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for q in range(n_questions):
        for j in range(per_question):
            correct = (j + q) % 3 != 0
            steps = 3
            conf = torch.zeros(steps, 4) - 0.1
            if not correct and signal:
                bad = int(torch.randint(0, steps, (1,), generator=g))
                conf[bad:, 0] = -4.0  # the slip and the running minimum after it
                conf[bad:, 2] = -4.0
            out.append(StepRollout(f"q{q}", correct, True, torch.randn(steps, C, generator=g), conf))
    return out


def test_fit_learns_to_rank_from_outcomes():
    head, stats = fit_head(rollouts(), C, HeadFitOptions(inputs="features+confidence", epochs=15, patience=15))
    assert stats["val_pair_accuracy"] > 0.95
    assert stats["aggregation"] in ("geomean", "min", "last") and 1 <= stats["best_epoch"] <= stats["epochs_run"]
    assert head.inputs == "features+confidence" and not head.training
    # features alone are noise here: held-out ranking stays near chance
    _, noise = fit_head(rollouts(), C, HeadFitOptions(inputs="features", epochs=5, patience=5))
    assert noise["val_pair_accuracy"] < 0.75


def test_fit_refuses_one_sided_outcomes_and_warns_without_held_out_pairs(caplog):
    one_sided = [StepRollout(r.question, True, True, r.features, r.confidence) for r in rollouts(10)]
    with pytest.raises(ValueError, match="both correct and wrong"):
        fit_head(one_sided, C, HeadFitOptions(epochs=1))
    # every question has one outcome only (q0, q2 right; q1, q3 wrong): held-out pairs never exist
    split = [StepRollout(r.question, int(r.question[1]) % 2 == 0, True, r.features, r.confidence) for r in rollouts(4)]
    with caplog.at_level(logging.WARNING):
        head, stats = fit_head(split, C, HeadFitOptions(epochs=2, val_fraction=0.25))
    assert stats["val_pair_accuracy"] is None and stats["aggregation"] == "geomean" and stats["best_epoch"] == 2
    assert "no held-out question has both" in caplog.text


@pytest.mark.parametrize("kwargs, message", [({"inputs": "tokens"}, "head inputs"), ({"samples": 1}, "samples"),
                                             ({"val_fraction": 1.0}, "val_fraction"), ({"epochs": 0}, "epochs")])
def test_options_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeadFitOptions(**kwargs)

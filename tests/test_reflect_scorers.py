"""Scorer quality metrics (thinkscale.reflect.scorers) against hand-computed values."""
from __future__ import annotations

import pytest

from thinkscale.reflect.candidate import Candidate
from thinkscale.reflect.scorers import (expected_calibration_error, pair_accuracy, roc_auc, scorer_report,
                                        step_quality, STEP_SCORERS, TRACE_SCORERS)


def cand(i, correct, steps, truth=None, logprobs=None, ends=None):
    logprobs = logprobs if logprobs is not None else [-0.1] * (2 * len(steps))
    c = Candidate(prompt_index=0, sample_index=i, text="", token_ids=[0] * len(logprobs), step_scores=list(steps),
                  score=sum(steps) / len(steps) if steps else 0.0, finished=True, truncated=False,
                  num_prompt_tokens=1, num_generated_tokens=len(logprobs),
                  step_ends=ends if ends is not None else [2 * j + 1 for j in range(len(steps))],
                  token_logprobs=list(logprobs), token_confidences=[1.0] * len(logprobs),
                  token_certainties=[1.0] * len(logprobs))
    c.extra = {"correct": correct, "step_truth": truth}
    return c


def test_roc_auc_by_hand():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == 0.75  # 3 of 4 pairs ordered
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5  # a tie counts one half
    assert roc_auc([0.1, 0.2, 0.3], [False, True, True]) == 1.0
    assert roc_auc([0.1, 0.2], [True, True]) is None


def test_ece_by_hand():
    # bin [0.9,1): probs 0.95, 0.95 with truth 1, 0 -> |0.95 - 0.5| = 0.45, weight 2/3
    # bin [0.1,0.2): prob 0.15 truth 0 -> 0.15, weight 1/3
    assert expected_calibration_error([0.95, 0.95, 0.15], [True, False, False]) == pytest.approx(
        2 / 3 * 0.45 + 1 / 3 * 0.15)
    assert expected_calibration_error([], []) is None


def test_step_quality_and_first_error():
    # candidate a: truth T F F, sprm 0.9 0.2 0.4 -> lowest is step 1 = first error (hit)
    # candidate b: truth T T F, sprm 0.3 0.8 0.7 -> lowest is step 0, first error at 2 (miss)
    # candidate c: truth T T,   sprm 0.6 0.9      -> no error
    a = cand(0, False, [0.9, 0.2, 0.4], [True, False, False])
    b = cand(1, False, [0.3, 0.8, 0.7], [True, True, False])
    c = cand(2, True, [0.6, 0.9], [True, True])
    q = step_quality([[a, b, c]], STEP_SCORERS["sprm"], probability=True)
    assert q["steps"] == 8
    assert q["first_error"] == 0.5
    # positives 0.9 0.3 0.8 0.6 0.9, negatives 0.2 0.4 0.7: ordered pairs
    # 0.9:3 0.3:1 0.8:3 0.6:2 0.9:3 -> 12 of 15
    assert q["step_auc"] == pytest.approx(12 / 15)
    assert "ece" in q


def test_pair_accuracy_within_questions_only():
    # q0: correct 0.8; wrong 0.5, 0.9 -> 1 of 2; q1: correct 0.4; wrong 0.4 -> tie 1/2
    # a wrong 0.1 in q1 is never compared with q0's correct one
    q0 = [cand(0, True, [0.8]), cand(1, False, [0.5]), cand(2, False, [0.9])]
    q1 = [cand(0, True, [0.4]), cand(1, False, [0.4])]
    assert pair_accuracy([q0, q1], TRACE_SCORERS["sprm"]) == pytest.approx(1.5 / 3)
    assert pair_accuracy([[cand(0, True, [0.5])]], TRACE_SCORERS["sprm"]) is None


def test_scorer_report_covers_free_confidences_and_skips_what_is_missing():
    # logprob_min step scorer: a's step 1 holds the lowest token (-3): hits the first error
    a = cand(0, False, [0.9, 0.2], [True, False], logprobs=[-0.1, -0.1, -3.0, -0.1])
    c = cand(1, True, [0.6, 0.9], [True, True], logprobs=[-0.2, -0.1, -0.1, -0.1])
    report = scorer_report([[a, c]])
    assert report["labelled_candidates"] == 2
    assert report["steps"]["logprob_min"]["first_error"] == 1.0
    assert report["traces"]["logprob"]["pair_accuracy"] == 1.0  # mean log-prob: c -0.125 > a -0.825
    # no SPRM scores recorded (sampled with score=False): the sprm scorers are left out
    for x in (a, c):
        x.step_scores, x.score = [], 0.0
    report = scorer_report([[a, c]])
    assert "sprm" not in report["steps"] and "sprm" not in report["traces"] and "logprob" in report["traces"]

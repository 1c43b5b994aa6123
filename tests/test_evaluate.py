"""Evaluation harness: disjoint-group metrics by hand, the JSONL loop, resume, bad input, report files."""
import json

import pytest

from thinkscale.reflect.candidate import Candidate
from thinkscale.reflect.evaluate import (
    EvalConfig,
    accuracy_at_k,
    disjoint_groups,
    evaluate,
    grade_candidates,
    load_records,
    summarize,
    tokens_at_k,
)
from thinkscale.tasks.jsonl import Example


def cand(sample_index, answer, score, tokens, prompt_index=0):
    text = "no answer" if answer is None else f"steps.\n\n\\boxed{{{answer}}}"
    return Candidate(prompt_index=prompt_index, sample_index=sample_index, text=text, token_ids=[0] * tokens,
                     step_scores=[score], score=score, finished=True, truncated=False,
                     num_prompt_tokens=4, num_generated_tokens=tokens)


def hand_example():
    # Q0, reference 5:  s0 5 (0.2, 10 tok)  s1 3 (0.9, 20)  s2 3 (0.4, 30)  s3 5 (0.5, 40)
    # Q1, reference 7:  s0 -  (0.1, 5)      s1 7 (0.3, 15)  s2 7 (0.6, 25)  s3 8 (0.95, 35)
    q0 = [cand(0, "5", 0.2, 10), cand(1, "3", 0.9, 20), cand(2, "3", 0.4, 30), cand(3, "5", 0.5, 40)]
    q1 = [cand(0, None, 0.1, 5), cand(1, "7", 0.3, 15), cand(2, "7", 0.6, 25), cand(3, "8", 0.95, 35)]
    grade_candidates(q0, "5")
    grade_candidates(q1, "7")
    return [q0, q1]


def test_grade_candidates_records_answer_and_correctness():
    q0, q1 = hand_example()
    assert [c.extra["correct"] for c in q0] == [True, False, False, True]
    assert [c.extra["answer"] for c in q1] == [None, "7", "7", "8"]


def test_disjoint_groups():
    cands = [cand(i, "1", 0.5, 1) for i in (3, 0, 4, 1, 2)]
    assert [[c.sample_index for c in g] for g in disjoint_groups(cands, 2)] == [[0, 1], [2, 3]]  # 4 unused
    assert [[c.sample_index for c in g] for g in disjoint_groups(cands, 5)] == [[0, 1, 2, 3, 4]]
    assert disjoint_groups(cands, 6) == []


# Hand-computed (see hand_example):
# k=1: every strategy = mean correctness = (2/4 + 2/4) / 2 = 0.5
# k=2, groups [s0 s1] [s2 s3]:
#   sprm      Q0: s1 wrong, s3 right -> .5   Q1: s1 right, s3 wrong -> .5   => 0.5
#   majority  1-1 ties go to the larger score: same picks as sprm        => 0.5
#   first     Q0: s0 right, s2 wrong; Q1: s0 wrong, s2 right             => 0.5
#   oracle    every group holds a right answer                            => 1.0
# k=4, one group:
#   sprm      Q0: s1 (0.9) wrong; Q1: s3 (0.95) wrong                     => 0.0
#   majority  Q0: {5}x2 (0.7) vs {3}x2 (1.3) -> 3 wrong; Q1: {7}x2 wins    => 0.5
#   weighted  Q0: {3} 1.3 wrong; Q1: {8} 0.95 > {7} 0.9 wrong             => 0.0
#   first     Q0: s0 right; Q1: s0 wrong                                  => 0.5
#   oracle                                                               => 1.0
EXPECTED = {
    1: {"sprm": 0.5, "majority": 0.5, "weighted": 0.5, "first": 0.5, "oracle": 0.5},
    2: {"sprm": 0.5, "majority": 0.5, "weighted": 0.5, "first": 0.5, "oracle": 1.0},
    4: {"sprm": 0.0, "majority": 0.5, "weighted": 0.0, "first": 0.5, "oracle": 1.0},
}
# tokens per group: k=1 (25 + 20)/2; k=2 ((30+70)/2 + (20+60)/2)/2; k=4 (100 + 80)/2
EXPECTED_TOKENS = {1: 22.5, 2: 45.0, 4: 90.0}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_metrics_on_a_hand_computed_example(k):
    questions = hand_example()
    for strategy, value in EXPECTED[k].items():
        assert accuracy_at_k(questions, k, strategy) == pytest.approx(value), strategy
    assert tokens_at_k(questions, k) == pytest.approx(EXPECTED_TOKENS[k])


def test_summarize():
    report = summarize(hand_example(), [1, 2, 4])
    assert report["num_questions"] == 2
    assert report["pass@1"] == pytest.approx(0.5)
    assert report["answered_fraction"] == pytest.approx(7 / 8)  # Q1 s0 has no box
    assert report["truncated_fraction"] == 0.0
    assert report["by_k"]["2"]["groups_per_question"] == 2
    accuracy = report["by_k"]["4"]["accuracy"]
    assert {name: accuracy[name] for name in EXPECTED[4]} == pytest.approx(EXPECTED[4])
    # one step per candidate: every step aggregation is the score itself
    assert accuracy["sprm:agg=min"] == accuracy["sprm:agg=last"] == accuracy["sprm"]
    assert "logprob" not in accuracy and "deepconf:eta=10" not in accuracy  # no token confidences recorded
    with pytest.raises(ValueError, match="at least 8"):
        accuracy_at_k(hand_example(), 8, "sprm")


# ---------------------------------------------------------------- the harness with a fake sampler

ANSWERS = {"q0": ["5", "3", "3", "5"], "q1": [None, "7", "7", "8"], "q2": ["1", "1", "2", "2"]}
SCORES = [0.2, 0.9, 0.4, 0.5]
EXAMPLES = [Example("q0", "5"), Example("q1", "7"), Example("q2", "2")]


class FakeSampler:
    """Answers from ANSWERS keyed by the prompt; records every call; can fail after some calls."""

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, prompts, k, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append((list(prompts), k, seed))
        return [[cand(j, ANSWERS[p.removeprefix("Q: ")][j], SCORES[j], 10 * (j + 1), prompt_index=i)
                 for j in range(k)] for i, p in enumerate(prompts)]


def test_evaluate_writes_candidates_and_report(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(e.to_record()) + "\n" for e in EXAMPLES[:2]))
    sampler = FakeSampler()
    report = evaluate(data, sampler, EvalConfig(ks=(4, 1, 2), seed=10), tmp_path / "out",
                      format_prompt=lambda q: "Q: " + q, progress=False)
    # one call per question (batch_size None), n = 4, seed = base + question index
    assert sampler.calls == [(["Q: q0"], 4, 10), (["Q: q1"], 4, 11)]
    lines = (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == [0, 1]
    assert records[1]["question"] == "q1" and records[1]["answer"] == "7"
    assert [c["extra"]["correct"] for c in records[0]["candidates"]] == [True, False, False, True]
    assert all(c["prompt_index"] == 1 for c in records[1]["candidates"])
    # Q1's scores differ from hand_example (0.5 not 0.95 on s3); recompute k=4 by hand:
    # sprm Q0 s1 wrong, Q1 s1 (0.9) right -> 0.5; weighted Q1 {7}: 1.3 > {8}: 0.5 right -> 0.5
    assert report["by_k"]["4"]["accuracy"]["sprm"] == pytest.approx(0.5)
    assert report["by_k"]["4"]["accuracy"]["weighted"] == pytest.approx(0.5)
    assert report["pass@1"] == pytest.approx(0.5)
    assert list(report["by_k"]) == ["1", "2", "4"]
    for name in ("report.json", "report.md", "accuracy_vs_k.png", "accuracy_vs_tokens.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| strategy | k=1 | k=2 | k=4 |" in md
    for label in ("sprm@k", "maj@k", "weighted@k", "first@k", "pass@k", "tokens/group"):
        assert f"| {label} |" in md
    assert (tmp_path / "out" / "accuracy_vs_k.png").read_bytes()[:4] == b"\x89PNG"


def test_batching_puts_several_questions_in_one_call(tmp_path):
    sampler = FakeSampler()
    evaluate(EXAMPLES, sampler, EvalConfig(ks=(2,), batch_size=4, seed=None), tmp_path, plots=False,
             progress=False)
    # batch_size 4 sequences / n 2 = 2 questions per call
    assert sampler.calls == [(["q0", "q1"], 2, None), (["q2"], 2, None)]


def test_resume_after_a_crash_and_a_partial_line(tmp_path):
    config = EvalConfig(ks=(1, 2, 4))
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate(EXAMPLES, FakeSampler(fail_after=2), config, tmp_path / "run", progress=False, plots=False)
    path = tmp_path / "run" / "candidates.jsonl"
    assert len(path.read_text().splitlines()) == 2
    with open(path, "a") as f:
        f.write('{"index": 2, "question": "q2", "cand')  # an interrupted write
    sampler = FakeSampler()
    resumed = evaluate(EXAMPLES, sampler, config, tmp_path / "run", progress=False, plots=False)
    assert sampler.calls == [(["q2"], 4, 2)]  # only the missing question
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1, 2]
    fresh = evaluate(EXAMPLES, FakeSampler(), config, tmp_path / "fresh", progress=False, plots=False)
    assert resumed == fresh
    # a finished run resumes to the same report without sampling
    again = FakeSampler()
    assert evaluate(EXAMPLES, again, config, tmp_path / "run", progress=False, plots=False) == fresh
    assert again.calls == []


def test_resume_with_batches_draws_the_same_samples(tmp_path):
    # 2 questions per call (batch 4 / n 2): chunks {q0, q1} seed 5 and {q2} seed 7, whatever is pending
    config = EvalConfig(ks=(2,), batch_size=4, seed=5)
    uninterrupted = FakeSampler()
    evaluate(EXAMPLES, uninterrupted, config, tmp_path / "full", progress=False, plots=False)
    assert [(p, seed) for p, _, seed in uninterrupted.calls] == [(["q0", "q1"], 5), (["q2"], 7)]
    # an interrupted run that had written q0 only: its chunk is sampled again whole, with the same seed
    run = tmp_path / "run"
    evaluate(EXAMPLES[:1], FakeSampler(), config, run, progress=False, plots=False)
    resumed = FakeSampler()
    evaluate(EXAMPLES, resumed, config, run, progress=False, plots=False)
    assert resumed.calls == uninterrupted.calls
    assert (run / "candidates.jsonl").read_text() == (tmp_path / "full" / "candidates.jsonl").read_text()


def test_task_grades_and_labels_steps(tmp_path):
    from thinkscale.tasks.registry import get_task

    # countdown: any expression that hits the target is right; every right text votes on its own
    q = "Make 10 from 2, 3, 4 with + - * /, using each number once."
    texts = ["3 * 4 = 12.\n\n12 - 2 = 11.\n\n</think>\n\\boxed{3 * 4 + 2}",  # slip at step 2 (4 * 2 = 8 would be a dead end)
             "3 * 2 = 6.\n\n6 + 4 = 10.\n\n</think>\n\\boxed{3 * 2 + 4}",      # right
             "2 * 3 = 6.\n\n4 + 6 = 10.\n\n</think>\n\\boxed{4 + 2 * 3}",      # right, another text
             "4 * 3 = 12.\n\n12 - 2 = 10.\n\n</think>\n\\boxed{4 * 3 - 2}"]    # right, a third text

    def sampler(prompts, k, seed):
        out = []
        for p in prompts:
            cands = [cand(j, None, 0.5, 4) for j in range(k)]
            for c, text in zip(cands, texts):
                c.text, c.step_ends = text, [1, 3]
            out.append(cands)
        return out

    report = evaluate([Example(q, "4 * 2 + 2")], sampler, EvalConfig(ks=(4,), task="countdown"), tmp_path,
                      progress=False, plots=False)
    record = json.loads((tmp_path / "candidates.jsonl").read_text())
    assert [c["extra"]["correct"] for c in record["candidates"]] == [False, True, True, True]
    assert [c["extra"]["step_truth"] for c in record["candidates"]] == [[True, False], [True, True],
                                                                          [True, True], [True, True]]
    assert report["scorers"]["labelled_candidates"] == 4
    # four different texts: four classes of one; majority falls back to the higher score then first seen
    assert report["by_k"]["4"]["accuracy"]["majority"] == 0.0
    assert get_task("countdown").equivalent("(3*2)+4", "3 * 2 + 4")
    with pytest.raises(ValueError, match="unknown task 'chess'; valid: arithmetic, countdown"):
        EvalConfig(task="chess")


def test_resume_refuses_other_data_or_larger_k(tmp_path):
    evaluate(EXAMPLES[:1], FakeSampler(), EvalConfig(ks=(2,)), tmp_path, progress=False, plots=False)
    with pytest.raises(ValueError, match="does not match the data"):
        evaluate([Example("q1", "7")], FakeSampler(), EvalConfig(ks=(2,)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="needs 4"):
        evaluate(EXAMPLES[:1], FakeSampler(), EvalConfig(ks=(4,)), tmp_path, progress=False)
    path = tmp_path / "candidates.jsonl"
    path.write_text("garbage\n" + path.read_text())
    with pytest.raises(ValueError, match="candidates.jsonl:1: malformed"):
        load_records(path)


def test_bad_data_files(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "a", "answer": "1"}\n{"question": "b", answer: 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        evaluate(bad_json, FakeSampler(), EvalConfig(), tmp_path / "o1", progress=False)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="missing field 'answer'"):
        evaluate(missing, FakeSampler(), EvalConfig(), tmp_path / "o2", progress=False)


def test_bad_sampler_output(tmp_path):
    def short(prompts, k, seed):
        return [[cand(0, "1", 0.5, 1)] for _ in prompts]

    with pytest.raises(ValueError, match="1 candidates for question 0, expected 2"):
        evaluate(EXAMPLES, short, EvalConfig(ks=(2,)), tmp_path, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"ks": ()}, "ks"), ({"ks": (0, 2)}, "ks"), ({"temperature": -1.0}, "temperature"),
     ({"top_p": 0.0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"batch_size": 0}, "batch_size")],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_config_keeps_zero_temperature_and_seed():
    config = EvalConfig(ks=(8, 2, 2), temperature=0.0, seed=0)
    assert config.ks == (2, 8) and config.n == 8
    assert config.temperature == 0.0 and config.seed == 0


def test_paired_bootstrap_interval():
    from thinkscale.reflect.evaluate import paired_bootstrap

    same = paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1])
    assert (same["mean"], same["low"], same["high"], same["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    # a wins on half of 100 questions, never loses: mean 0.5; the standard error is 0.05, so the 95 %
    # interval is about 0.5 +- 0.1 and lies far above 0
    r = paired_bootstrap([1] * 50 + [0] * 50, [0] * 100, resamples=4000, seed=1)
    assert r["mean"] == 0.5 and 0.38 < r["low"] < 0.45 and 0.55 < r["high"] < 0.62 and r["excludes_zero"]
    # one win and one loss: the interval straddles 0
    tie = paired_bootstrap([1, 0] + [1] * 8, [0, 1] + [1] * 8, resamples=2000)
    assert tie["mean"] == 0.0 and tie["low"] < 0 < tie["high"] and not tie["excludes_zero"]
    assert paired_bootstrap([1, 0], [0, 0], seed=3) == paired_bootstrap([1, 0], [0, 0], seed=3)  # seeded
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1, 0], [1])

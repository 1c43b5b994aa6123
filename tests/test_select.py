"""Selection strategies on hand-made candidates with hand-computed winners (thinkscale.reflect.select)."""
import pytest

from thinkscale.reflect.candidate import Candidate
from thinkscale.reflect.select import EFFORT_K, STRATEGIES, effort_to_k, select


def cand(sample_index, answer, score, prompt_index=0):
    text = "no answer" if answer is None else f"work... \\boxed{{{answer}}}"
    return Candidate(prompt_index=prompt_index, sample_index=sample_index, text=text, token_ids=[1, 2],
                     step_scores=[score], score=score, finished=True, truncated=False,
                     num_prompt_tokens=3, num_generated_tokens=2)


# answers  : 1/2   0.5   7     7     7     none
# scores   : 0.9   0.8   0.1   0.2   0.3   0.95
# classes  : {1/2, 0.5} count 2 sum 1.7;  {7} count 3 sum 0.6
POOL = [cand(0, r"\frac{1}{2}", 0.9), cand(1, "0.5", 0.8), cand(2, "7", 0.1), cand(3, "7.0", 0.2),
        cand(4, "7", 0.3), cand(5, None, 0.95)]


def test_sprm_is_argmax_score():
    assert select(POOL, "sprm").sample_index == 5  # answerless but scored highest: sprm ignores answers


def test_majority_counts_equivalent_answers():
    # {7, 7.0, 7} has 3 votes vs 2; returned member = highest score in the class (0.3 -> sample 4)
    assert select(POOL, "majority").sample_index == 4


def test_weighted_sums_scores():
    # class {1/2, 0.5}: 0.9 + 0.8 = 1.7 > 0.6; highest-scored member: sample 0
    assert select(POOL, "weighted").sample_index == 0


def test_first_and_oracle():
    assert select(POOL, "first").sample_index == 0
    assert select(POOL, "oracle", reference="7").sample_index == 2  # first correct
    assert select(POOL, "oracle", reference="0.5").sample_index == 0
    assert select(POOL, "oracle", reference="99").sample_index == 0  # none correct: sample 0


def test_order_of_the_list_does_not_matter():
    shuffled = [POOL[i] for i in (3, 5, 1, 4, 0, 2)]
    for strategy in ("sprm", "majority", "weighted", "first"):
        assert select(shuffled, strategy).sample_index == select(POOL, strategy).sample_index
    assert select(shuffled, "oracle", reference="7").sample_index == 2


def test_ties():
    # sprm tie -> lowest sample index
    assert select([cand(1, "3", 0.5), cand(0, "4", 0.5)], "sprm").sample_index == 0
    # majority 2-2 tie -> larger total score: {5}: 0.2+0.3=0.5 < {6}: 0.4+0.4=0.8
    pool = [cand(0, "5", 0.2), cand(1, "6", 0.4), cand(2, "5", 0.3), cand(3, "6", 0.4)]
    assert select(pool, "majority").sample_index == 1
    # majority tie in count and score -> the class seen first
    pool = [cand(0, "6", 0.5), cand(1, "5", 0.5)]
    assert select(pool, "majority").sample_index == 0
    # weighted tie in score -> larger class: {8}: 0.3+0.3 vs {9}: 0.6
    pool = [cand(0, "9", 0.6), cand(1, "8", 0.3), cand(2, "8", 0.3)]
    assert select(pool, "weighted").sample_index == 1


def test_answerless_candidates_never_win_a_vote():
    pool = [cand(0, None, 0.9), cand(1, None, 0.9), cand(2, None, 0.9), cand(3, "4", 0.1)]
    assert select(pool, "majority").sample_index == 3
    assert select(pool, "weighted").sample_index == 3
    # ...unless nobody has an answer: then the best-scored of all
    pool = [cand(0, None, 0.2), cand(1, None, 0.7)]
    assert select(pool, "majority").sample_index == 1
    assert select(pool, "weighted").sample_index == 1


def test_answers_from_evaluator_and_think_tags():
    graded = cand(0, "1", 0.5)
    graded.extra["answer"] = "2"  # set by an evaluator: takes precedence over the text
    other = cand(1, "1", 0.4)
    other.extra["answer"] = "1"
    third = cand(2, "1", 0.3)
    third.extra["answer"] = None
    assert select([graded, other, third], "majority").sample_index == 0  # 1-1 tie, 0.5 > 0.4
    tagged = [cand(0, "1", 0.5), cand(1, "2", 0.1), cand(2, "2", 0.1)]
    tagged[1].text = "<think>x</think>" + tagged[1].text
    tagged[2].text = "<think>x</think>" + tagged[2].text
    # with think_end required, sample 0 has no answer; without it 2 beats 1 on votes anyway
    assert select(tagged, "weighted", think_end="</think>").sample_index == 1
    assert select(tagged, "weighted").sample_index == 0  # {1}: 0.5 > {2}: 0.2


def test_oracle_needs_a_reference_or_grades():
    with pytest.raises(ValueError, match="reference"):
        select(POOL, "oracle")
    graded = [cand(0, "1", 0.1), cand(1, "2", 0.2)]
    graded[0].extra["correct"] = False
    graded[1].extra["correct"] = True
    assert select(graded, "oracle").sample_index == 1


def test_bad_input():
    with pytest.raises(ValueError) as info:
        select(POOL, "beam")
    for name in ("sprm", "majority", "weighted", "first", "oracle"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="at least one"):
        select([], "sprm")


def test_registry_is_the_one_list():
    assert list(STRATEGIES) == ["sprm", "majority", "weighted", "logprob", "confidence", "deepconf",
                                "self_certainty", "first", "oracle"]


def sig(sample_index, answer, logprobs, confidences=None, certainties=None, steps=(0.5,)):
    c = cand(sample_index, answer, 0.0)
    n = len(logprobs)
    c.token_ids, c.num_generated_tokens = [1] * n, n
    c.token_logprobs = list(logprobs)
    c.token_confidences = list(confidences if confidences is not None else [1.0] * n)
    c.token_certainties = list(certainties if certainties is not None else [1.0] * n)
    c.step_scores = list(steps)
    return c


def test_sprm_aggregations():
    # step scores        geomean(recorded)  min    last
    # a: 0.9 0.2 0.9     0.5                0.2    0.9
    # b: 0.6 0.6 0.6     0.6                0.6    0.6
    a, b = cand(0, "1", 0.5), cand(1, "2", 0.6)
    a.step_scores, b.step_scores = [0.9, 0.2, 0.9], [0.6, 0.6, 0.6]
    assert select([a, b], "sprm").sample_index == 1
    assert select([a, b], "sprm:agg=geomean").sample_index == 1
    assert select([a, b], "sprm:agg=min").sample_index == 1
    assert select([a, b], "sprm:agg=last").sample_index == 0
    with pytest.raises(ValueError, match="geomean, min, last"):
        select([a, b], "sprm:agg=max")
    with pytest.raises(ValueError, match="bad option 'k=3'.*agg=geomean"):
        select([a, b], "sprm:k=3")


def test_logprob_and_confidence():
    # mean log-probs: -0.5, -0.2 (best), -1.0; mean confidences: 2, 3, 5 (best); lowest window of 2:
    #   c0 [2,2]->2, c1 [1,5] -> min(mean(1,5)=3) = 3 ... c2 [9,1,5] -> windows 5, 3 -> 3 ties c1 -> lower index
    pool = [sig(0, "1", [-0.5, -0.5], [2, 2]), sig(1, "2", [-0.1, -0.3], [1, 5]), sig(2, "3", [-1, -1, -1], [9, 1, 5])]
    assert select(pool, "logprob").sample_index == 1
    assert select(pool, "confidence").sample_index == 2  # means 2, 3, 5
    assert select(pool, "confidence:measure=lowest,window=2").sample_index == 1
    assert select(pool, "confidence:measure=tail,window=1").sample_index == 1  # last tokens 2, 5, 5 -> tie, first
    with pytest.raises(ValueError, match="token confidences"):
        select([cand(0, "1", 0.5)], "logprob")  # 2 tokens generated, none recorded


def test_deepconf_filters_then_votes_by_confidence():
    # trace confidence (mean, window larger than every trace): 5, 4, 3, 2, 1 for samples 0..4
    # answers:                                                  A  B  B  A  A
    pool = [sig(i, ans, [-0.1], [conf]) for i, (ans, conf) in enumerate(zip("ABBAA", [5, 4, 3, 2, 1]))]
    # eta 100: weights A 5+2+1=8 > B 4+3=7 -> A, its most confident member sample 0
    assert select(pool, "deepconf:eta=100").sample_index == 0
    # eta 60 keeps the top ceil(3) = samples 0, 1, 2: A 5 < B 7 -> B, member sample 1
    assert select(pool, "deepconf:eta=60").sample_index == 1
    # eta 10 keeps ceil(0.5) -> 1 trace: sample 0
    assert select(pool, "deepconf:eta=10").sample_index == 0
    with pytest.raises(ValueError, match="percentage"):
        select(pool, "deepconf:eta=0")


def test_self_certainty_borda():
    # certainties 0.9, 0.8, 0.7, 0.6 -> ranks 0..3 -> weights (4-r)^p
    # answers      A    B    B    A
    pool = [sig(i, ans, [-0.1], certainties=[c]) for i, (ans, c) in enumerate(zip("ABBA", [0.9, 0.8, 0.7, 0.6]))]
    # p=1: A 4+1=5, B 3+2=5 -> tie: larger class (2 vs 2) -> first seen class A, member sample 0
    assert select(pool, "self_certainty:p=1").sample_index == 0
    # p=2: A 16+1=17, B 9+4=13 -> A
    assert select(pool, "self_certainty:p=2").sample_index == 0
    # p=0.5: A 2+1=3, B 1.732+1.414=3.146 -> B, most certain member sample 1
    assert select(pool, "self_certainty").sample_index == 1


def test_effort():
    assert EFFORT_K == {"low": 2, "medium": 8, "high": 32}
    assert [effort_to_k(m) for m in ("low", "medium", "high")] == [2, 8, 32]
    assert effort_to_k("max", table={"max": 64}) == 64
    with pytest.raises(ValueError, match="low, medium, high"):
        effort_to_k("extreme")
    with pytest.raises(ValueError, match="positive"):
        effort_to_k("none", table={"none": 0})

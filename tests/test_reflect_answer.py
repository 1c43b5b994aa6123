"""reflect.answer: one request type and one answer function - a seeded request answers exactly as offline
`sample` (or `search`) + `select`, stops are cut before selection, and bad requests are refused."""
from __future__ import annotations

import pytest

from reflect_util import stepping_model
from thinkscale.reflect import sample, select
from thinkscale.reflect.answer import AnswerRequest, answer, cut_at_stop
from thinkscale.reflect.search import SearchConfig, search

PROMPTS = ["First we add the numbers.\n\n", "Two"]


@pytest.fixture(scope="module")
def model():
    return stepping_model(eos_scale=10.0)


def test_a_seeded_request_answers_as_offline_sample_and_select(model):
    rm, tok = model
    ids = [tok.encode(p) for p in PROMPTS]
    request = AnswerRequest(ids, n=2, k=3, max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7, selection="sprm")
    choices = answer(rm, tok, request, head_trained=True)
    # answer q = (prompt q // 2, choice q % 2): the rows of sample() on each prompt repeated n times
    groups = sample(rm, tok, [ids[0], ids[0], ids[1], ids[1]], k=3, temperature=1.0, top_p=0.95,
                    max_new_tokens=20, seed=7)
    assert len(choices) == 4
    for choice, group in zip(choices, groups):
        assert [c.token_ids for c in choice.group] == [c.token_ids for c in group]
        assert choice.candidate.token_ids == select(group, "sprm").token_ids
        assert choice.strategy == "sprm" and choice.finished == choice.candidate.finished


def test_stop_strings_cut_every_candidate_before_selection(model):
    rm, tok = model
    request = AnswerRequest([tok.encode(PROMPTS[0])], k=4, max_new_tokens=24, temperature=1.0, seed=3,
                            stop=("\n",), selection="logprob")
    [choice] = answer(rm, tok, request)
    free = answer(rm, tok, AnswerRequest([tok.encode(PROMPTS[0])], k=4, max_new_tokens=24, temperature=1.0, seed=3,
                                         selection="logprob"))[0]
    for stopped, whole in zip(choice.group, free.group):
        cut, hit = cut_at_stop(whole.text, ("\n",))
        assert stopped.text == cut and "\n" not in stopped.text
        if hit:  # the row stopped at the stop string: a prefix of the free run, marked finished
            assert stopped.finished and whole.token_ids[:len(stopped.token_ids)] == stopped.token_ids


def test_an_untrained_head_falls_back_to_logprob(model):
    rm, tok = model
    [choice] = answer(rm, tok, AnswerRequest([tok.encode("Two")], k=3, max_new_tokens=12, seed=1), head_trained=False)
    assert choice.strategy == "logprob"
    [single] = answer(rm, tok, AnswerRequest([tok.encode("Two")], k=1, max_new_tokens=12, seed=1))
    assert single.strategy == "single"


def test_a_searched_request_answers_as_offline_search_and_select(model):
    rm, tok = model
    ids = [tok.encode(p) for p in PROMPTS]
    request = AnswerRequest(ids, k=4, max_new_tokens=16, temperature=1.0, seed=5, search="prune:signal=confidence",
                            selection="majority")
    choices = answer(rm, tok, request)
    results = search(rm, tok, ids, SearchConfig.parse("prune:signal=confidence", 4), 1.0, max_new_tokens=16, seed=5)
    for choice, result in zip(choices, results):
        assert [c.token_ids for c in choice.group] == [c.token_ids for c in result.complete]
        assert choice.candidate.token_ids == select(result.complete, "majority").token_ids


@pytest.mark.parametrize("kw,message", [
    (dict(n=0), "n must be"), (dict(k=1.5), "k must be"), (dict(selection="best"), "best"),
    (dict(search="beem"), "beem"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(prompts=[[]]), "empty"),
])
def test_bad_requests_are_refused_when_made(kw, message):
    with pytest.raises(ValueError, match=message):
        AnswerRequest(**{"prompts": [[1, 2]], **kw})

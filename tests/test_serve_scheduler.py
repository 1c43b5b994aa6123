"""The server's scheduler in process, counted in decode steps (never seconds, so a loaded machine cannot
flake it): rows join a running batch and answer as alone, a cheap request does not wait for a heavy one,
KV admission holds rows back, and the static scheduler keeps the former waves."""
from __future__ import annotations

import time

import pytest

from reflect_util import stepping_model
from thinkscale.reflect.engine import RowSpec, decode_rows
from thinkscale.serve.scheduler import Job, Scheduler

HIGH_ROWS, HIGH_TOKENS, NONE_TOKENS = 32, 40, 8


@pytest.fixture(scope="module")
def model():
    return stepping_model(eos_scale=1.0)


def scheduler(model, max_batch=64, eos=(), **kw) -> Scheduler:
    rm, tok = model
    return Scheduler(rm, tok, set(eos), tok.pad_token_id, max_batch=max_batch, **kw)  # no EOS: rows run their budget


def wait_for_step(s: Scheduler, step: int) -> None:
    deadline = time.monotonic() + 60
    while s.steps < step:
        assert time.monotonic() < deadline, f"the scheduler did not reach step {step} in 60 s (at {s.steps})"
        time.sleep(0.001)


def high_and_none(model, mode: str) -> tuple[Job, Job]:
    """A best-of-32 request, then a one-row request submitted once the first has decoded 3 steps."""
    rm, tok = model
    s = scheduler(model, mode=mode)
    try:
        high = Job([RowSpec(tok.encode("Compute 3 times 5."), HIGH_TOKENS, 1.0, 0.95, seed=j) for j in range(HIGH_ROWS)])
        none = Job([RowSpec(tok.encode("Two"), NONE_TOKENS, 1.0, 0.95, seed=99)])
        s.submit(high)
        wait_for_step(s, 3)
        s.submit(none)
        none.future.result(timeout=60), high.future.result(timeout=60)
        return high, none
    finally:
        s.close()


def test_a_request_joins_the_running_batch_finishes_first_and_answers_as_alone(model):
    rm, tok = model
    high, none = high_and_none(model, "continuous")
    assert high.admitted_step == 0 and none.admitted_step >= 3  # it joined rows that were mid-decode
    assert none.finished_step - none.admitted_step == NONE_TOKENS  # its own 8 steps, no waiting
    assert none.finished_step < high.finished_step  # done while the heavy request still decodes
    for job in (high, none):  # every row draws what it draws alone
        for spec, candidate in zip(job.rows, job.future.result()):
            assert candidate.token_ids == decode_rows(rm, [spec], set(), tok.pad_token_id)[0].tokens


def test_the_static_scheduler_makes_a_request_wait_for_the_wave(model):
    high, none = high_and_none(model, "static")
    assert none.admitted_step >= high.finished_step == HIGH_TOKENS  # it waited for the whole wave


def test_kv_admission_holds_rows_back_and_refuses_what_never_fits(model):
    rm, tok = model
    prompt = tok.encode("Two")
    s = scheduler(model, max_kv_tokens=2 * (len(prompt) + 10))
    try:
        first = Job([RowSpec(prompt, 10, seed=j) for j in range(2)])
        second = Job([RowSpec(prompt, 10, seed=5)])
        s.submit(first)
        wait_for_step(s, 1)
        s.submit(second)
        second.future.result(timeout=60)
        assert second.admitted_step >= first.finished_step  # no room beside the first request's two rows
        with pytest.raises(ValueError, match="KV positions"):
            s.submit(Job([RowSpec(prompt, 100)]))
        assert s.stats()["prefills"] == 2  # the first request's two rows shared one prefill
    finally:
        s.close()


def run_jobs(model, max_batch, first, later, at_step=2, later_still=None, at_step_2=None):
    """Submit `first`, then the `later` jobs at step `at_step` (and `later_still` at `at_step_2`); wait for all."""
    s = scheduler(model, max_batch=max_batch)
    try:
        s.submit(first)
        wait_for_step(s, at_step)
        for job in later:
            s.submit(job)
        if later_still is not None:
            wait_for_step(s, at_step_2)
            s.submit(later_still)
        for job in [first, *later, *([later_still] if later_still else [])]:
            job.future.result(timeout=60)
    finally:
        s.close()


def rows(tok, n, tokens, seed):
    return [RowSpec(tok.encode("Two"), tokens, 1.0, 1.0, seed=seed + j) for j in range(n)]


def test_small_requests_go_first_and_a_big_one_enters_in_parts(model):
    rm, tok = model
    first, big, small = Job(rows(tok, 3, 30, 0)), Job(rows(tok, 4, 40, 10)), Job(rows(tok, 1, 5, 20))
    run_jobs(model, 4, first, [big, small])
    # the one free row goes to the small request, though it came second; when that ended, the big one's
    # first row took it (the rest entered when the first request ended)
    assert small.admitted_step < small.finished_step <= big.admitted_step < first.finished_step
    for spec, candidate in zip(big.rows, big.future.result()):  # rows admitted apart draw what they draw alone
        assert candidate.token_ids == decode_rows(rm, [spec], set(), tok.pad_token_id)[0].tokens


def test_a_request_that_waited_its_own_length_is_never_starved_by_smaller_ones(model):
    rm, tok = model
    first, big, small, late = (Job(rows(tok, 4, 30, 0)), Job(rows(tok, 4, 10, 10)), Job(rows(tok, 1, 5, 20)),
                               Job(rows(tok, 1, 5, 30)))
    run_jobs(model, 4, first, [big, small], later_still=late, at_step_2=15)
    # big waited from step 2 with no room; when room came (step 30) it had waited > 10 steps: it goes first,
    # alone, though smaller requests (which go first otherwise) waited too
    assert big.admitted_step == first.finished_step == 30
    assert small.admitted_step > big.admitted_step and late.admitted_step > big.admitted_step


def test_a_search_shares_the_running_batch_and_answers_as_offline(model):
    from thinkscale.reflect.answer import AnswerRequest

    rm, tok = model
    s = scheduler(model, eos={tok.eos_token_id})
    try:
        high = Job([RowSpec(tok.encode("Compute 3 times 5."), 60, 1.0, 0.95, seed=j) for j in range(8)])
        s.submit(high)
        wait_for_step(s, 3)
        request = AnswerRequest([tok.encode("Two")], k=4, max_new_tokens=12, temperature=1.0, seed=5,
                                search="prune:signal=confidence")
        searched = Job([], call=lambda cancelled, run_rows: request.run_search(rm, tok, 5, cancelled, run_rows))
        s.submit(searched)
        decoded = searched.future.result(timeout=60)
        high.future.result(timeout=60)
        assert searched.finished_step < high.finished_step  # decoded beside the running request
        offline = request.run_search(rm, tok, 5)
        assert [[c.token_ids for c in g] for g in decoded.groups] == [[c.token_ids for c in g] for g in offline.groups]
        assert decoded.generated_tokens == offline.generated_tokens
    finally:
        s.close()

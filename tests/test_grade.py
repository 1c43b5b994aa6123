"""Answer extraction and equivalence (thinkscale.tasks.grading)."""
import multiprocessing
import threading
import time

import pytest

from thinkscale.tasks.grading import (
    answers_equivalent,
    extract_answer,
    extract_boxed,
    grade,
    normalize_answer,
    reference_to_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"first \boxed{1} then \boxed{2}", "2"),  # the last box wins
        (r"\boxed {7}", "7"),  # spacing before the brace
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\fbox{x}", "x"),
        (r"\boxed{ 3 }", "3"),
        (r"no box here", None),
        (r"\boxed{1} and \boxed{2", None),  # the last box is unbalanced: malformed, no fallback
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxed", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_with_think_tags():
    text = r"<think>maybe \boxed{1}</think> the answer is \boxed{2}"
    assert extract_answer(text, think_end="</think>") == "2"
    assert extract_answer(r"<think>maybe \boxed{1}</think> no box", think_end="</think>") is None
    # the tag is required but missing: no answer, even though a box is there
    assert extract_answer(r"<think>still thinking \boxed{1}", think_end="</think>") is None
    assert extract_answer(r"<think>still thinking \boxed{1}", think_end=None) == "1"
    # after the *last* tag
    assert extract_answer(r"</think>\boxed{1}</think>\boxed{3}", think_end="</think>") == "3"
    assert extract_answer(r"\boxed{}") is None  # empty box
    assert extract_answer(None) is None


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("$ 1 000 $", "1000"),
        (r"\text{5 apples}", "5apples"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        (r"\tfrac12", r"\frac12"),
        ("17.", "17"),
        ("1,234,567", "1234567"),
        ("1{,}000", "1000"),
        ("+5", "5"),
        ("1.0", "1"),
        ("0.50", "0.5"),
        ("-2.500", "-2.5"),
        ("007", "7"),
        (r"90^\circ", "90"),
        (r"\(x\)", "x"),
        ("(1,2)", "(1,2)"),  # a pair, not a thousands separator
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("1.0", "1", True),
        ("1,000", "1000", True),
        (r"\frac{1}{2}", "0.5", True),  # math-verify: fraction vs decimal
        (r"\frac12", r"\dfrac{1}{2}", True),
        ("1/2", "0.5", True),
        (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", True),
        (r"\frac{1}{3}", "0.5", False),
        ("2", "3", False),
        (r"\text{(A)}", "(A)", True),
        ("", "", False),
        (None, "1", False),
        (r"\frac{1}{", "0.5", False),  # malformed LaTeX: wrong, no exception
    ],
)
def test_answers_equivalent(a, b, same):
    assert answers_equivalent(a, b) is same


def test_grade_end_to_end():
    assert grade(r"The answer is \boxed{\frac{1}{2}}.", "0.5")
    assert grade(r"\boxed{0.5}", r"\frac{1}{2}")
    assert grade(r"\boxed{1,000}", 1000)  # numeric reference
    assert grade(r"\boxed{12}", r"so the total is \boxed{12}")  # boxed reference solution
    assert not grade(r"\boxed{13}", "12")
    assert not grade("no answer", "12")
    assert not grade(r"\boxed{12", "12")  # unbalanced
    assert not grade(r"\boxed{}", "")
    assert not grade("", "12")
    assert not grade(None, "12")
    assert not grade(r"\boxed{12}", None)
    assert grade(r"<think>\boxed{3}</think>\boxed{12}", "12", think_end="</think>")
    assert not grade(r"<think>\boxed{12}</think>\boxed{3}", "12", think_end="</think>")
    assert not grade(r"<think>\boxed{12}", "12", think_end="</think>")


def test_reference_to_answer():
    assert reference_to_answer(42) == "42"
    assert reference_to_answer(0.5) == "0.5"
    assert reference_to_answer("  7 ") == "7"
    assert reference_to_answer("") is None
    assert reference_to_answer(None) is None


def _in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as error:  # noqa: BLE001 - the test reports it below
            box["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "grading hung in a thread"
    assert "error" not in box, box.get("error")
    return box["result"]


def test_math_verify_works_off_the_main_thread():
    # math-verify alone raises ValueError here (its time limit is SIGALRM); ours must not.
    assert _in_thread(lambda: answers_equivalent(r"\frac{1}{4}", "0.25"))
    assert not _in_thread(lambda: answers_equivalent(r"\frac{1}{4}", "0.3"))
    assert _in_thread(lambda: grade(r"\boxed{\frac{3}{6}}", "0.5"))


@pytest.mark.parametrize("where", ["main", "thread"])
def test_runaway_comparison_is_cut_off(where):
    # 9^(9^9) has ~370 million digits: comparing it numerically would run for a very long time.
    def compare():
        start = time.monotonic()
        return answers_equivalent("9^{9^{9}}", "5", timeout_s=1), time.monotonic() - start

    same, seconds = compare() if where == "main" else _in_thread(compare)
    assert same is False
    assert seconds < 10


def _grade_in_child(queue):
    queue.put((grade(r"\boxed{\frac{2}{4}}", "0.5"), grade(r"\boxed{2}", "3")))


def test_grading_in_a_worker_process():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_grade_in_child, args=(queue,), daemon=True)
    proc.start()
    try:
        assert queue.get(timeout=60) == (True, False)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def test_stuck_worker_is_killed_and_replaced(tmp_path):
    # A worker that says it is ready, then never answers (like a comparison stuck in C code).
    import sys

    from thinkscale.tasks.grading import _VerifyWorker

    script = tmp_path / "stuck.py"
    script.write_text('import time\nprint(\'{"ready": true}\', flush=True)\ntime.sleep(600)\n')
    worker = _VerifyWorker(command=[sys.executable, str(script)])
    try:
        start = time.monotonic()
        assert worker.equal("1", "1", timeout_s=1) is False
        assert time.monotonic() - start < 8
        assert worker._proc is None  # killed; the next call starts a fresh one
        assert worker.equal("1", "1", timeout_s=1) is False
    finally:
        worker.close()
    assert worker._proc is None


def test_worker_that_cannot_start_falls_back(tmp_path):
    import sys

    from thinkscale.tasks.grading import _VerifyWorker

    worker = _VerifyWorker(command=[sys.executable, "-c", "raise SystemExit(1)"])
    assert worker.equal("1", "1", timeout_s=1) is False
    assert worker._broken  # no retry storm
    assert worker.equal("1", "1", timeout_s=1) is False

"""Answer extraction and math equivalence: is a completion's final answer right?

Grading is a task concern (`tasks.registry`): every task extracts answers with `extract_answer`, and
"math with math-verify" (`grade`, `answers_equivalent`) is the grader of tasks whose answers are
mathematical values (the arithmetic task, user JSONL data without a task). Pure Python: torch is never
imported here, and math-verify only when a comparison needs it.

The final answer is the last `\\boxed{...}` of the completion (after the think-end tag when the format
uses one). Two answers are equivalent when their normalized strings match, or else when math-verify
says so. Grading never raises: a missing, empty or malformed answer is simply wrong.

Time limit: math-verify bounds its own work with SIGALRM, which only works on the main thread (off it,
math-verify raises ValueError). So on the main thread we call it directly with its own limit, and on
any other thread we send the comparison to a small math-verify subprocess that the caller kills when
it overruns. Either way a comparison that runs out of time counts as "not equivalent".
"""
from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


# ---------------------------------------------------------------- extraction

def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included.

    Escaped braces (`\\{`, `\\}`) do not count. Returns None when there is no box or the last one is
    never closed (a malformed answer is not replaced by an earlier box).
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":  # skip the escaped character: \{ \} \\ never change the depth
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


def extract_answer(text: str, think_end: str | None = None) -> str | None:
    """The final answer of a completion: the last box after the last `think_end` tag.

    With `think_end` set, a completion without that tag has no answer (it never finished thinking).
    Returns None for no answer, an empty box or a malformed one.
    """
    if not isinstance(text, str):
        return None
    if think_end is not None:
        cut = text.rfind(think_end)
        if cut < 0:
            return None
        text = text[cut + len(think_end):]
    answer = extract_boxed(text)
    return answer or None


def reference_to_answer(reference: object) -> str | None:
    """A reference answer as a string: numbers are formatted, a boxed solution is unboxed."""
    if reference is None or isinstance(reference, bool):
        return None
    if isinstance(reference, (int, float)):
        reference = repr(reference)
    if not isinstance(reference, str):
        return None
    if "\\boxed" in reference or "\\fbox" in reference:
        boxed = extract_boxed(reference)
        if boxed is not None:
            reference = boxed
    return reference.strip() or None


# ---------------------------------------------------------------- normalization

_WRAPPERS = [("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")]
_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?:\.|(?![a-zA-Z]))")
_SPACING = re.compile(r"\\[,;:! ]|\\(?:quad|qquad|displaystyle)(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_answer(answer: str) -> str:
    """A canonical string for cheap comparison; "" when nothing is left.

    Drops math delimiters ($, \\( \\)), \\text{} and similar wrappers, \\left/\\right, spacing commands,
    degree marks, whitespace, a trailing period, a leading +, thousands separators; \\dfrac and \\tfrac
    become \\frac; plain decimals are canonical (1.0 -> 1, 0.50 -> 0.5, 007 -> 7).
    """
    s = answer.strip()
    for left, right in _WRAPPERS:
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = _TEXT_COMMANDS.sub(r"\1", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub("", s)
    s = _DEGREES.sub("", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _NUMBER.fullmatch(s):
        s = _canonical_number(s)
    return s


def _canonical_number(s: str) -> str:
    try:
        value = Decimal(s)
    except InvalidOperation:
        return s
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


# ---------------------------------------------------------------- equivalence

def answers_equivalent(a: str | None, b: str | None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two extracted answers mean the same thing (`a` is treated as the gold side).

    Normalized strings first, then math-verify under `timeout_s` seconds (whole seconds on the main
    thread, where math-verify's own alarm is used). Results are cached, so a majority vote that
    compares the same pair many times pays once. None or empty answers are never equivalent.
    """
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    a, b = a.strip(), b.strip()
    if not a or not b:
        return False
    return _equivalent_cached(a, b, float(timeout_s))


@functools.lru_cache(maxsize=1 << 16)
def _equivalent_cached(a: str, b: str, timeout_s: float) -> bool:
    norm_a, norm_b = normalize_answer(a), normalize_answer(b)
    if norm_a and norm_a == norm_b:
        return True
    if _NUMBER.fullmatch(norm_a) and _NUMBER.fullmatch(norm_b):
        return False  # two plain decimals in canonical form that differ: math-verify cannot disagree
    return _math_verify_equal(a, b, timeout_s)


def grade(
    completion_text: str,
    reference_answer: object,
    *,
    think_end: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> bool:
    """True when the completion's final answer (last \\boxed{}) is equivalent to the reference.

    `think_end` (e.g. "</think>"): look only after that tag, and grade as wrong when it is missing.
    The reference may be a plain answer, a number or a solution with a box. Never raises.
    """
    try:
        answer = extract_answer(completion_text, think_end=think_end)
        reference = reference_to_answer(reference_answer)
        return answers_equivalent(reference, answer, timeout_s=timeout_s)
    except Exception:  # grading is a reward: a bug in a corner case must not kill a training run
        logger.warning("grading failed; counted as wrong", exc_info=True)
        return False


def clear_cache() -> None:
    """Forget cached equivalence results."""
    _equivalent_cached.cache_clear()


# ---------------------------------------------------------------- math-verify under a time limit

def _math_verify_equal(gold: str, pred: str, timeout_s: float) -> bool:
    on_main_thread = threading.current_thread() is threading.main_thread()
    if os.name == "posix" and on_main_thread:
        return _math_verify_here(gold, pred, timeout_s)
    return _worker().equal(gold, pred, timeout_s)


def _math_verify_here(gold: str, pred: str, timeout_s: float) -> bool:
    from math_verify import parse, verify

    seconds = max(1, math.ceil(timeout_s))  # SIGALRM counts whole seconds
    try:
        parsed_gold = parse(f"${gold}$", parsing_timeout=seconds)
        parsed_pred = parse(f"${pred}$", parsing_timeout=seconds)
        if not parsed_gold or not parsed_pred:
            return False
        return bool(verify(parsed_gold, parsed_pred, timeout_seconds=seconds))
    except Exception:  # math-verify reports most failures itself; anything left is "not equal"
        logger.debug("math-verify failed on %r vs %r", gold, pred, exc_info=True)
        return False


class _VerifyWorker:
    """A lazily started math-verify subprocess (see _verify_worker.py), shared by this process's
    threads; calls are serialized. A call that overruns kills it; the next call starts a new one."""

    startup_timeout_s = 60.0

    def __init__(self, command: list[str] | None = None) -> None:
        # -I: no sibling file of the script may shadow a standard-library module.
        script = Path(__file__).with_name("_verify_worker.py")
        self._command = [sys.executable, "-I", str(script)] if command is None else command
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._broken = False  # could not start at all: stop trying, grade by normalized strings
        self._owner_pid = os.getpid()
        atexit.register(self.close)

    def equal(self, gold: str, pred: str, timeout_s: float) -> bool:
        seconds = max(1, math.ceil(timeout_s))
        with self._lock:
            if not self._ensure_started():
                return False
            request = json.dumps({"gold": gold, "pred": pred, "timeout": seconds}) + "\n"
            try:
                self._proc.stdin.write(request.encode())
                self._proc.stdin.flush()
                # math-verify's own limit applies to each parse and to verify: allow all three.
                line = self._read_line(time.monotonic() + 3 * seconds + 1.0)
            except OSError:
                line = None
            if line is None:
                logger.warning("math-verify overran %ss on %r vs %r; counted as not equal", seconds, gold, pred)
                self._kill()
                return False
            try:
                return bool(json.loads(line).get("equal", False))
            except ValueError:
                self._kill()
                return False

    def close(self) -> None:
        """Stop the subprocess (only from the process that started it, never from a fork)."""
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            self._kill()

    def _ensure_started(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        self._proc = None
        if self._broken:
            return False
        try:
            self._proc = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
            )
            ready = self._read_line(time.monotonic() + self.startup_timeout_s)
        except OSError:
            ready = None
        if ready is None:
            logger.warning("math-verify worker did not start; off the main thread only normalized "
                           "string comparison is used")
            self._kill()
            self._broken = True
            return False
        return True

    def _read_line(self, deadline: float) -> str | None:
        fd = self._proc.stdout.fileno()
        chunks = b""
        while not chunks.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # the worker died
                return None
            chunks += chunk
        return chunks.decode()

    def _kill(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.kill()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self._proc = None


_WORKERS: dict[int, _VerifyWorker] = {}
_WORKERS_LOCK = threading.Lock()


def _worker() -> _VerifyWorker:
    # Keyed by pid: a forked child must not share its parent's pipes.
    with _WORKERS_LOCK:
        pid = os.getpid()
        if pid not in _WORKERS:
            _WORKERS[pid] = _VerifyWorker()
        return _WORKERS[pid]

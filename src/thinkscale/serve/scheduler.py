"""The request queue in front of the decode engine: one thread owns the model and decodes the candidate
rows of every request on one `reflect.engine.DecodeBatch`.

`mode="continuous"` (the default): a request's rows join the running batch at the next step (prefilled,
one prefill per distinct prompt, and spliced into the cache) and leave it as they end, so a cheap request
never waits for a heavy one to finish. Room is `max_batch` running rows and, with `max_kv_tokens`, that
many KV positions they may grow to (the sum of prompt + max_tokens over running rows). Waiting requests
are admitted smallest first (fewest rows; first come first served among equals), so a cheap request
enters beside heavy ones at the next free row; a best-of-k request that does not fit whole enters in
parts as rows free up (each part shares one prefill), which keeps the batch full. A request that has
waited for room as many steps as its own token budget goes before everything else (the batch drains for
it): nothing is starved. A searched request (`Job.call`) runs on a thread of its own and hands
each of its decode calls to the batch as a row group with its search policy (`Job.policy`): searches share
the batch with everything else. A model whose cache cannot be spliced (`reflect.kv`) decodes in waves
instead (logged once).

`mode="static"`: the former scheduler - a wave of up to `max_batch` rows, first come first served,
decodes until every row ended; rows that arrive meanwhile wait for the next wave; each row prefills its
own prompt; a search runs alone. `pack=False` (either mode): one request at a time. Kept so `thinkscale
bench serve` can compare them; `max_kv_tokens` applies to the continuous scheduler only.

From the engine's `after_token` hook the scheduler stops the rows of cancelled jobs (a client that went
away), stops rows at their stop strings, hands new tokens to streaming jobs and runs search policies.
Counters are in decode steps (one token for every running row), which tests and /metrics read.
"""
from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from thinkscale.reflect.answer import row_candidate, stop_at_strings
from thinkscale.reflect.candidate import Candidate
from thinkscale.reflect.engine import AfterToken, DecodeBatch, Row, RowSpec
from thinkscale.reflect.generate import eval_mode

logger = logging.getLogger(__name__)

TokenListener = Callable[[int, list[int], bool], None]  # (row index in the job, tokens so far, row ended)
RowRunner = Callable[[list[RowSpec], AfterToken], list[Row]]  # decodes rows under a policy: `search(run_rows=...)`
MODES = ("continuous", "static")


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new work."""


@dataclass(eq=False)
class Job:
    """One request's rows; `future` resolves to one Candidate per row, in row order.

    A search is a job with `call(cancelled, run_rows)` instead of rows: it runs on its own thread and its
    return value resolves `future`; each `run_rows(specs, policy)` it makes becomes a row group (a job with
    `policy` and `parent`) whose future resolves to its Rows, forks included, as `decode_rows` returns them."""

    rows: list[RowSpec]
    stop: tuple[str, ...] = ()
    listener: TokenListener | None = None
    call: Callable[[Callable[[], bool], RowRunner | None], object] | None = None
    policy: AfterToken | None = None
    parent: "Job | None" = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    admitted_step: int | None = None  # the scheduler's decode step when its first row joined the batch
    finished_step: int | None = None  # ... and when its last row ended
    next_row: int = 0  # rows admitted so far
    blocked_since: int | None = None  # the step it first waited at the head of the queue for room
    _done: dict[int, Candidate] = field(default_factory=dict)
    _rows: list[Row] = field(default_factory=list)  # a row group's rows, forks included

    def cancel(self) -> None:
        """Stop this job's rows at their next token (the client is gone)."""
        self.cancelled.set()

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled.is_set() or (self.parent is not None and self.parent.cancelled.is_set())


def kv_tokens(spec: RowSpec) -> int:
    """The KV cache positions a row may grow to."""
    return len(spec.prompt) + spec.max_new_tokens


class Scheduler:
    """Owns the model; `submit(job)` queues a job, the worker thread decodes it."""

    def __init__(self, rm, tokenizer, eos_ids: set[int], pad_id: int, max_batch: int = 32, max_queue: int = 64,
                 pack: bool = True, mode: str = "continuous", max_kv_tokens: int | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if mode not in MODES:
            raise ValueError(f"unknown scheduler {mode!r}; valid: {', '.join(MODES)}")
        if max_kv_tokens is not None and max_kv_tokens < 1:
            raise ValueError(f"max_kv_tokens must be >= 1, got {max_kv_tokens}")
        self.rm, self.tokenizer, self.eos_ids, self.pad_id = rm, tokenizer, eos_ids, pad_id
        self.max_batch, self.max_queue, self.pack, self.mode = max_batch, max_queue, pack, mode
        self.max_kv_tokens = max_kv_tokens
        self._pending: collections.deque[Job] = collections.deque()
        self._groups: list[Job] = []  # row groups in the batch, resolved when all their rows ended
        self._searches = 0  # search calls running on their own threads
        self._cond = threading.Condition()
        self._closing = False
        self.decoded_rows = 0
        self.cancelled_rows = 0
        self.running_rows = 0  # rows decoding now (in static mode a search's own rows are not counted)
        self.waves = 0  # static waves and search calls run
        self.steps = 0  # decode steps (a token for every running row)
        self.prefills = self.prefill_tokens = 0  # prompts prefilled, and their tokens
        self._feature_tokens = rm.step_feature_tokens(tokenizer)
        self._thread = threading.Thread(target=self._loop, name="thinkscale-decode", daemon=True)
        self._thread.start()

    # -- called from the server's threads --------------------------------------------------------
    def check_fits(self, rows: list[RowSpec]) -> None:
        """Refuse (ValueError) a row that could never be admitted: larger than the whole KV budget."""
        if self.max_kv_tokens is not None and self.mode == "continuous":
            largest = max((kv_tokens(r) for r in rows), default=0)
            if largest > self.max_kv_tokens:
                raise ValueError(f"a candidate needs {largest} KV positions (prompt + max_tokens) and the server "
                                 f"holds at most {self.max_kv_tokens} (--max-kv-tokens)")

    def submit(self, job: Job) -> Future:
        self.check_fits(job.rows)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            waiting = self._waiting_requests() + self._searches
            if job.parent is None and waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting or searching (the limit is "
                                f"{self.max_queue})")
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def _waiting_requests(self) -> int:
        return sum(job.parent is None for job in self._pending)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting_requests": self._waiting_requests(),
                    "waiting_rows": sum(len(job.rows) - job.next_row for job in self._pending),
                    "running_rows": self.running_rows, "waves": self.waves, "decoded_rows": self.decoded_rows,
                    "cancelled_rows": self.cancelled_rows, "decode_steps": self.steps, "prefills": self.prefills,
                    "prefill_tokens": self.prefill_tokens}

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running rows, and join the worker."""
        with self._cond:
            self._closing = True
            for job in self._pending:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- choosing what to decode (under the lock) ------------------------------------------------
    def _wait_for_work(self, batch: DecodeBatch | None) -> bool:
        """Block while there is nothing to do; False once closing (the waiting jobs are failed)."""
        while not self._closing and not self._pending and not (batch is not None and batch.rows):
            self._cond.wait()
        if self._closing:
            for job in self._pending:
                _fail(job, ShuttingDown("the server shut down before this request was decoded"))
            self._pending.clear()
            return False
        return True

    def _take_wave(self) -> list[tuple[Job, int]] | None:
        """Static mode: up to max_batch rows first come first served, or a search alone as [(job, -1)]."""
        with self._cond:
            if not self._wait_for_work(None):
                return None
            wave: list[tuple[Job, int]] = []
            while self._pending and len(wave) < self.max_batch:
                job = self._pending[0]
                if job.call is not None:
                    if not wave:
                        self._pending.popleft()
                        wave.append((job, -1))
                    break
                if wave and not self.pack and job is not wave[-1][0]:
                    break  # without packing, one job per wave
                if job.is_cancelled:
                    self._pending.popleft()
                    _fail(job, ShuttingDown("cancelled"))
                    continue
                n = min(len(job.rows) - job.next_row, self.max_batch - len(wave))
                wave += [(job, job.next_row + r) for r in range(n)]
                job.next_row += n
                if job.next_row == len(job.rows):
                    self._pending.popleft()
            return wave

    def _take_joining(self, batch: DecodeBatch) -> tuple[list[Job], list[tuple[Job, int]]] | None:
        """Continuous mode: (searches to start, rows to admit now beside the batch's running rows)."""
        with self._cond:
            if not self._wait_for_work(batch):
                return None
            running = [row for row in batch.rows if row.running]
            calls, taken = [job for job in self._pending if job.call is not None], []
            for job in calls:
                self._pending.remove(job)
            for job in [job for job in calls if job.is_cancelled]:
                calls.remove(job)
                _fail(job, ShuttingDown("cancelled"))
            self._searches += len(calls)
            if running and not batch.joinable:
                return calls, []  # this model decodes in waves: the queue waits for the batch to empty
            owners = {row.owner[0] for row in running}
            free, budget = self.max_batch - len(running), sum(kv_tokens(row.spec) for row in running)
            oldest = self._pending[0] if self._pending else None
            starving = (oldest is not None and oldest.blocked_since is not None and
                        self.steps - oldest.blocked_since >= max(r.max_new_tokens for r in oldest.rows))
            if starving or not self.pack:
                order = [oldest] if starving else list(self._pending)  # it waited long enough: the batch drains for it
            else:  # the smallest requests first (stable: first come first served among equals)
                order = sorted(self._pending, key=lambda j: len(j.rows) - j.next_row)
            for job in order:
                if job.is_cancelled:
                    self._pending.remove(job)
                    _fail(job, ShuttingDown("cancelled"))
                    continue
                if not self.pack and (owners or taken) and job not in owners:
                    break  # one request at a time
                left = job.rows[job.next_row:]
                need = sum(kv_tokens(r) for r in left)
                fits = len(left) <= free and (self.max_kv_tokens is None or budget + need <= self.max_kv_tokens)
                alone = not running and not taken
                oversized = len(left) > self.max_batch or (self.max_kv_tokens is not None and need > self.max_kv_tokens)
                # best-of-k rows need no sibling in the batch: a request that does not fit enters in parts
                partial = job.policy is None and free > 0
                if fits or (oversized and alone) or partial:
                    n = len(left) if fits or job.policy is not None else self._rows_with_room(left, free, budget)
                    taken += [(job, job.next_row + r) for r in range(n)]
                    job.next_row += n
                    free -= n
                    budget += sum(kv_tokens(r) for r in left[:n])
                    if job.next_row < len(job.rows):
                        break  # the rest of a request in parts waits for room: nothing overtakes it
                    self._pending.remove(job)
                if free <= 0:
                    break
            if oldest is not None and oldest in self._pending and oldest.blocked_since is None:
                oldest.blocked_since = self.steps  # the oldest request is still short of room from now
            return calls, taken

    def _rows_with_room(self, rows: list[RowSpec], free: int, budget: int) -> int:
        """How many of a request's next rows fit in `free` rows and the KV budget left."""
        n, room = 0, None if self.max_kv_tokens is None else self.max_kv_tokens - budget
        while n < min(len(rows), free) and (room is None or kv_tokens(rows[n]) <= room):
            room = None if room is None else room - kv_tokens(rows[n])
            n += 1
        return n

    # -- the worker thread -----------------------------------------------------------------------
    def _batch(self, share_prefill: bool) -> DecodeBatch:
        return DecodeBatch(self.rm, self.eos_ids, self.pad_id, feature_tokens=self._feature_tokens,
                           share_prefill=share_prefill)

    def _loop(self) -> None:
        with eval_mode(self.rm):  # the server never trains: once for the thread, not per step
            if self.mode == "static":
                self._loop_static()
            else:
                self._loop_continuous()

    def _loop_continuous(self) -> None:
        batch = self._batch(share_prefill=True)
        said_waves = False
        while True:
            work = self._take_joining(batch)
            if work is None:
                self._fail_running(batch)
                return
            calls, taken = work
            for job in calls:
                self._start_search(job)
            if batch.rows and not batch.joinable and not said_waves:
                logger.warning("this model's KV cache cannot be spliced: requests decode in waves, not continuously")
                said_waves = True
            try:
                if taken:
                    self._admit(batch, taken)
                if batch.rows:
                    for child in batch.step():
                        child.owner[0]._rows.append(child)
                    self._resolve_groups()
            except Exception as error:  # a failed step fails the requests in the batch, never the server
                logger.exception("decoding a batch of %d rows failed", len(batch.rows))
                failed = {row.owner[0] for row in batch.rows} | {job for job, _ in taken} | set(self._groups)
                for job in failed:
                    _fail(job, error)
                with self._cond:  # a request admitted in part leaves the queue with the rest
                    self._pending = collections.deque(job for job in self._pending if job not in failed)
                self._groups = []
                batch = self._batch(share_prefill=True)
            self.running_rows = batch.running

    def _loop_static(self) -> None:
        while True:
            taken = self._take_wave()
            if taken is None:
                return
            if not taken:
                continue
            if taken[0][0].call is not None:
                self._run_call(taken[0][0], None)  # alone, on its own decode loop
                continue
            batch = self._batch(share_prefill=False)  # the former cost: each row prefills its own prompt
            try:
                self._admit(batch, taken)
                while batch.rows:
                    batch.step()
            except Exception as error:  # a failed wave fails its requests, never the server
                logger.exception("decoding a wave of %d rows failed", len(taken))
                for job, _ in taken:
                    _fail(job, error)
            self.running_rows = 0
            self.waves += 1

    def _admit(self, batch: DecodeBatch, taken: list[tuple[Job, int]]) -> None:
        prefills, tokens = batch.prefills, batch.prefill_tokens
        rows = batch.admit([job.rows[i] for job, i in taken], self._after_token)
        for row, (job, i) in zip(rows, taken):
            row.owner = (job, i)
            if job.policy is not None:
                job._rows.append(row)
                if job not in self._groups:
                    self._groups.append(job)
            if job.admitted_step is None:
                job.admitted_step = self.steps
        self.prefills += batch.prefills - prefills
        self.prefill_tokens += batch.prefill_tokens - tokens
        self.decoded_rows += sum(job.policy is None for job, _ in taken)
        self.running_rows = batch.running

    def _resolve_groups(self) -> None:
        """A row group whose rows (forks included) have all ended hands them to its search."""
        for job in list(self._groups):
            if job.future.done():  # failed or cancelled meanwhile
                self._groups.remove(job)
            elif job.next_row == len(job.rows) and not any(row.running for row in job._rows):
                self._groups.remove(job)
                job.finished_step = self.steps
                _resolve(job, list(job._rows))

    def _fail_running(self, batch: DecodeBatch) -> None:
        for row in batch.rows:
            _fail(row.owner[0], ShuttingDown("the server shut down while this request was decoding"))

    def _row_runner(self, search_job: Job) -> RowRunner:
        """How a search's decode calls reach the shared batch: each becomes a row group; the search thread
        waits for its rows."""
        def run_rows(specs: list[RowSpec], policy: AfterToken) -> list[Row]:
            if not specs:
                return []
            group = Job(list(specs), policy=policy, parent=search_job)
            self.submit(group)
            return group.future.result()
        return run_rows

    def _start_search(self, job: Job) -> None:
        def run() -> None:
            try:
                self._run_call(job, self._row_runner(job))
            finally:
                with self._cond:
                    self._searches -= 1

        try:
            threading.Thread(target=run, daemon=True, name="thinkscale-search").start()
        except RuntimeError as error:  # no thread to be had: this request fails, the server goes on
            with self._cond:
                self._searches -= 1
            _fail(job, error)

    def _run_call(self, job: Job, run_rows: RowRunner | None) -> None:
        def cancelled() -> bool:
            return job.cancelled.is_set() or self._closing

        job.admitted_step = self.steps
        try:
            result = job.call(cancelled, run_rows)
        except Exception as error:
            if not cancelled():
                logger.exception("a search request failed")
            _fail(job, error if not cancelled() else ShuttingDown("cancelled"))
            return
        with self._cond:
            self.waves += 1
        job.finished_step = self.steps
        if cancelled():
            _fail(job, ShuttingDown("cancelled"))
        else:
            _resolve(job, result)

    def _after_token(self, rows: list[Row]) -> None:
        self.steps += 1
        mine: dict[Job, list[Row]] = {}
        for row in rows:
            mine.setdefault(row.owner[0], []).append(row)
        for job, members in mine.items():
            try:
                self._after_job_token(job, members)
            except Exception as error:  # a failing request (its listener, its policy) fails alone
                logger.exception("a request failed while decoding")
                for row in members:
                    row.stop("failed")
                _fail(job, error)
        self.running_rows = sum(row.running for row in rows)

    def _after_job_token(self, job: Job, rows: list[Row]) -> None:
        if job.future.done():
            for row in rows:
                row.stop("abandoned")
            return
        if job.is_cancelled or self._closing:
            for row in rows:
                row.stop("cancelled")
            self.cancelled_rows += len(rows)
            _fail(job, ShuttingDown("cancelled"))
            return
        if job.policy is not None:  # a search's rows: its policy decides (stop strings are cut afterwards)
            job.policy(rows)
            return
        stop_at_strings(rows, self.tokenizer, job.stop)
        for row in rows:
            i = row.owner[1]
            if job.listener is not None:
                job.listener(i, list(row.tokens), not row.running)
            if not row.running:
                self._finish_row(job, i, row)

    def _finish_row(self, job: Job, i: int, row: Row) -> None:
        tag = row.spec.tag  # (answer, candidate) of `candidate_rows`; a bare row: its index in the job
        job._done[i] = row_candidate(self.rm, self.tokenizer, row, tag[1] if isinstance(tag, tuple) else i)
        if len(job._done) == len(job.rows):
            job.finished_step = self.steps
            _resolve(job, [job._done[j] for j in range(len(job.rows))])


def _resolve(job: Job, value) -> None:
    if not job.future.done():
        try:
            job.future.set_result(value)
        except Exception:  # resolved by another thread in between
            pass


def _fail(job: Job, error: BaseException) -> None:
    if not job.future.done():
        try:
            job.future.set_exception(error)
        except Exception:  # resolved by another thread in between
            pass

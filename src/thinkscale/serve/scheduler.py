"""The request queue in front of the decode engine: one thread owns the model and packs the candidate
rows of waiting requests into one engine batch (up to `max_batch` rows).

A request (a `Job`) is a list of engine rows. Rows are taken first come, first served; a wave of rows
decodes until each has ended, and rows leave it as they end (the engine drops them), so a short request
finishes - and its client gets its answer - while longer ones go on. Rows that arrive during a wave wait
for the next one (the engine does not splice new rows into a running KV cache).
`pack=False` takes one request per wave: the one-at-a-time baseline of `thinkscale bench serve`.
A request answered by a search (`Job.call`) runs on its own: its policies own the whole batch.

From the engine's `after_token` hook the scheduler stops the rows of cancelled jobs (a client that went
away), cuts rows at their stop strings, and hands new tokens to streaming jobs.
"""
from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable

from thinkscale.reflect.candidate import Candidate
from thinkscale.reflect.engine import Row, RowSpec, decode_rows
from thinkscale.reflect.generate import eval_mode, to_candidate

from .text import cut_at_stop

logger = logging.getLogger(__name__)

TokenListener = Callable[[int, list[int], bool], None]  # (row index in the job, tokens so far, row ended)


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new work."""


@dataclass(eq=False)
class Job:
    """One request's rows; `future` resolves to one Candidate per row, in row order."""

    rows: list[RowSpec]
    stop: tuple[str, ...] = ()
    listener: TokenListener | None = None
    # a job that is one call on the engine of its own (a search): run alone, its return value resolves `future`
    call: Callable[[Callable[[], bool]], object] | None = None
    top_logprobs: int = 0  # most likely tokens kept per position, in each candidate's extra["top_logprobs"]
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    _done: dict[int, Candidate] = field(default_factory=dict)

    def cancel(self) -> None:
        """Stop this job's rows at their next token (the client is gone)."""
        self.cancelled.set()


class Scheduler:
    """Owns the model; `submit(job)` queues a job, the worker thread decodes it."""

    def __init__(self, rm, tokenizer, eos_ids: set[int], pad_id: int, max_batch: int = 32, max_queue: int = 64,
                 pack: bool = True):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.rm, self.tokenizer, self.eos_ids, self.pad_id = rm, tokenizer, eos_ids, pad_id
        self.max_batch, self.max_queue, self.pack = max_batch, max_queue, pack
        self._pending: collections.deque[tuple[Job, int]] = collections.deque()
        self._waiting_jobs = 0
        self._cond = threading.Condition()
        self._closing = False
        self.decoded_rows = 0
        self.cancelled_rows = 0
        self.running_rows = 0  # rows of the wave decoding now (a search's own rows are not counted)
        self.waves = 0
        self._thread = threading.Thread(target=self._loop, name="thinkscale-decode", daemon=True)
        self._thread.start()

    # -- called from the server's threads --------------------------------------------------------
    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if self._waiting_jobs >= self.max_queue:
                raise QueueFull(f"{self._waiting_jobs} requests are already waiting (the limit is {self.max_queue})")
            if job.call is None:
                self._pending.extend((job, i) for i in range(len(job.rows)))
            else:
                self._pending.append((job, -1))
            self._waiting_jobs += 1
            self._cond.notify()
        return job.future

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting_requests": self._waiting_jobs, "waiting_rows": len(self._pending),
                    "running_rows": self.running_rows, "waves": self.waves, "decoded_rows": self.decoded_rows,
                    "cancelled_rows": self.cancelled_rows}

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running rows, and join the worker."""
        with self._cond:
            self._closing = True
            for job, _ in self._pending:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- the worker thread -----------------------------------------------------------------------
    def _next_wave(self) -> list[tuple[Job, int]] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                for job, _ in self._pending:
                    _fail(job, ShuttingDown("the server shut down before this request was decoded"))
                self._pending.clear()
                return None
            wave: list[tuple[Job, int]] = []
            while self._pending and len(wave) < self.max_batch:
                job, i = self._pending[0]
                if wave and (job.call is not None or (not self.pack and job is not wave[-1][0])):
                    break  # a call-job runs alone; without packing, one job per wave
                self._pending.popleft()
                if job.cancelled.is_set():
                    _fail(job, ShuttingDown("cancelled"))
                else:
                    wave.append((job, i))
                if i == len(job.rows) - 1:  # the job's last row left the queue (-1: a call-job)
                    self._waiting_jobs -= 1
                if job.call is not None:
                    break
            return wave

    def _loop(self) -> None:
        while True:
            wave = self._next_wave()
            if wave is None:
                return
            if not wave:
                continue
            if wave[0][0].call is not None:
                self._run_call(wave[0][0])
                continue
            specs = [replace(job.rows[i], tag=(job, i)) for job, i in wave]
            self.running_rows = len(specs)
            try:
                with eval_mode(self.rm):
                    decode_rows(self.rm, specs, self.eos_ids, self.pad_id, after_token=self._after_token,
                                feature_tokens=self.rm.step_feature_tokens(self.tokenizer),
                                top_logprobs=max(job.top_logprobs for job, _ in wave))
            except Exception as error:  # a failed wave fails its requests, never the server
                logger.exception("decoding a wave of %d rows failed", len(specs))
                for job, _ in wave:
                    _fail(job, error)
            self.running_rows = 0
            self.waves += 1
            self.decoded_rows += len(specs)

    def _run_call(self, job: Job) -> None:
        def cancelled() -> bool:
            return job.cancelled.is_set() or self._closing

        try:
            with eval_mode(self.rm):
                result = job.call(cancelled)
        except Exception as error:
            logger.exception("a search request failed")
            _fail(job, error)
            return
        self.waves += 1
        if cancelled():
            _fail(job, ShuttingDown("cancelled"))
        elif not job.future.done():
            job.future.set_result(result)

    def _after_token(self, rows: list[Row]) -> None:
        for row in rows:
            job, i = row.spec.tag
            if job.future.done():
                row.stop("abandoned")
                continue
            if job.cancelled.is_set() or self._closing:
                row.stop("cancelled")
                self.cancelled_rows += 1
                _fail(job, ShuttingDown("cancelled"))
                continue
            if job.stop and row.running:
                # a stop string just completed lies in the newest tokens: decode only those (a token holds
                # at least one byte, a character at most 4), not the whole row at every step
                tail = row.tokens[-(4 * max(len(s) for s in job.stop) + 4):]
                _, hit = cut_at_stop(self.tokenizer.decode(tail, skip_special_tokens=True), job.stop)
                if hit:
                    row.stop("stop")
            if job.listener is not None:
                job.listener(i, list(row.tokens), not row.running)
            if not row.running:
                self._finish_row(job, i, row)
        self.running_rows = sum(row.running for row in rows)

    def _finish_row(self, job: Job, i: int, row: Row) -> None:
        candidate = to_candidate(self.rm, self.tokenizer, list(row.spec.prompt), row.tokens, row.finish == "eos",
                                 row.features, row.signal_matrix(), sample_index=i)
        if row.finish == "stop":
            candidate.text, _ = cut_at_stop(candidate.text, job.stop)
            candidate.finished, candidate.truncated = True, False
        if job.top_logprobs:  # (ids, log-probs) of the most likely tokens at each generated position
            candidate.extra["top_logprobs"] = [(ids[:job.top_logprobs].tolist(),
                                                [round(v, 4) for v in lps[:job.top_logprobs].tolist()])
                                               for ids, lps in row.top]
        job._done[i] = candidate
        if len(job._done) == len(job.rows) and not job.future.done():
            job.future.set_result([job._done[j] for j in range(len(job.rows))])


def _fail(job: Job, error: BaseException) -> None:
    if not job.future.done():
        try:
            job.future.set_exception(error)
        except Exception:  # resolved by another thread in between
            pass

"""`GET /metrics`: the server's counters in the Prometheus text format, through `prometheus-client`.

    thinkscale_requests_total{endpoint, status, effort}   requests answered (any status: 200, 400, 429, ...)
    thinkscale_request_seconds{endpoint}                  latency histogram, request received -> response sent
    thinkscale_time_to_first_token_seconds                streamed requests: received -> first content chunk
    thinkscale_prompt_tokens_total                        prompt tokens of every request (once per prompt)
    thinkscale_generated_tokens_total                     tokens generated, every candidate (search: what it generated)
    thinkscale_search_stopped_rows_total                  rows a search ended early (pruned, over budget, discarded)
    thinkscale_search_unspent_tokens_total                searches: their rows' whole token budget minus what they
                                                          generated (an upper bound on what pruning saved)
    thinkscale_queue_requests, thinkscale_queue_rows      waiting for the decode thread (read at scrape time)
    thinkscale_running_rows, thinkscale_batch_occupancy   rows decoding now, and their share of --max-batch
    thinkscale_decoded_rows_total, thinkscale_cancelled_rows_total, thinkscale_waves_total
    thinkscale_decode_steps_total                         engine steps (one token for every running row)
    thinkscale_prefills_total, thinkscale_prefill_tokens_total   prompts prefilled (k candidates share one), tokens

Each app has a registry of its own (several servers in one process, as the tests run them, never share
counters); nothing is written by hand in the exposition format.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UNKNOWN_EFFORT = "-"  # a request that failed before its effort was read


class ServeMetrics:
    """The counters one server keeps; `scheduler_stats()` is read at every scrape (the queue and batch)."""

    def __init__(self, scheduler_stats: Callable[[], dict[str, int]], max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("thinkscale_requests", "Requests answered, by endpoint, HTTP status and effort",
                                ["endpoint", "status", "effort"], registry=self.registry)
        self.latency = Histogram("thinkscale_request_seconds", "Seconds from a request's arrival to its response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("thinkscale_time_to_first_token_seconds",
                                     "Streamed requests: seconds from arrival to the first content chunk",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("thinkscale_prompt_tokens", "Prompt tokens of every request, once per prompt",
                                     registry=self.registry)
        self.generated_tokens = Counter("thinkscale_generated_tokens", "Tokens generated over every candidate",
                                        registry=self.registry)
        self.search_stopped_rows = Counter("thinkscale_search_stopped_rows",
                                           "Rows a search ended early (pruned, over budget, discarded beams)",
                                           registry=self.registry)
        self.search_unspent_tokens = Counter("thinkscale_search_unspent_tokens",
                                             "Searched requests: k x answers x max_tokens minus the tokens generated",
                                             registry=self.registry)
        self.registry.register(_SchedulerCollector(scheduler_stats, max_batch))

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP request by endpoint, status and effort (`request.state.effort`, set by the route),
    and observes its latency when the response's last byte is sent (a stream: at its end). Plain ASGI that
    wraps `send` only: the routes still see a client that goes away (Starlette's BaseHTTPMiddleware would
    hide the disconnect from `request.is_disconnected()`). Sets `request.state.started` (the arrival)."""

    def __init__(self, app, metrics: ServeMetrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        start = state["started"] = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status, recorded = 500, False

        def record() -> None:
            nonlocal recorded
            recorded = True
            self.metrics.requests.labels(endpoint, str(status), state.get("effort", UNKNOWN_EFFORT)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not recorded:
                record()

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not recorded:  # an error raised past us (a 500), or a response cut short
                record()


class _SchedulerCollector:
    """The scheduler's state, read when scraped (no thread keeps gauges up to date)."""

    def __init__(self, stats: Callable[[], dict[str, int]], max_batch: int):
        self.stats, self.max_batch = stats, max_batch

    def collect(self):
        s = self.stats()
        gauges = (("thinkscale_queue_requests", "Requests waiting for the decode thread", s["waiting_requests"]),
                  ("thinkscale_queue_rows", "Candidate rows waiting for the decode thread", s["waiting_rows"]),
                  ("thinkscale_running_rows", "Rows decoding now", s["running_rows"]),
                  ("thinkscale_batch_occupancy", "Rows decoding now over --max-batch",
                   s["running_rows"] / self.max_batch))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (("thinkscale_decoded_rows", "Best-of-k candidate rows decoded", s["decoded_rows"]),
                    ("thinkscale_cancelled_rows", "Rows stopped because their client went away", s["cancelled_rows"]),
                    ("thinkscale_waves", "Static waves and search calls run", s["waves"]),
                    ("thinkscale_decode_steps", "Decode steps: one token for every running row", s["decode_steps"]),
                    ("thinkscale_prefills", "Prompts prefilled (a prompt's k candidates share one)", s["prefills"]),
                    ("thinkscale_prefill_tokens", "Tokens of the prompts prefilled", s["prefill_tokens"]))
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)

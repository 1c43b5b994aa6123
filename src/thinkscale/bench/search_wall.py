"""`thinkscale bench search`: wall time of each search method against best_of_n at the same k, on the
same questions and seeds - whether the tokens a search saves are also seconds saved (pruned rows must
leave the batch, paused rows cost their share).

    thinkscale bench search                          # the demo model, 30 test questions, k = 32
    thinkscale bench search --model-dir DIR --k 8 --questions 50 --repeats 3

Each round runs every method once over all questions (one question per call, its k rows in one batch),
in an order that rotates between rounds; the table gives the median seconds per question, the spread,
and the ratio to best_of_n's median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "best_of_n;prune:signal=sprm;prune:signal=confidence;beam:width=4;dvts:width=4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default="runs/demo/grpo", help="the model folder")
    parser.add_argument("--data", default=None, help="questions JSONL (default: the demo's test split next to the model)")
    parser.add_argument("--questions", type=int, default=30, help="questions per round")
    parser.add_argument("--k", type=int, default=32, help="rows per question")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="';'-separated search specs")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest completion")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median and range reported)")
    parser.add_argument("--out", default="runs/bench/search", help="folder for search_wall.json and .md")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from thinkscale.reflect.model import ReflectiveModel
    from thinkscale.reflect.search import SearchConfig, search
    from thinkscale.tasks.jsonl import read_examples

    data = Path(args.data) if args.data is not None else Path(args.model_dir).parent / "data" / "test.jsonl"
    try:
        methods = [m.strip() for m in args.methods.split(";") if m.strip()]
        configs = {m: SearchConfig.parse(m, args.k) for m in methods}
        examples = read_examples(data)[: args.questions]
        if not (Path(args.model_dir) / "config.json").is_file():
            raise ValueError(f"no model in {args.model_dir}: run `thinkscale demo` first or pass --model-dir")
    except (OSError, ValueError) as error:
        print(f"thinkscale bench search: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    rm = ReflectiveModel.from_pretrained(args.model_dir).eval()
    prompts = [rm.format_prompt(e.question, tokenizer) for e in examples]

    def one_round(method: str) -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for i, prompt in enumerate(prompts):
            tokens += search(rm, tokenizer, [prompt], configs[method], max_new_tokens=args.max_new_tokens,
                             seed=i)[0].generated_tokens
        return (time.perf_counter() - start) / len(prompts), tokens // len(prompts)

    one_round(methods[0])  # warm-up
    wall: dict[str, list[float]] = {m: [] for m in methods}
    tokens: dict[str, int] = {}
    for r in range(args.repeats):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            seconds, tokens[m] = one_round(m)
            wall[m].append(seconds)
    base = statistics.median(wall[methods[0]])
    lines = [f"k = {args.k}, {len(prompts)} questions, {args.repeats} rounds, 1 thread",
             "", "| method | tokens/question | s/question (median, range) | vs best_of_n (time) | vs best_of_n (tokens) |",
             "|---|---:|---:|---:|---:|"]
    for m in methods:
        med = statistics.median(wall[m])
        lines.append(f"| {m} | {tokens[m]} | {med:.3f} ({min(wall[m]):.3f}-{max(wall[m]):.3f}) | {med / base:.2f}x | "
                     f"{tokens[m] / tokens[methods[0]]:.2f}x |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_wall.json").write_text(json.dumps({"k": args.k, "questions": len(prompts), "wall_s": wall,
                                                      "tokens": tokens}, indent=2))
    (out / "search_wall.md").write_text(table + "\n")
    print(table)
    return 0

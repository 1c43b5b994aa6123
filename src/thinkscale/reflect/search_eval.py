"""Accuracy against generated tokens: every search method at every k on the same questions and seeds.

For each question, method and k, `search()` runs, each complete candidate is graded, and each selector
picks among them; one JSONL record per (question, method, k) holds the cost (generated tokens, rows,
wall seconds) and, per candidate, its answer, correctness, score and stop reason, so a rerun into the
same folder resumes and every selector can be recomputed from the records. (Token-level signals are not
kept: a search run would otherwise store k full traces per method and k.)

The report (search.json, search.md, accuracy_vs_tokens.png) gives, per method and k, the accuracy of each
selector and the mean generated tokens per question - the accuracy vs log(thinking compute) curve of the
MetaStone-S1 paper's scaling law - and the two targets of the search issue: tokens at the accuracy of
sprm best-of-max-k, and accuracy at equal tokens against best-of-N with the same selector.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from ..tasks.jsonl import Example
from .evaluate import EvalConfig, grade_candidates
from .search import SearchConfig, search
from .select import select

logger = logging.getLogger(__name__)

RECORDS_FILE = "search.jsonl"
DEFAULT_SELECTORS = ("sprm", "majority", "deepconf")
REACH_TOLERANCE = 1.0  # points: a search "reaches" best_of_n's accuracy within this much (the target)
ROWS_PER_CALL = 32  # initial rows decoded together (k rows per question)


@dataclass(frozen=True)
class SearchStudy:
    """Which methods ("name:options" specs), at which k, picked by which selectors, with what budget."""

    methods: tuple[str, ...] = ("best_of_n", "prune:signal=sprm", "prune:signal=confidence", "beam", "dvts")
    ks: tuple[int, ...] = (8, 32)
    selectors: tuple[str, ...] = DEFAULT_SELECTORS
    budget: int | None = None

    def configs(self) -> list[tuple[str, int, SearchConfig]]:
        """(spec, k, config) for every cell; bad specs fail here, before any decoding."""
        return [(spec, k, SearchConfig.parse(spec, k, self.budget)) for spec in self.methods for k in self.ks]


def _compact(candidate) -> dict:
    """What a search record keeps of a candidate (no token-level signals: see the module doc)."""
    return {"answer": candidate.extra.get("answer"), "correct": candidate.extra.get("correct"),
            "score": round(candidate.score, 4), "finished": candidate.finished,
            "stopped": candidate.extra.get("stopped"),
            "generated_tokens": candidate.extra.get("generated_tokens"), "tokens": len(candidate.token_ids)}


def evaluate_search(examples: Sequence[Example], rm, tokenizer, study: SearchStudy, config: EvalConfig,
                    out_dir: str | os.PathLike, *, format_prompt: Callable[[str], str], progress: bool = True,
                    plots: bool = True, task=None) -> dict:
    """Run every (method, k) of `study` on every question not yet in `out_dir`; write and return the report."""
    if task is None and config.task is not None:
        from ..tasks.registry import get_task

        task = get_task(config.task)
    if task is not None:
        task.check(examples)
    cells = study.configs()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RECORDS_FILE
    done = _load(path)
    equivalent = None if task is None else task.equivalent
    todo = [(spec, k, cfg, i) for spec, k, cfg in cells for i in range(len(examples)) if (i, spec, k) not in done]
    if done:
        logger.info("resuming: %d of %d (question, method, k) cells already in %s", len(done),
                    len(done) + len(todo), path)
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="search", unit="cell",
                                                      disable=not progress) as bar:
        for spec, k, cfg in cells:
            # ROWS_PER_CALL rows decode together: questions in fixed chunks, seeded by their first index,
            # so a resumed run redraws exactly what an uninterrupted one would
            per_call = max(1, ROWS_PER_CALL // k)
            pending = sorted({i - i % per_call for i in range(len(examples)) if (i, spec, k) not in done})
            for first in pending:
                indices = list(range(first, min(first + per_call, len(examples))))
                start = time.perf_counter()
                results = search(rm, tokenizer, [format_prompt(examples[i].question) for i in indices], cfg,
                                 temperature=config.temperature, top_p=config.top_p,
                                 max_new_tokens=config.max_new_tokens, seed=(config.seed or 0) + first,
                                 repetition_penalty=config.repetition_penalty)
                wall = (time.perf_counter() - start) / len(indices)
                for i, result in zip(indices, results):
                    if (i, spec, k) in done:
                        continue
                    record = _grade_and_pick(examples[i], result, study, config, task, equivalent)
                    record.update(index=i, method=spec, k=k, wall_s=round(wall, 4))
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()
                    done[(i, spec, k)] = record
                    bar.update(1)
    report = summarize_search([done[(i, spec, k)] for spec, k, _ in cells for i in range(len(examples))],
                              study, len(examples))
    report["config"] = {"temperature": config.temperature, "top_p": config.top_p,
                        "max_new_tokens": config.max_new_tokens, "seed": config.seed, "task": config.task}
    write_search_report(report, out, plots=plots)
    return report


def _grade_and_pick(example: Example, result, study: SearchStudy, config: EvalConfig, task, equivalent) -> dict:
    grade_candidates(result.candidates, example.answer, think_end=config.think_end,
                     timeout_s=config.grade_timeout_s, question=example.question, task=task,
                     meta=example.meta)
    pool = result.complete
    picks = {name: bool(select(pool, name, think_end=config.think_end, timeout_s=config.grade_timeout_s,
                               equivalent=equivalent).extra.get("correct")) for name in study.selectors}
    return {"generated_tokens": result.generated_tokens, "rows": result.rows, "picks": picks,
            "any_correct": any(c.extra.get("correct") for c in pool),
            "candidates": [_compact(c) for c in result.candidates]}


def _load(path: Path) -> dict[tuple, dict]:
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done[(record["index"], record["method"], record["k"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s line %d is not a search record (a write cut short?); it is redone", path, n)
    return done


def summarize_search(records: Sequence[dict], study: SearchStudy, questions: int) -> dict:
    """Per (method, k): accuracy of each selector (%), pass@k over the complete candidates, mean tokens,
    rows and wall seconds per question; then the targets against best_of_n."""
    rows = []
    for spec in study.methods:
        for k in study.ks:
            cell = [r for r in records if r["method"] == spec and r["k"] == k]
            if not cell:
                continue
            n = len(cell)
            rows.append({"method": spec, "k": k, "questions": n,
                         "accuracy": {s: 100.0 * sum(r["picks"][s] for r in cell) / n for s in study.selectors},
                         "pass": 100.0 * sum(r["any_correct"] for r in cell) / n,
                         "tokens": sum(r["generated_tokens"] for r in cell) / n,
                         "rows": sum(r["rows"] for r in cell) / n,
                         "wall_s": sum(r["wall_s"] for r in cell) / n})
    return {"questions": questions, "selectors": list(study.selectors), "ks": list(study.ks), "cells": rows,
            "targets": targets(rows, study)}


def _interpolate(curve: list[tuple[float, float]], tokens: float) -> float | None:
    """Accuracy of a (tokens, accuracy) curve at `tokens`, linear in log(tokens); None outside its range."""
    curve = sorted(curve)
    for (t0, a0), (t1, a1) in zip(curve, curve[1:]):
        if t0 <= tokens <= t1:
            w = 0.0 if t1 == t0 else (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return a0 + w * (a1 - a0)
    return curve[0][1] if len(curve) == 1 and curve[0][0] == tokens else None


def targets(cells: list[dict], study: SearchStudy) -> dict:
    """The issue's two targets, measured: (1) the fewest tokens any search needs to reach best_of_n's
    sprm accuracy at the largest k (within REACH_TOLERANCE points), as a fraction of best_of_n's tokens there (target <= 0.5); (2) for
    each search cell and selector, its accuracy minus best_of_n's at the same tokens (interpolated in
    log tokens between best_of_n's ks; target >= 0)."""
    base = [c for c in cells if c["method"] == "best_of_n"]
    if not base:
        return {}
    top = max(base, key=lambda c: c["k"])
    out: dict = {"reference": {"k": top["k"], "tokens": top["tokens"], "accuracy": top["accuracy"]}}
    if "sprm" in study.selectors:
        reaching = [c for c in cells if c["method"] != "best_of_n" and c["accuracy"]["sprm"] >= top["accuracy"]["sprm"] - REACH_TOLERANCE]
        best = min(reaching, key=lambda c: c["tokens"], default=None)
        out["tokens_at_sprm_accuracy"] = None if best is None else {
            "method": best["method"], "k": best["k"], "tokens": best["tokens"],
            "fraction": best["tokens"] / top["tokens"] if top["tokens"] else None}
    equal = []
    for c in cells:
        if c["method"] == "best_of_n":
            continue
        for s in study.selectors:
            at = _interpolate([(b["tokens"], b["accuracy"][s]) for b in base], c["tokens"])
            equal.append({"method": c["method"], "k": c["k"], "selector": s, "tokens": c["tokens"],
                          "accuracy": c["accuracy"][s], "best_of_n_at_equal_tokens": at,
                          "difference": None if at is None else c["accuracy"][s] - at})
    out["equal_tokens"] = equal
    return out


def markdown_search(report: dict) -> str:
    sel = report["selectors"]
    lines = ["| method | k | " + " | ".join(f"{s}" for s in sel) + " | pass@k | tokens/question | rows | s/question |",
             "|---|---:|" + "---:|" * (len(sel) + 4)]
    for c in report["cells"]:
        accs = " | ".join(f"{c['accuracy'][s]:.1f}" for s in sel)
        lines.append(f"| {c['method']} | {c['k']} | {accs} | {c['pass']:.1f} | {c['tokens']:.0f} | {c['rows']:.1f} | "
                     f"{c['wall_s']:.2f} |")
    t = report.get("targets") or {}
    if t.get("reference"):
        ref = t["reference"]
        reach = t.get("tokens_at_sprm_accuracy")
        lines.append("")
        lines.append(f"best_of_n k={ref['k']}: sprm {ref['accuracy'].get('sprm', float('nan')):.1f}% at "
                     f"{ref['tokens']:.0f} tokens/question. " + (
                         f"No search comes within {REACH_TOLERANCE:g} point of that accuracy." if not reach else
                         f"Fewest tokens within {REACH_TOLERANCE:g} point of it: {reach['method']} k={reach['k']}, {reach['tokens']:.0f} tokens "
                         f"= {100 * reach['fraction']:.0f}% of best_of_n's (target <= 50%)."))
        lines.append("")
        lines.append("| method | k | selector | tokens | accuracy | best_of_n at equal tokens | difference |")
        lines.append("|---|---:|---|---:|---:|---:|---:|")
        for e in t.get("equal_tokens", []):
            at = "-" if e["best_of_n_at_equal_tokens"] is None else f"{e['best_of_n_at_equal_tokens']:.1f}"
            diff = "- (outside best_of_n's range)" if e["difference"] is None else f"{e['difference']:+.1f}"
            lines.append(f"| {e['method']} | {e['k']} | {e['selector']} | {e['tokens']:.0f} | {e['accuracy']:.1f} | "
                         f"{at} | {diff} |")
    return "\n".join(lines)


def write_search_report(report: dict, out: Path, plots: bool = True) -> None:
    (out / "search.json").write_text(json.dumps(report, indent=2))
    (out / "search.md").write_text("# accuracy vs generated tokens\n\n" + markdown_search(report) + "\n")
    if not plots:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["selectors"]), figsize=(5 * len(report["selectors"]), 4), squeeze=False)
    for ax, s in zip(axes[0], report["selectors"]):
        for method in dict.fromkeys(c["method"] for c in report["cells"]):
            cells = sorted((c for c in report["cells"] if c["method"] == method), key=lambda c: c["tokens"])
            ax.plot([c["tokens"] for c in cells], [c["accuracy"][s] for c in cells], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per question (log)")
        ax.set_ylabel(f"accuracy, {s} selection (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=120)
    plt.close(fig)

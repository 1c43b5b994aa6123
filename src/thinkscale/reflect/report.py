"""Write an evaluation report (the dict of `evaluate.summarize`) as JSON, a markdown table and plots.

Plots use matplotlib's object API (Figure + savefig, Agg), so no global backend is switched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .evaluate import METRIC_LABELS

# columns of the markdown table and lines of the plots, in order
SHOWN = ("sprm", "majority", "weighted", "first", "oracle")


def write_report(report: dict, out_dir: str | os.PathLike, *, plots: bool = True) -> list[Path]:
    """report.json, report.md and (with `plots`) two PNGs in `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown_table(report), encoding="utf-8")
    if plots:
        written += plot_accuracy(report, out_dir)
    return written


def _shown(report: dict) -> list[str]:
    first_k = next(iter(report["by_k"].values()))
    return [name for name in SHOWN if name in first_k["accuracy"]]


def markdown_table(report: dict) -> str:
    """One row per k: accuracy (%) of each strategy and the mean generated tokens of a group."""
    names = _shown(report)
    header = ["k", "groups"] + [f"{METRIC_LABELS.get(n, n)}@k" for n in names] + ["tokens/group"]
    lines = [
        "# Evaluation report",
        "",
        f"{report['num_questions']} questions, {report['samples_per_question']} samples each; "
        f"pass@1 (mean over all samples) = {100 * report['pass@1']:.1f}%; "
        f"{100 * report['answered_fraction']:.1f}% of samples gave an answer, "
        f"{100 * report['truncated_fraction']:.1f}% hit the token limit.",
        "Accuracy in %, over disjoint groups of k samples per question (mean over groups, then questions).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for k, row in report["by_k"].items():
        cells = [k, str(row["groups_per_question"])]
        cells += [f"{100 * row['accuracy'][n]:.1f}" for n in names]
        cells.append(f"{row['mean_generated_tokens']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict, out_dir: Path) -> list[Path]:
    """accuracy_vs_k.png and accuracy_vs_tokens.png (one line per strategy, log-scale x)."""
    from matplotlib.figure import Figure

    ks = [int(k) for k in report["by_k"]]
    rows = list(report["by_k"].values())
    tokens = [row["mean_generated_tokens"] for row in rows]
    paths = []
    for name, xs, xlabel in (
        ("accuracy_vs_k.png", ks, "k (samples per answer)"),
        ("accuracy_vs_tokens.png", tokens, "generated tokens per answer (all k samples)"),
    ):
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        for strategy in _shown(report):
            ys = [100 * row["accuracy"][strategy] for row in rows]
            ax.plot(xs, ys, marker="o", label=f"{METRIC_LABELS.get(strategy, strategy)}@k")
        if len(set(xs)) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2 if name == "accuracy_vs_k.png" else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{report['num_questions']} questions")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        paths.append(out_dir / name)
    return paths

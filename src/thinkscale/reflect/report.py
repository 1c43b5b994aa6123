"""Write an evaluation report (the dict of `evaluate.summarize`) as JSON, a markdown table and plots.

Plots use matplotlib's object API (Figure + savefig, Agg), so no global backend is switched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# how report tables name a selection strategy (pass = the oracle: any right answer among k)
METRIC_LABELS = {"sprm": "sprm", "majority": "maj", "weighted": "weighted", "first": "first", "oracle": "pass"}

# lines of the accuracy plots (the table shows every strategy of the report)
PLOTTED = ("sprm", "sprm:agg=min", "majority", "logprob", "deepconf:eta=10", "self_certainty", "first", "oracle")


def write_report(report: dict, out_dir: str | os.PathLike, *, plots: bool = True) -> list[Path]:
    """report.json, report.md and (with `plots`) three PNGs in `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown_table(report), encoding="utf-8")
    if plots:
        written += plot_accuracy(report, out_dir)
        if report.get("scorers", {}).get("traces"):
            written.append(plot_scorers(report, out_dir / "scorers.png"))
    return written


def label(strategy: str) -> str:
    """Table label of a strategy: maj@k for majority, pass@k for oracle, the spec itself otherwise."""
    return f"{METRIC_LABELS.get(strategy, strategy)}@k"


def _strategies(report: dict) -> list[str]:
    return list(next(iter(report["by_k"].values()))["accuracy"])


def _fmt(value: float | None, pct: bool = False, missing: str = "-") -> str:
    if value is None:
        return missing
    return f"{100 * value:.1f}" if pct else f"{value:.3f}"


def markdown_table(report: dict) -> str:
    """Accuracy (%) of every strategy (rows) at every k (columns), tokens per group, then scorer quality."""
    ks = list(report["by_k"])
    lines = [
        "# Evaluation report",
        "",
        f"{report['num_questions']} questions, {report['samples_per_question']} samples each; "
        f"pass@1 (mean over all samples) = {100 * report['pass@1']:.1f}%; "
        f"{100 * report['answered_fraction']:.1f}% of samples gave an answer, "
        f"{100 * report['truncated_fraction']:.1f}% hit the token limit"
        + (f", {100 * report['scored_fraction']:.1f}% have a scored step" if "scored_fraction" in report else "")
        + ".",
        "Accuracy in %, over disjoint groups of k samples per question (mean over groups, then questions).",
        "",
        "| strategy | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "|".join("---:" for _ in ks) + "|",
    ]
    for name in _strategies(report):
        lines.append(f"| {label(name)} | " + " | ".join(_fmt(report["by_k"][k]["accuracy"][name], pct=True)
                                                       for k in ks) + " |")
    lines.append("| tokens/group | " + " | ".join(f"{report['by_k'][k]['mean_generated_tokens']:.0f}" for k in ks) + " |")
    lines += scorer_lines(report.get("scorers"))
    return "\n".join(lines) + "\n"


def scorer_lines(scorers: dict | None) -> list[str]:
    """Markdown tables of step-level and trace-level scorer quality (`reflect.scorers`)."""
    if not scorers:
        return []
    lines = ["", "## Scorers", ""]
    if scorers["steps"]:
        lines += [f"Step level, against the task's step truth ({scorers['labelled_candidates']} of "
                  f"{scorers['candidates']} candidates labelled): ROC AUC, share of wrong candidates whose "
                  "lowest-scored step is the first wrong one, calibration error (probabilities only).", "",
                  "| step scorer | steps | step AUC | first-error hit | ECE |", "|---|---:|---:|---:|---:|"]
        for name, q in scorers["steps"].items():
            lines.append(f"| {name} | {q['steps']} | {_fmt(q['step_auc'], missing='n/a')} | {_fmt(q['first_error'])} | "
                         f"{_fmt(q.get('ece'))} |")
        lines.append("")
    elif not scorers["labelled_candidates"]:  # never a made-up number: no step truth, no step AUC
        lines += [f"Step level: step AUC n/a (none of the {scorers['candidates']} candidates has step truth: "
                  "the task has no step checker, or none was given).", ""]
    lines += ["Trace level: within-question pair accuracy (correct scored above wrong, ties 1/2) and "
              "calibration against correctness.", "", "| trace scorer | pair accuracy | ECE |", "|---|---:|---:|"]
    for name, q in scorers["traces"].items():
        lines.append(f"| {name} | {_fmt(q['pair_accuracy'])} | {_fmt(q.get('ece'))} |")
    return lines


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
        for strategy in [s for s in PLOTTED if s in rows[0]["accuracy"]]:
            ys = [100 * row["accuracy"][strategy] for row in rows]
            ax.plot(xs, ys, marker="o", label=label(strategy))
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


def plot_scorers(report: dict, path: Path) -> Path:
    """Bars per scorer: within-question pair accuracy and, where labelled, step AUC against the truth."""
    from matplotlib.figure import Figure

    scorers = report["scorers"]
    fig = Figure(figsize=(8, 3.5), dpi=100)
    panels = [("trace scorers: pair accuracy", {n: q["pair_accuracy"] for n, q in scorers["traces"].items()})]
    if scorers["steps"]:
        panels.append(("step scorers: step AUC vs truth", {n: q["step_auc"] for n, q in scorers["steps"].items()}))
    for i, (title, values) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        names = list(values)
        ax.barh(names, [v if v is not None else 0.0 for v in values.values()])
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path

"""The demo's combined report: one JSON, one markdown page, four PNG plots, built from the stage outputs.

    report = build_report(config, stage_results)   # reads sft/, grpo/, eval/ under config.out
    write_report(report, config.out)                # report.json, report.md, *.png
    print(final_table(report))

Numbers are fractions in [0, 1] in the JSON and percentages in the markdown. Per split, `accuracy`
maps k to each selection strategy's accuracy (labels as in `reflect.evaluate`: sprm, maj, weighted,
first, pass); `targets` compares the measured numbers with the demo's goals without changing them.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from ..reflect.evaluate import CANDIDATES_FILE
from ..reflect.report import METRIC_LABELS
from ..reflect.report import scorer_lines
from ..reflect.select import EFFORT_K
from ..train import checkpoint
from .evaluation import score_separation

FORMAT_VERSION = 1
# columns of the final table (after pass@1), and the lines of the accuracy plots
TABLE_STRATEGIES = ("maj", "sprm", "weighted", "logprob", "deepconf:eta=10", "self_certainty", "pass")
PLOT_LABELS = ("sprm", "sprm:agg=min", "maj", "weighted", "logprob", "deepconf:eta=10", "self_certainty", "first", "pass")
# the free-confidence baselines the SPRM must beat
FREE_BASELINES = ("logprob", "confidence", "deepconf:eta=10", "deepconf:eta=90", "deepconf:eta=10,measure=tail",
                  "self_certainty")
# GRPO's metrics.jsonl: one record per step; the keys the report plots
GRPO_METRICS_FILE = "metrics.jsonl"
GRPO_KEYS = {"step": "step", "reward": "reward_mean", "kl": "kl", "score_correct": "score_correct",
             "score_wrong": "score_wrong"}


# ----------------------------------------------------------------------------- reading stage outputs

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sft_summary(stage_dir: Path) -> dict:
    state = checkpoint.load_state(stage_dir)
    summary = {key: state.get(key) for key in ("steps", "final_loss", "train_time_s", "tokens_per_s",
                                               "parameters", "world_size")}
    summary["loss_curve"] = [[h["step"], h["loss"]] for h in state.get("history", [])]
    if "eval" in state:
        summary["greedy_pass@1"] = state["eval"]["pass@1"]
        summary["greedy_eval_questions"] = state["eval"]["questions"]
    return summary


def grpo_summary(stage_dir: Path) -> dict:
    state = checkpoint.load_state(stage_dir)
    records = read_jsonl(stage_dir / GRPO_METRICS_FILE)
    curves = {name: [[r[GRPO_KEYS["step"]], r[key]] for r in records if r.get(key) is not None]
              for name, key in GRPO_KEYS.items() if name != "step"}
    summary = {key: state.get(key) for key in ("steps", "train_time_s", "world_size")}
    # GRPO's own means over the first and last 10% of steps (reward, score_correct/wrong/gap, kl, ...)
    summary["first_steps"], summary["last_steps"] = state.get("first"), state.get("last")
    refit = state.get("head_refit")
    summary["head_refit"] = None if not refit else {k: v for k, v in refit.items() if k != "val_history"}
    summary["curves"] = curves
    for name in ("reward", "kl", "score_correct", "score_wrong"):
        summary[f"final_{name}"] = curves[name][-1][1] if curves[name] else None
    return summary


def split_summary(grpo_eval: Path, sft_eval: Path) -> dict:
    """One split: accuracy of every strategy at every k (GRPO model), SFT pass@1, SPRM score separation."""
    report = json.loads((grpo_eval / "report.json").read_text(encoding="utf-8"))
    sft_report = json.loads((sft_eval / "report.json").read_text(encoding="utf-8"))
    accuracy = {k: {METRIC_LABELS.get(name, name): value for name, value in row["accuracy"].items()}
                for k, row in report["by_k"].items()}
    return {
        "num_questions": report["num_questions"],
        "samples_per_question": report["samples_per_question"],
        "pass@1": report["pass@1"],
        "sft_pass@1": sft_report["pass@1"],
        "sft_samples_per_question": sft_report["samples_per_question"],
        "accuracy": accuracy,
        "tokens_per_group": {k: row["mean_generated_tokens"] for k, row in report["by_k"].items()},
        "answered_fraction": report["answered_fraction"],
        "truncated_fraction": report["truncated_fraction"],
        "score_separation": score_separation(grpo_eval / CANDIDATES_FILE),
        "scorers": report.get("scorers"),
    }


def targets(split: dict) -> dict:
    """The demo's goals, measured (pure): does sprm@k rise with k, beat pass@1 and maj, close the gap."""
    ks = sorted(split["accuracy"], key=int)
    k_max = ks[-1]
    sprm = [split["accuracy"][k]["sprm"] for k in ks]
    pass1, pass_k = split["pass@1"], split["accuracy"][k_max]["pass"]
    sprm_k, maj_k = split["accuracy"][k_max]["sprm"], split["accuracy"][k_max]["maj"]
    headroom = pass_k - pass1
    gap = split["score_separation"]["gap"]
    free = {name: split["accuracy"][k_max][name] for name in FREE_BASELINES if name in split["accuracy"][k_max]}
    scorers = split.get("scorers") or {}
    sprm_steps = (scorers.get("steps") or {}).get("sprm", {})
    sprm_traces = (scorers.get("traces") or {}).get("sprm", {})
    return {
        "k_max": int(k_max),
        "sprm_rises_with_k": all(b >= a for a, b in zip(sprm, sprm[1:])),
        "sprm_minus_pass1": sprm_k - pass1,
        "sprm_minus_maj": sprm_k - maj_k,
        "sprm_ge_maj": sprm_k >= maj_k,
        "best_free_baseline": max(free, key=free.get) if free else None,
        "sprm_minus_best_free": sprm_k - max(free.values()) if free else None,
        "sprm_ge_every_free_baseline": all(sprm_k >= v for v in free.values()) if free else None,
        "pair_accuracy": sprm_traces.get("pair_accuracy"),
        "step_auc": sprm_steps.get("step_auc"),
        # share of the distance from pass@1 to pass@k (the oracle) that SPRM selection covers
        "gap_closed": None if headroom <= 0 else (sprm_k - pass1) / headroom,
        "score_gap": gap,
        "correct_scored_higher": None if gap is None else gap > 0,
        "pass1_change_vs_sft": pass1 - split["sft_pass@1"],
        "pass1_not_worse_than_sft": pass1 >= split["sft_pass@1"],
    }


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def build_report(config, stage_results) -> dict:
    """The combined report of a finished demo run in `config.out` (see the module docstring)."""
    root = Path(config.out)
    splits = {split: split_summary(config.eval_dir("grpo", split), config.eval_dir("sft", split))
              for split in ("test", "hard")}
    data_state = checkpoint.load_state(root / "data")
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "profile": config.profile,
        "options": {"nproc": config.nproc, "algorithm": config.algorithm, "seed": config.seed,
                    "temperature": config.temperature, "top_p": config.top_p,
                    "max_new_tokens": config.max_new_tokens},
        "data": data_state.get("sizes", {}),
        "stages": {r.name: {"status": r.status, "seconds": r.seconds, "seconds_when_run": r.seconds_when_run}
                   for r in stage_results},
        "ks": [int(k) for k in config.ks],
        "modes": dict(EFFORT_K),
        "training": {"sft": sft_summary(root / "sft"), "grpo": grpo_summary(root / "grpo")},
        "splits": splits,
        "targets": {name: targets(split) for name, split in splits.items()},
    }


# ----------------------------------------------------------------------------- markdown

def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def final_table(report: dict) -> str:
    """pass@1, maj@k, sprm@k, weighted@k, pass@k at the effort modes' k, per split; then SFT vs GRPO."""
    first = next(iter(report["splits"].values()))["accuracy"]
    shown = [s for s in TABLE_STRATEGIES if s in next(iter(first.values()))]
    header = ["split", "effort", "k", "pass@1"] + [f"{s.split(':')[0]}@k" for s in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for name, split in report["splits"].items():
        for mode, k in report["modes"].items():
            row = split["accuracy"].get(str(k))
            if row is None:
                continue
            cells = [name, mode, str(k), _pct(split["pass@1"])] + [_pct(row.get(s)) for s in shown]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| split | SFT pass@1 | GRPO pass@1 | SPRM score, correct | SPRM score, wrong | score gap |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, split in report["splits"].items():
        sep = split["score_separation"]
        lines.append(f"| {name} | {_pct(split['sft_pass@1'])} | {_pct(split['pass@1'])} | "
                     f"{_num(sep['correct_mean'])} | {_num(sep['wrong_mean'])} | {_num(sep['gap'], sign=True)} |")
    return "\n".join(lines) + "\n"


def _grpo_windows(grpo: dict) -> str:
    """Reward and SPRM scores of the rollouts, first vs last 10% of the GRPO steps."""
    first, last = grpo.get("first_steps"), grpo.get("last_steps")
    if not first or not last:
        return (f"final reward {_num(grpo['final_reward'])}, SPRM score correct "
                f"{_num(grpo['final_score_correct'])} vs wrong {_num(grpo['final_score_wrong'])}.")
    return (f"rollout reward {_num(first.get('reward_mean'))} (steps {first.get('steps')}) -> "
            f"{_num(last.get('reward_mean'))} (steps {last.get('steps')}); SPRM score correct vs wrong "
            f"{_num(first.get('score_correct'))} vs {_num(first.get('score_wrong'))} -> "
            f"{_num(last.get('score_correct'))} vs {_num(last.get('score_wrong'))} "
            f"(gap {_num(last.get('score_gap'), sign=True)}); KL {_num(last.get('kl'))}.")


def _refit_line(refit: dict | None) -> str:
    if not refit:
        return "- Head refit: off (the head is the one trained jointly with GRPO)."
    if "skipped" in refit:
        return f"- Head refit: skipped ({refit['skipped']}); the head is the one trained jointly with GRPO."
    return (f"- Head refit (outcome labels only, training questions): {refit['rollouts']} rollouts, "
            f"{refit['train_steps']} steps, head inputs `{refit['inputs']}`, aggregation `{refit['aggregation']}` "
            f"chosen by held-out pair accuracy {_num(refit['val_pair_accuracy'])} on {refit['val_questions']} "
            f"training questions (epoch {refit['best_epoch']} of {refit['epochs_run']}), {_secs(refit['time_s'])}.")


def _secs(value) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _num(value, sign: bool = False, missing: str = "-") -> str:
    if value is None:
        return missing
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def markdown(report: dict) -> str:
    sft, grpo = report["training"]["sft"], report["training"]["grpo"]
    lines = [
        "# thinkscale demo",
        "",
        f"{report['created']}, profile `{report['profile']}`, {report['options']['nproc']} workers, "
        f"relax algorithm `{report['options']['algorithm']}`, seed {report['options']['seed']}; "
        f"{report['machine']['cpus']} CPUs, torch {report['machine']['torch']}.",
        f"Data: {', '.join(f'{n} {s}' for s, n in report['data'].items())} questions. Sampling: temperature "
        f"{report['options']['temperature']}, top-p {report['options']['top_p']}, at most "
        f"{report['options']['max_new_tokens']} new tokens. Accuracy in %.",
        "",
        "## Result",
        "",
        final_table(report),
        "Effort modes: " + ", ".join(f"{m} = k {k}" for m, k in report["modes"].items())
        + ". pass@1 = mean over all samples; sprm@k = the candidate the SPRM head scores highest among k; "
          "maj@k = majority answer; weighted@k = answer with the largest total score; logprob@k = highest "
          "mean token log-prob; deepconf@k = DeepConf (top 10% by lowest group confidence, then a "
          "confidence-weighted vote); self_certainty@k = Borda vote by self-certainty; pass@k = any of k "
          "correct (the oracle). SFT pass@1 uses the same questions and sampling. Score gap = mean SPRM "
          "trajectory score of correct minus wrong samples.",
        "",
        "## Accuracy vs k",
        "",
    ]
    for name, split in report["splits"].items():
        labels = list(next(iter(split["accuracy"].values())))
        lines += [f"{name}: {split['num_questions']} questions x {split['samples_per_question']} samples; "
                  f"{_pct(split['answered_fraction'])}% answered, {_pct(split['truncated_fraction'])}% truncated.",
                  "", "| k | " + " | ".join(f"{label}@k" for label in labels) + " | tokens/group |",
                  "|---:|" + "---:|" * (len(labels) + 1)]
        for k, row in split["accuracy"].items():
            lines.append(f"| {k} | " + " | ".join(_pct(row[label]) for label in labels)
                         + f" | {split['tokens_per_group'][k]:.0f} |")
        lines.append("")
        lines += [f"Scorers on {name}:"] + scorer_lines(split.get("scorers"))[3:] + [""]
    lines += ["## Targets (measured, not tuned)", "",
              "| split | sprm rises with k | sprm@k - pass@1 | sprm@k - maj@k | sprm@k - best free baseline | "
              "gap closed | pair accuracy | step AUC | score gap | pass@1 - SFT pass@1 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in report["targets"].items():
        best = "-" if t.get("best_free_baseline") is None else f"{_pct(t['sprm_minus_best_free'])} ({t['best_free_baseline']})"
        lines.append(f"| {name} | {'yes' if t['sprm_rises_with_k'] else 'no'} | {_pct(t['sprm_minus_pass1'])} | "
                     f"{_pct(t['sprm_minus_maj'])} | {best} | {_pct(t['gap_closed'])} | {_num(t.get('pair_accuracy'))} | "
                     f"{_num(t.get('step_auc'), missing='n/a')} | {_num(t['score_gap'], sign=True)} | {_pct(t['pass1_change_vs_sft'])} |")
    lines += ["", f"(k = {next(iter(report['targets'].values()))['k_max']}; gap closed = (sprm@k - pass@1) / "
              "(pass@k - pass@1), in %.)", "", "## Training", "",
              f"- SFT: {sft['steps']} steps, final loss {_num(sft['final_loss'])}, "
              f"{_secs(sft['train_time_s'])}, greedy pass@1 {_pct(sft.get('greedy_pass@1'))}% on "
              f"{sft.get('greedy_eval_questions', '-')} test questions.",
              f"- GRPO: {grpo['steps']} steps, {_secs(grpo['train_time_s'])}; " + _grpo_windows(grpo),
              _refit_line(grpo.get("head_refit")),
              "", "## Stages", "", "| stage | this run | seconds | seconds when it ran |", "|---|---|---:|---:|"]
    for name, s in report["stages"].items():
        when = "-" if s["seconds_when_run"] is None else f"{s['seconds_when_run']:.1f}"
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {when} |")
    lines += ["", "## Plots", ""]
    for png, title in PLOTS.items():
        lines.append(f"![{title}]({png})")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

PLOTS = {
    "training_curves.png": "training curves: SFT loss, GRPO reward and KL",
    "sprm_separation.png": "SPRM score of correct vs wrong rollouts over GRPO steps",
    "accuracy_vs_k_test.png": "accuracy vs k, test split",
    "accuracy_vs_k_hard.png": "accuracy vs k, hard split",
}


def plot_training(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    sft, grpo = report["training"]["sft"], report["training"]["grpo"]
    fig = Figure(figsize=(12, 3.6), dpi=100)
    panels = [("SFT loss (completion tokens)", sft["loss_curve"], "loss"),
              ("GRPO mean reward", grpo["curves"]["reward"], "reward"),
              ("GRPO KL to the SFT policy", grpo["curves"]["kl"], "KL")]
    for i, (title, curve, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        if curve:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="." if len(curve) < 40 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_separation(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    curves = report["training"]["grpo"]["curves"]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for name, label in (("score_correct", "correct rollouts"), ("score_wrong", "wrong rollouts")):
        curve = curves[name]
        if curve:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="." if len(curve) < 40 else None,
                    label=label)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean SPRM trajectory score")
    ax.set_ylim(0, 1)
    ax.set_title("SPRM score separation during GRPO")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_accuracy(report: dict, split_name: str, path: Path) -> None:
    from matplotlib.figure import Figure

    split = report["splits"][split_name]
    ks = sorted(split["accuracy"], key=int)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for label in PLOT_LABELS:
        if label in split["accuracy"][ks[0]]:
            ax.plot([int(k) for k in ks], [100 * split["accuracy"][k][label] for k in ks], marker="o",
                    label=f"{label}@k" if label != "first" else "first sample")
    ax.axhline(100 * split["sft_pass@1"], color="gray", linestyle="--", label="SFT pass@1")
    if len(ks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks([int(k) for k in ks], labels=ks)
    ax.set_ylim(0, 102)
    ax.set_xlabel("k (samples per question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{split_name}: {split['num_questions']} questions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True) -> list[Path]:
    """report.json, report.md and (with `plots`) the PNGs of `PLOTS`; each file replaced atomically."""
    out_dir = Path(out_dir)
    written = []
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", markdown(report))):
        written.append(_atomic_write(out_dir / name, lambda p, t=text: p.write_text(t, encoding="utf-8")))
    if plots:
        written.append(_atomic_write(out_dir / "training_curves.png", lambda p: plot_training(report, p)))
        written.append(_atomic_write(out_dir / "sprm_separation.png", lambda p: plot_separation(report, p)))
        for split in report["splits"]:
            written.append(_atomic_write(out_dir / f"accuracy_vs_k_{split}.png",
                                         lambda p, s=split: plot_accuracy(report, s, p)))
    return written


def _atomic_write(path: Path, write) -> Path:
    tmp = path.with_name(f".tmp-{path.name}")  # same suffix: matplotlib picks the format from it
    write(tmp)
    os.replace(tmp, path)
    return path

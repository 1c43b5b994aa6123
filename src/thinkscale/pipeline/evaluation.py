"""Evaluation spread over local workers: each worker samples its share of the questions, then the
shares are merged into one `reflect.evaluate` report.

    launch(evaluate_shards, args=(jobs,), nproc=2)     # worker r takes questions r, r + n, r + 2n, ...
    report = merge_shards(job, nproc)                  # in the parent: report.json/md + plots

Layout of a job's folder:
    shards/<r>-of-<n>/candidates.jsonl   worker r's questions (resumable: `evaluate` appends as it goes)
    candidates.jsonl                     all questions, in data order, with their global index
    report.json, report.md, *.png        written by `reflect.evaluate` from the merged candidates
Rerunning with the same number of workers resumes each share where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..reflect.evaluate import CANDIDATES_FILE, EvalConfig, evaluate, load_records, make_model_sampler
from ..tasks.jsonl import Example, read_examples
from ..train.launch import is_main_process, rank, world_size

logger = logging.getLogger(__name__)

SHARD_SEED_STRIDE = 1_000_003  # workers' seeds lie far apart, so no two shares reuse a seed


@dataclass(frozen=True)
class EvalJob:
    """Evaluate the reflective model in `model_dir` on the {question, answer} JSONL file `data`."""

    name: str
    model_dir: str
    data: str
    out_dir: str
    config: EvalConfig


def shard_indices(num_questions: int, shard: int, num_shards: int) -> list[int]:
    """Question indices of one worker: every num_shards-th question starting at `shard`."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    return list(range(shard, num_questions, num_shards))


def shard_dir(job: EvalJob, shard: int, num_shards: int) -> Path:
    return Path(job.out_dir) / "shards" / f"{shard}-of-{num_shards}"


def shard_config(config: EvalConfig, shard: int) -> EvalConfig:
    return config if config.seed is None else replace(config, seed=config.seed + shard * SHARD_SEED_STRIDE)


def evaluate_shards(jobs: list[EvalJob]) -> None:
    """Worker body (run through `train.launch.launch`): this rank's share of every job, in order."""
    from transformers import AutoTokenizer

    from ..reflect.model import ReflectiveModel

    me, count = rank(), world_size()
    for job in jobs:
        examples = read_examples(job.data)
        mine = [examples[i] for i in shard_indices(len(examples), me, count)]
        if not mine:
            continue
        tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
        model = ReflectiveModel.from_pretrained(job.model_dir).eval()
        config = shard_config(job.config, me)
        if is_main_process():
            logger.info("eval %s: %d questions on %d worker(s), %d samples each", job.name, len(examples),
                        count, config.n)
        evaluate(mine, make_model_sampler(model, tokenizer, config), config, shard_dir(job, me, count),
                 format_prompt=lambda q: model.format_prompt(q, tokenizer), progress=is_main_process(),
                 plots=False)


def merge_shards(job: EvalJob, num_shards: int, plots: bool = True) -> dict:
    """Merge the workers' candidates into the job folder and write the report; returns it."""
    examples = read_examples(job.data)
    merged: dict[int, list] = {}
    for shard in range(num_shards):
        indices = shard_indices(len(examples), shard, num_shards)
        path = shard_dir(job, shard, num_shards) / CANDIDATES_FILE
        done = load_records(path, [examples[i] for i in indices], job.config.n)
        for local, candidates in done.items():
            merged[indices[local]] = candidates
    missing = [i for i in range(len(examples)) if i not in merged]
    if missing:
        raise RuntimeError(f"eval {job.name}: {len(missing)} questions have no candidates "
                           f"(first: {missing[0]}); rerun to resume")
    out_dir = Path(job.out_dir)
    _write_candidates(out_dir / CANDIDATES_FILE, examples, merged)
    # Every question is in candidates.jsonl now, so `evaluate` samples nothing: it only reports.
    return evaluate(examples, _no_sampling, job.config, out_dir, progress=False, plots=plots)


def _write_candidates(path: Path, examples: list[Example], merged: dict[int, list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, example in enumerate(examples):
            record = {"index": i, "question": example.question, "answer": example.answer,
                      "candidates": [c.to_dict() for c in merged[i]]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _no_sampling(prompts, k, seed):
    raise RuntimeError("merge_shards: a question was not sampled by any worker")


def score_separation(candidates_path: str | os.PathLike) -> dict:
    """Mean SPRM trajectory score of correct and of wrong candidates in a candidates file, and the gap."""
    correct, wrong = [], []
    for index, candidates in load_records(candidates_path).items():
        for c in candidates:
            (correct if c.extra.get("correct") else wrong).append(c.score)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    gap = None if not correct or not wrong else mean(correct) - mean(wrong)
    return {"correct_mean": mean(correct), "wrong_mean": mean(wrong), "gap": gap,
            "num_correct": len(correct), "num_wrong": len(wrong)}

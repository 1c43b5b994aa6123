"""Fit the SPRM head on many rollouts of the final policy, from outcome labels only.

During GRPO the head sees each rollout once, with the policy moving under it; on the demo's policy it
ends at coin-flip ranking within a question. This refit samples `samples` rollouts for each of
`questions` training questions with the frozen policy (the one decode loop, `engine.decode_rows`),
keeps each scored step's head inputs (feature, free confidences) with its rollout's outcome, and
trains a fresh head on them with the SPR loss (the spec's class-balanced BCE on the outcome; no
pseudo-label filter, which collapses a fresh head) for many epochs with weight decay. Training
questions are split: a `val_fraction` of them is held out, and the epoch and the trajectory-score
aggregation (geomean / min / last) with the best within-question pair accuracy on them are kept. No
evaluation question is touched, and no step label is used.

    rollouts = collect_rollouts(rm, tokenizer, examples, options, grade_fn, cache_dir="runs/fit/rollouts")
    head, stats = fit_head(rollouts, rm.head.hidden_size, options)

`thinkscale fit-head` runs these two on any model and task and saves the head with its record
(`provenance`); the demo's refit after GRPO (`train.grpo.refit_head`) runs them on every rank, uncached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .atomic import write_atomic, write_text_atomic
from .confidence import step_confidence_inputs
from .head import HEAD_INPUTS, SPRMHead
from .loss import SCORE_AGGREGATIONS, spr_loss, trajectory_score
from .model import DEFAULT_FEATURE_LAYER
from .scorers import pair_accuracy

logger = logging.getLogger(__name__)


@dataclass
class HeadFitOptions:
    """What the refit samples and how it trains (defaults sized for the demo: ~1-2 min on 2 cores)."""

    inputs: str = "features+confidence"  # see head.HEAD_INPUTS; the spec's head reads "features"
    questions: int = 2000  # training questions sampled (over all ranks)
    samples: int = 8  # rollouts per question
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 160  # rows decoded together
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-2
    minibatch_steps: int = 512
    patience: int = 6  # epochs without a better validation pair accuracy before stopping
    val_fraction: float = 0.1
    dropout: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inputs not in HEAD_INPUTS:
            raise ValueError(f"head inputs must be one of {', '.join(HEAD_INPUTS)}, got {self.inputs!r}")
        for name in ("questions", "samples", "max_new_tokens", "batch_size", "epochs", "minibatch_steps", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"head refit: {name} must be >= 1, got {getattr(self, name)}")
        if self.samples < 2:
            raise ValueError("head refit: samples must be >= 2 (pair accuracy compares rollouts of one question)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"head refit: val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class StepRollout:
    """One rollout's scored steps: the head inputs and the outcome that labels every one of them."""

    question: str
    correct: bool
    valid: bool  # False for truncated wrong rollouts (the SPR loss skips them)
    features: torch.Tensor  # (S, c) feature-layer output at the scored positions
    confidence: torch.Tensor  # (S, 4) step confidences
    tokens: int = 0  # generated tokens


SHARD_KEYS = ("question", "sample", "correct", "finished", "tokens", "steps", "features", "confidence")
PLAN_FILE = "plan.json"


@torch.no_grad()
def collect_rollouts(rm, tokenizer, examples: Sequence, options: HeadFitOptions,
                     grade_fn: Callable[[str, object], bool], question_ids: Sequence[int] | None = None,
                     cache_dir: str | os.PathLike | None = None, cache_note: dict | None = None,
                     progress: bool = True) -> list[StepRollout]:
    """`options.samples` rollouts per example (an object with .question), graded by grade_fn(text, example).

    Row (question i, sample j) draws from its own stream, seeded `engine.row_seed(options.seed,
    question_ids[i], j)` (question_ids default 0, 1, ...): the rollouts depend on neither the batch, nor
    the rank, nor what ran before. Questions are decoded `batch_size // samples` at a time, with a
    progress bar when `progress`.

    `cache_dir` makes the collection resumable: every batch is written there as one shard (features at the
    step ends in fp16, step confidences, outcome, question id, token count) atomically, and a shard already
    there is read instead of sampled, so a killed run continues where it stopped and ends with the rollouts
    of an uninterrupted one. The folder's plan.json records what the shards were sampled with (policy
    fingerprint, questions, sampling options, step rules, `cache_note` such as the task); other settings
    are refused (ValueError) rather than mixed in.
    """
    ids = list(range(len(examples))) if question_ids is None else [int(i) for i in question_ids]
    if len(ids) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(ids)} question ids")
    per_call = max(1, options.batch_size // options.samples)
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None:
        _claim_cache(cache, _plan(rm, tokenizer, examples, ids, options, cache_note))
    rollouts: list[StepRollout] = []
    bar = tqdm(total=len(examples) * options.samples, desc="rollouts", unit="rollout", disable=not progress,
               dynamic_ncols=True)
    try:
        for index, lo in enumerate(range(0, len(examples), per_call)):
            batch, batch_ids = examples[lo:lo + per_call], ids[lo:lo + per_call]
            path = None if cache is None else cache / f"shard-{index:05d}.pt"
            if path is not None and path.is_file():
                shard = _read_shard(path)
            else:
                shard = _sample_shard(rm, tokenizer, batch, batch_ids, options, grade_fn,
                                      torch.float16 if cache is not None else torch.float32)
                if path is not None:
                    write_atomic(path, lambda tmp: torch.save(shard, tmp))
            rollouts += _unpack(shard, dict(zip(batch_ids, batch)))
            bar.update(len(shard["question"]))
            bar.set_postfix(correct=f"{sum(r.correct for r in rollouts) / len(rollouts):.2f}")
    finally:
        bar.close()
    return rollouts


def _sample_shard(rm, tokenizer, batch: Sequence, batch_ids: list[int], options: HeadFitOptions,
                  grade_fn: Callable, feature_dtype: torch.dtype) -> dict:
    """Decode `samples` rows per question of one batch and pack what the fit needs (SHARD_KEYS)."""
    from .engine import RowSpec, decode_rows, row_seed
    from .generate import eos_token_ids, eval_mode, encode_prompts, pad_token_id
    from .scoring import features_at, scores_from_features

    eos = eos_token_ids(rm, tokenizer)
    prompts = encode_prompts(rm, tokenizer, [rm.format_prompt(e.question, tokenizer) for e in batch],
                             options.max_new_tokens)
    specs = [RowSpec(prompts[i], options.max_new_tokens, options.temperature, options.top_p,
                     row_seed(options.seed, batch_ids[i], j), tag=(i, j))
             for i in range(len(batch)) for j in range(options.samples)]
    with eval_mode(rm):
        rows = decode_rows(rm, specs, eos, pad_token_id(tokenizer, eos), feature_tokens=rm.step_feature_tokens(tokenizer))
    packed: dict[str, list] = {k: [] for k in SHARD_KEYS}
    for row in rows:
        i, j = row.spec.tag
        ends, _, _ = scores_from_features(rm, tokenizer, prompts[i], row.tokens, None)
        correct = bool(grade_fn(tokenizer.decode(row.tokens, skip_special_tokens=True), batch[i]))
        features = features_at(row.features, ends).float().cpu() if ends else torch.zeros(0, rm.head.hidden_size)
        for key, value in (("question", batch_ids[i]), ("sample", j), ("correct", correct),
                           ("finished", row.finish == "eos"), ("tokens", len(row.tokens)), ("steps", len(ends)),
                           ("features", features), ("confidence", step_confidence_inputs(row.signal_matrix(), ends))):
            packed[key].append(value)
    features = torch.cat(packed["features"])
    if feature_dtype == torch.float16 and torch.isfinite(features.half()).all():
        features = features.half()  # half the disk; kept in fp32 where a feature exceeds fp16's range
    return {"question": torch.tensor(packed["question"]), "sample": torch.tensor(packed["sample"]),
            "correct": torch.tensor(packed["correct"]), "finished": torch.tensor(packed["finished"]),
            "tokens": torch.tensor(packed["tokens"]), "steps": torch.tensor(packed["steps"]),
            "features": features, "confidence": torch.cat(packed["confidence"]).float()}


def _unpack(shard: dict, examples: dict[int, object]) -> list[StepRollout]:
    features = shard["features"].float().split(shard["steps"].tolist())
    confidence = shard["confidence"].split(shard["steps"].tolist())
    return [StepRollout(examples[int(q)].question, bool(c), bool(f) or bool(c), feat, conf, int(t))
            for q, c, f, t, feat, conf in zip(shard["question"], shard["correct"], shard["finished"],
                                              shard["tokens"], features, confidence)]


def _read_shard(path: Path) -> dict:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: say which and how to recover
        raise ValueError(f"{path}: unreadable rollout shard ({str(error).splitlines()[0][:120]}); delete it to "
                         "sample that batch again") from None
    if not isinstance(shard, dict) or set(shard) != set(SHARD_KEYS):
        raise ValueError(f"{path}: not a rollout shard (expected the keys {', '.join(SHARD_KEYS)}); delete it "
                         "to sample that batch again")
    return shard


def _plan(rm, tokenizer, examples: Sequence, ids: list[int], options: HeadFitOptions, note: dict | None) -> dict:
    """Everything that decides the cached rollouts (the fit options do not: they only read the cache)."""
    from .provenance import policy_fingerprint

    questions = hashlib.sha256(json.dumps([[i, e.question] for i, e in zip(ids, examples)]).encode()).hexdigest()
    sampling = {k: getattr(options, k) for k in ("samples", "temperature", "top_p", "max_new_tokens", "batch_size",
                                                 "seed")}
    fmt = {k: getattr(rm.config, k) for k in ("step_delimiter", "think_tags", "prompt_template", "instruction",
                                              "step_rules")}
    if rm.config.feature_layer != DEFAULT_FEATURE_LAYER:  # (the default unrecorded: older caches stay valid)
        fmt["feature_layer"] = rm.config.feature_layer
    return {"policy_fingerprint": policy_fingerprint(rm.policy), "questions": len(ids), "questions_sha256": questions,
            **sampling, **{k: list(v) if isinstance(v, tuple) else v for k, v in fmt.items()}, **(note or {})}


def _claim_cache(cache: Path, plan: dict) -> None:
    """Create the cache folder with `plan`, or check that the one there was sampled the same way."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / PLAN_FILE
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            earlier = {}
        changed = [k for k in sorted(set(plan) | set(earlier)) if plan.get(k) != earlier.get(k)]
        if changed:
            what = ", ".join(f"{k} {earlier.get(k)!r} -> {plan.get(k)!r}" if "sha256" not in k and "fingerprint" not in k
                             else f"{k.split('_')[0]} differ" for k in changed)
            raise ValueError(f"{cache} holds rollouts sampled otherwise ({what}): use another output folder, or "
                             "--overwrite to sample afresh")
        return
    write_text_atomic(path, json.dumps(plan, indent=2) + "\n")


def _split(rollouts: Sequence[StepRollout], val_fraction: float, seed: int):
    questions = sorted({r.question for r in rollouts})
    random.Random(seed).shuffle(questions)
    held_out = set(questions[: max(1, int(len(questions) * val_fraction))])
    train = [r for r in rollouts if r.question not in held_out and r.valid and len(r.features)]
    val: dict[str, list[StepRollout]] = {}
    for r in rollouts:
        if r.question in held_out:
            val.setdefault(r.question, []).append(r)
    return train, list(val.values())


def _score(head: SPRMHead, rollout: StepRollout, aggregation: str) -> float:
    if not len(rollout.features):
        return 0.0
    logits = head(rollout.features, rollout.confidence)[None]
    return float(trajectory_score(logits, torch.ones_like(logits, dtype=torch.bool), aggregation))


def fit_head(rollouts: Sequence[StepRollout], hidden_size: int, options: HeadFitOptions) -> tuple[SPRMHead, dict]:
    """A fresh head fitted on `rollouts` (see the module docstring); returns (head, stats).

    stats: the chosen aggregation, epochs run, best epoch, validation pair accuracy per aggregation.
    Raises ValueError when the training rollouts are all right or all wrong (nothing to learn).
    """
    train, val = _split(rollouts, options.val_fraction, options.seed)
    if not train or not any(r.correct for r in train) or all(r.correct for r in train):
        right = sum(r.correct for r in train)
        raise ValueError(f"head refit: the rollouts need both correct and wrong outcomes to learn from ({right} of "
                         f"{len(train)} usable training rollouts correct; truncated wrong ones do not count)")
    torch.manual_seed(options.seed)
    head = SPRMHead(hidden_size, dropout=options.dropout, inputs=options.inputs)
    optimizer = torch.optim.AdamW(head.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    features = torch.cat([r.features for r in train])  # (N, c): every training step
    confidence = torch.cat([r.confidence for r in train])
    outcome = torch.cat([torch.full((len(r.features),), float(r.correct)) for r in train])
    order = torch.Generator().manual_seed(options.seed)
    best = (None, None, None, 0)  # (val pair accuracy, aggregation, state, epoch)
    history = []
    for epoch in range(options.epochs):
        head.train()
        for idx in torch.randperm(len(outcome), generator=order).split(options.minibatch_steps):
            logits = head(features[idx], confidence[idx])[:, None]  # each step a row of one
            loss, _ = spr_loss(logits, torch.ones_like(logits, dtype=torch.bool), outcome[idx],
                               pseudo_label_filter=False)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            scores = {agg: pair_accuracy(val, lambda r: _score(head, r, agg), lambda r: r.correct)
                      for agg in SCORE_AGGREGATIONS}
        history.append(scores)
        agg, value = max(((a, v) for a, v in scores.items() if v is not None), key=lambda t: t[1],
                         default=(None, None))
        if value is not None and (best[0] is None or value > best[0]):
            best = (value, agg, {k: v.clone() for k, v in head.state_dict().items()}, epoch)
        elif epoch - best[3] >= options.patience:
            break
    if best[2] is None:
        # no held-out question has both outcomes, so nothing to choose by: the last epoch, the spec's mean
        logger.warning("head refit: no held-out question has both correct and wrong rollouts; keeping the last "
                       "epoch and the geometric mean (use more questions or samples)")
        best = (None, "geomean", head.state_dict(), len(history) - 1)
    head.load_state_dict(best[2])
    stats = {"inputs": options.inputs, "aggregation": best[1], "val_pair_accuracy": best[0],
             "best_epoch": best[3] + 1, "epochs_run": len(history), "train_rollouts": len(train),
             "train_steps": len(outcome), "train_correct_fraction": float(outcome.mean()),
             "val_questions": len(val), "val_history": history}
    logger.info("head refit: %s inputs, %s aggregation, held-out pair accuracy %s (epoch %d of %d), %d steps",
                options.inputs, best[1], "n/a" if best[0] is None else f"{best[0]:.3f}", best[3] + 1, len(history),
                len(outcome))
    return head.eval(), stats

"""Fit the SPRM head on many rollouts of the final policy, from outcome labels only.

During GRPO the head sees each rollout once, with the policy moving under it; on the demo's policy it
ends at coin-flip ranking within a question. This refit samples `samples` rollouts for each of
`questions` training questions with the finished policy (one decode loop: `generate.decode`, features
and free confidences kept), caches each scored step's head inputs with its rollout's outcome, and
trains a fresh head on them with the SPR loss (the spec's class-balanced BCE on the outcome; no
pseudo-label filter, which collapses a fresh head) for many epochs with weight decay. Training
questions are split: a `val_fraction` of them is held out, and the epoch and the trajectory-score
aggregation (geomean / min / last) with the best within-question pair accuracy on them are kept. No
evaluation question is touched, and no step label is used.

    rollouts = collect_rollouts(rm, tokenizer, examples, options, grade_fn)
    head, stats = fit_head(rollouts, rm.head.hidden_size, options)
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .confidence import step_confidence_inputs
from .head import HEAD_INPUTS, SPRMHead
from .loss import SCORE_AGGREGATIONS, spr_loss, trajectory_score
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


@torch.no_grad()
def collect_rollouts(rm, tokenizer, examples: Sequence, options: HeadFitOptions,
                     grade_fn: Callable[[str, object], bool], generator: torch.Generator | None = None
                     ) -> list[StepRollout]:
    """`options.samples` rollouts per example (an object with .question), graded by grade_fn(text, example)."""
    from .generate import _encode_prompt, _eos_ids, _eval_mode, decode
    from .scoring import features_at, scores_from_features

    eos = _eos_ids(rm, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    per_call = max(1, options.batch_size // options.samples)
    no_steps = torch.zeros(0, rm.head.hidden_size)
    rollouts: list[StepRollout] = []
    with _eval_mode(rm):
        for lo in range(0, len(examples), per_call):
            batch = examples[lo:lo + per_call]
            prompts = [_encode_prompt(tokenizer, rm.format_prompt(e.question, tokenizer)) for e in batch]
            rows = [p for p in prompts for _ in range(options.samples)]
            decoded = decode(rm, rows, options.max_new_tokens, eos, pad, options.temperature, options.top_p,
                             generator=generator, keep_features=True, tokenizer=tokenizer)
            for i, d in enumerate(decoded):
                example, prompt = batch[i // options.samples], rows[i]
                ends, _, _ = scores_from_features(rm, tokenizer, prompt, d.tokens, None)
                correct = bool(grade_fn(tokenizer.decode(d.tokens, skip_special_tokens=True), example))
                rollouts.append(StepRollout(example.question, correct, d.finished or correct,
                                            features_at(d.features, ends).float().cpu() if ends else no_steps,
                                            step_confidence_inputs(d.signals, ends)))
    return rollouts


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
        raise ValueError("head refit: the rollouts need both correct and wrong outcomes to learn from")
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

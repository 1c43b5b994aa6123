"""SPR loss (outcome-supervised step loss) and the trajectory score: pure tensor math."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

POSITIVE_FACTOR = 1.5  # the spec's extra weight on steps of correct trajectories
MIN_STEP_PROB = 1e-10  # floor on step probabilities inside the geometric mean


SCORE_AGGREGATIONS = ("geomean", "min", "last")


def trajectory_score(step_logits: torch.Tensor, mask: torch.Tensor, aggregation: str = "geomean") -> torch.Tensor:
    """One score per trajectory from its masked step probabilities p = max(sigmoid(s), 1e-10).

    aggregation: "geomean" (the spec): exp(mean log p); "min": the weakest step; "last": the final step.
    `step_logits` and `mask` have shape (..., T); returns shape (...). 0.0 where a row has no step.

        >>> import torch
        >>> from thinkscale.reflect import trajectory_score
        >>> logits = torch.tensor([[0.0, 0.0], [2.0, -2.0], [5.0, 5.0]])
        >>> mask = torch.tensor([[True, True], [True, True], [False, False]])
        >>> trajectory_score(logits, mask)       # sqrt(sigmoid(2) * sigmoid(-2)) = 0.3240; no step: 0
        tensor([0.5000, 0.3240, 0.0000])
        >>> trajectory_score(logits, mask, "min")
        tensor([0.5000, 0.1192, 0.0000])
    """
    if step_logits.shape != mask.shape:
        raise ValueError(f"step_logits {tuple(step_logits.shape)} and mask {tuple(mask.shape)} differ in shape")
    if aggregation not in SCORE_AGGREGATIONS:
        raise ValueError(f"unknown score aggregation {aggregation!r}; valid: {', '.join(SCORE_AGGREGATIONS)}")
    mask = mask.to(torch.bool)
    # log(max(sigmoid(s), eps)) == max(logsigmoid(s), log eps), without underflow
    log_p = F.logsigmoid(step_logits.float()).clamp(min=math.log(MIN_STEP_PROB))
    count = mask.sum(dim=-1)
    if aggregation == "geomean":
        value = torch.where(mask, log_p, torch.zeros_like(log_p)).sum(dim=-1) / count.clamp(min=1)
    elif aggregation == "min":
        value = torch.where(mask, log_p, torch.zeros_like(log_p)).min(dim=-1).values
    else:
        positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values.clamp(min=0)
        value = log_p.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    return torch.where(count > 0, value.exp(), torch.zeros_like(value))


def spr_loss(
    step_logits: torch.Tensor,
    mask: torch.Tensor,
    outcome: torch.Tensor,
    valid: torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
    pseudo_label_filter: bool = True,
    min_class_share: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Self-supervised process reward loss of the SPRM head (spec: "SPR loss").

    `pseudo_label_filter=False` trains every scored step on its trajectory's outcome (class-balanced the
    same way). The spec's filter keeps only steps whose prediction already agrees with the outcome; with a
    fresh head it can lock in a head that scores every step low (a step of a correct trajectory predicted
    negative is never trained again: the fine-tuned SmolLM2's joint head reached that fixed point in 4
    steps, docs/real-model.md), so trainers may warm up without it, or set `min_class_share`: an outcome
    class (correct / wrong) of which the filter keeps fewer than this share of its scored steps is trained
    on all of them this step. The filter is meant to drop noisy labels, not a whole class; 0 (the
    default) is the spec's loss exactly.

    step_logits (B, T) head logits; mask (B, T) scored positions (`step_mask`); outcome (B,) 1 = final
    answer correct, 0 = wrong; valid (B,) False drops a trajectory entirely (pass
    ``~(truncated & wrong)``). With `process_group`, the class counts P and N are summed over its ranks
    (all_reduce SUM, no gradient) before the +1 smoothing, so every rank weights by global counts (and
    `min_class_share` decides on global counts); the final normalization by sum(weight) stays local.
    Every rank must call this when a group is given.

    Returns (loss, stats). stats: P, N (smoothed global counts), steps (local scored steps of valid
    rows), trained_steps (local steps trained: passing the filter, or of an unfiltered class),
    unfiltered_classes (0, 1 or 2 classes trained whole by `min_class_share`), score_correct /
    score_wrong (mean trajectory score over all rows of that outcome, NaN when the batch has none).

        >>> import torch
        >>> from thinkscale.reflect import spr_loss
        >>> logits = torch.tensor([[2.0, -1.0], [-3.0, 0.5]], requires_grad=True)  # 2 trajectories x 2 steps
        >>> loss, stats = spr_loss(logits, torch.ones(2, 2, dtype=torch.bool), torch.tensor([1, 0]))
        >>> stats["steps"], stats["trained_steps"]     # the filter keeps the steps that agree with the outcome
        (4.0, 2.0)
        >>> loss.backward(); logits.grad[0, 1] == 0    # a step of a right answer scored low is not trained
        tensor(True)
    """
    if step_logits.dim() != 2 or mask.shape != step_logits.shape:
        raise ValueError(
            f"step_logits and mask must both be (B, T); got {tuple(step_logits.shape)} and {tuple(mask.shape)}"
        )
    B = step_logits.shape[0]
    if outcome.shape != (B,):
        raise ValueError(f"outcome must have shape ({B},), got {tuple(outcome.shape)}")
    y_row = outcome.to(step_logits.device, torch.float32)
    if not torch.all((y_row == 0) | (y_row == 1)):
        raise ValueError("outcome must hold only 0 (wrong) and 1 (correct)")
    if not 0.0 <= min_class_share <= 1.0:
        raise ValueError(f"min_class_share must be in [0, 1], got {min_class_share}")
    keep = mask.to(torch.bool)
    if valid is not None:
        if valid.shape != (B,):
            raise ValueError(f"valid must have shape ({B},), got {tuple(valid.shape)}")
        keep = keep & valid.to(keep.device, torch.bool)[:, None]

    s = step_logits.float()
    y = y_row[:, None].expand_as(s)  # (B, T)
    agrees = ((s > 0) & (y == 1)) | ((s < 0) & (y == 0))  # pseudo-label filter
    filtered = (keep & agrees if pseudo_label_filter else keep).float().detach()
    scored = keep.float()
    # per class: steps passing the filter, and all scored steps (global when a group is given)
    counts = torch.stack([(filtered * y).sum(), (filtered * (1 - y)).sum(), (scored * y).sum(),
                          (scored * (1 - y)).sum()]).detach()
    if process_group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    unfiltered = counts[:2] < min_class_share * counts[2:]  # (correct, wrong): the filter emptied the class
    w = torch.where(y == 1, scored if unfiltered[0] else filtered, scored if unfiltered[1] else filtered)
    P = (counts[2] if unfiltered[0] else counts[0]) + 1.0
    N = (counts[3] if unfiltered[1] else counts[1]) + 1.0
    T_ = P + N
    weight = w * (POSITIVE_FACTOR * (N / T_) * y + (P / T_) * (1 - y))
    bce = F.binary_cross_entropy_with_logits(s, y, reduction="none")
    loss = (weight * bce).sum() / (weight.sum() + 1e-5)

    with torch.no_grad():
        scores = trajectory_score(s, mask.to(torch.bool))
        correct, wrong = y_row == 1, y_row == 0
        stats = {
            "P": P.item(),
            "N": N.item(),
            "steps": float(keep.sum().item()),
            "trained_steps": float(w.sum().item()),
            "unfiltered_classes": float(unfiltered.sum().item()),
            "score_correct": scores[correct].mean().item() if correct.any() else math.nan,
            "score_wrong": scores[wrong].mean().item() if wrong.any() else math.nan,
        }
    return loss, stats

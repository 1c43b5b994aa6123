"""Step scores from hidden features: the fused path (features kept during generation) and the
reference path (one full forward over prompt + completion)."""
from __future__ import annotations

import torch

from .loss import trajectory_score
from .model import ReflectiveModel


def scores_from_features(rm: ReflectiveModel, tokenizer, prompt_ids: list[int], completion_ids: list[int],
                         features: torch.Tensor) -> tuple[list[float], float]:
    """Step probabilities and trajectory score of one candidate from features kept during decoding.

    `features[g]` (shape (G, c), G = len(completion_ids)) is the feature-layer output at the position
    that predicted completion token g, i.e. absolute position len(prompt) - 1 + g. The head runs only
    at the scored positions.
    """
    P, G = len(prompt_ids), len(completion_ids)
    if features.shape[0] != G:
        raise ValueError(f"expected {G} feature rows (one per generated token), got {features.shape[0]}")
    ids = torch.tensor(prompt_ids + completion_ids, device=features.device)
    scored = rm.step_mask(tokenizer, ids, response_start=P).nonzero().flatten()  # all in [P-1, P+G-2]
    logits = rm.head(features[scored - (P - 1)]) if scored.numel() else features.new_zeros(0)
    score = trajectory_score(logits.float(), torch.ones_like(logits, dtype=torch.bool)).item()
    return torch.sigmoid(logits.float()).tolist(), score


@torch.no_grad()
def score_sequences(rm: ReflectiveModel, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                    batch_size: int = 8) -> list[tuple[list[float], float]]:
    """Reference scorer: a full forward over each prompt + completion (right-padded batches), head at
    every position, then the step mask. Returns (step probabilities, trajectory score) per sequence."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(rm.policy.parameters()).device
    was_training = rm.training
    rm.eval()
    results: list[tuple[list[float], float]] = []
    try:
        for lo in range(0, len(prompt_ids), batch_size):
            prompts, completions = prompt_ids[lo:lo + batch_size], completion_ids[lo:lo + batch_size]
            seqs = [p + c for p, c in zip(prompts, completions)]
            T = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
            attn = torch.zeros_like(ids)
            for b, s in enumerate(seqs):
                ids[b, :len(s)] = torch.tensor(s, device=device)
                attn[b, :len(s)] = 1
            out = rm(ids, attention_mask=attn, use_cache=False)
            starts = torch.tensor([len(p) for p in prompts], device=device)
            mask = rm.step_mask(tokenizer, ids, response_start=starts, attention_mask=attn)
            scores = trajectory_score(out.step_logits.float(), mask)
            for b in range(len(seqs)):
                results.append((torch.sigmoid(out.step_logits[b][mask[b]].float()).tolist(), scores[b].item()))
    finally:
        rm.train(was_training)
    return results


def rescore(rm: ReflectiveModel, tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[float], float]:
    """Reference score of a single prompt + completion (see `score_sequences`)."""
    return score_sequences(rm, tokenizer, [prompt_ids], [completion_ids])[0]

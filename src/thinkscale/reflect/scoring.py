"""Step scores from hidden features: the fused path (features kept during generation) and the
reference path (one full forward over prompt + completion)."""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from .confidence import step_confidence_inputs, token_signals
from .loss import trajectory_score
from .model import ReflectiveModel


Features = Union[torch.Tensor, Mapping[int, torch.Tensor]]  # (G, c), or token position -> (c,) (Row.features)


def features_at(features: Features, positions: Sequence[int]) -> torch.Tensor:
    """(S, c): the features at token `positions`, from a (G, c) matrix or a position -> feature mapping."""
    if isinstance(features, torch.Tensor):
        return features[list(positions)]
    missing = [g for g in positions if g not in features]
    if missing:
        raise ValueError(f"no feature kept at token position(s) {missing[:5]}: decode with the model's "
                         "step_feature_tokens, or keep every feature")
    return torch.stack([features[g] for g in positions])


def scores_from_features(rm: ReflectiveModel, tokenizer, prompt_ids: list[int], completion_ids: list[int],
                         features: Features | None, signals: torch.Tensor | None = None
                         ) -> tuple[list[int], list[float], float]:
    """Step ends, step probabilities and trajectory score of one candidate from features kept during decoding.

    `features[g]` is the feature-layer output (c,) at the position that predicted completion token g,
    i.e. absolute position len(prompt) - 1 + g: a (G, c) matrix (G = len(completion_ids)), or a mapping
    that holds at least the step ends (the engine's `Row.features`). The scored position of a step whose
    delimiter is completion token g is feature g, and g is the step's end. The head runs only at the
    scored positions; a head with confidence inputs also reads `signals` (G, 3), the per-token signals of
    the decode loop. With `features` None only the step ends are computed.
    """
    P, G = len(prompt_ids), len(completion_ids)
    if isinstance(features, torch.Tensor) and features.shape[0] != G:
        raise ValueError(f"expected {G} feature rows (one per generated token), got {features.shape[0]}")
    device = next(rm.policy.parameters()).device
    ids = torch.tensor(prompt_ids + completion_ids, device=device)
    ends = rm.step_mask(tokenizer, ids, response_start=P).nonzero().flatten() - (P - 1)  # all in [0, G-1]
    if features is None:
        return ends.tolist(), [], 0.0
    if not ends.numel():
        return [], [], 0.0
    confidence = None
    if rm.head.reads_confidence:
        if signals is None:
            raise ValueError("this SPRM head reads step confidences: pass the decode loop's signals")
        confidence = step_confidence_inputs(signals, ends.tolist()).to(device)
    logits = rm.head(features_at(features, ends.tolist()).to(device), confidence)
    score = trajectory_score(logits.float(), torch.ones_like(logits, dtype=torch.bool),
                             rm.config.score_aggregation).item()
    return ends.tolist(), torch.sigmoid(logits.float()).tolist(), score


@torch.no_grad()
def score_sequences(rm: ReflectiveModel, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                    batch_size: int = 8) -> list[tuple[list[float], float]]:
    """Reference scorer: a full forward over each prompt + completion (right-padded batches), head at
    every position, then the step mask. Returns (step probabilities, trajectory score) per sequence.

        >>> from thinkscale.reflect import ReflectiveModel, score_sequences
        >>> from thinkscale.tasks.policy import tiny_policy
        >>> policy, tokenizer = tiny_policy()                      # 2 layers of width 32, untrained
        >>> rm = ReflectiveModel(policy)                           # a fresh head on its hidden states
        >>> prompt = tokenizer.encode(rm.format_prompt("What is 1 + 2?", tokenizer))
        >>> answers = ["1 + 2 = 3.\\n\\n</think>\\n3", "1 + 2 = 3.\\n\\n3 = 3.\\n\\n</think>\\n3"]
        >>> scored = score_sequences(rm, tokenizer, [prompt] * 2, [tokenizer.encode(a) for a in answers])
        >>> [len(steps) for steps, score in scored]          # one probability per step
        [1, 2]
    """
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
            out = rm(ids, attention_mask=attn, use_cache=False, compute_step_logits=False, return_features=True)
            starts = torch.tensor([len(p) for p in prompts], device=device)
            mask = rm.step_mask(tokenizer, ids, response_start=starts, attention_mask=attn)
            for b, (p, c) in enumerate(zip(prompts, completions)):
                scored = mask[b].nonzero().flatten()
                if not scored.numel():
                    results.append(([], 0.0))
                    continue
                confidence = None
                if rm.head.reads_confidence:  # the same signals the decode loop records, from this forward
                    signals = token_signals(out.logits[b, len(p) - 1:len(p) - 1 + len(c)],
                                            torch.tensor(c, device=device))
                    confidence = step_confidence_inputs(signals.cpu(), (scored - (len(p) - 1)).tolist()).to(device)
                logits = rm.head(out.features[b, scored], confidence).float()
                score = trajectory_score(logits, torch.ones_like(logits, dtype=torch.bool), rm.config.score_aggregation)
                results.append((torch.sigmoid(logits).tolist(), score.item()))
    finally:
        rm.train(was_training)
    return results


def rescore(rm: ReflectiveModel, tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[float], float]:
    """Reference score of a single prompt + completion (see `score_sequences`).

        >>> from thinkscale.reflect import ReflectiveModel, rescore
        >>> from thinkscale.tasks.policy import tiny_policy
        >>> policy, tokenizer = tiny_policy()                      # 2 layers of width 32, untrained
        >>> rm = ReflectiveModel(policy)                           # a fresh head on its hidden states
        >>> prompt = tokenizer.encode(rm.format_prompt("What is 1 + 2?", tokenizer))
        >>> steps, score = rescore(rm, tokenizer, prompt, tokenizer.encode("1 + 2 = 3.\\n\\n</think>\\n3"))
        >>> len(steps), round(score, 4) == round(steps[0], 4)     # one step: its probability is the score
        (1, True)
    """
    return score_sequences(rm, tokenizer, [prompt_ids], [completion_ids])[0]

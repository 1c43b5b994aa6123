"""Joint GRPO + SPR training (MetaStone-S1): the policy learns from outcome reward by GRPO while the
SPRM head learns, from the same outcomes and the same forward pass, to score reasoning steps.

    result = launch(run_grpo, args=(GRPOOptions(model="runs/sft", out="runs/grpo"),), nproc=2)

One step on every rank (each rank on its own prompts):
1. rollouts: `group_size` samples per prompt from the current policy (reflect's sampler, eval mode);
   reward 1/0 from reflect's grader; a truncated wrong rollout is marked so the SPR loss skips it;
2. advantages (r - mean_group) / (std_group + 1e-6); reference log-probs from the frozen start policy;
3. `updates_per_batch` joint updates on the whole rollout batch. Each is ONE forward of the reflective
   model (policy logits and step logits together), total = L_SPR + policy loss, ONE backward, then
   per-group clipping and one optimizer step. Policy loss (token mean over response tokens):
   PPO-clip(0.2) surrogate + 0.001 * k3 KL to the reference - 0.001 * entropy, all from logits divided
   by the rollout temperature (the distribution the rollouts were drawn from).

Optimizers: the spec gives the head its own AdamW (own lr, own grad-clip). Here it is ONE AdamW with
two parameter groups (policy, head), each clipped to its own norm before the step. That is the same
update - AdamW's state and step are per parameter, clipping is per group - and it is what relax needs:
`DataParallel` drives one optimizer, and the decentralized algorithms average weights around *its*
step, so a second optimizer would leave the head's replicas drifting apart.

The policy runs in eval mode during updates (no dropout; the head keeps its dropout, as the spec says).
The rollout policy and the first update's policy are then the same function, so the old log-probs
of the PPO ratio are the first update's own log-probs, detached - no extra forward pass.

With `refit_head`, the head is then fitted again on many rollouts of the final policy (outcome labels
only, `reflect.head_fit`): every rank samples its share, rank 0 fits and saves it.

Output directory (atomic, via train.checkpoint): the policy, `sprm_head.safetensors`,
`reflect_config.json`, the tokenizer (`ReflectiveModel.from_pretrained(out)` loads it all),
`metrics.jsonl` (one line per step), `stage_state.json` (options and summary), `data/` copied from the
starting model's directory when it has one, `checkpoints/` (below), and the `done` marker.

Checkpoints (`save_every` steps, train.checkpoint): every rank's policy, head, optimizer, relax state and
RNG, the reference policy and the metrics so far; `resume` (or a restart by the launcher) continues
from the newest. Rollout seeds and the prompt order follow from the step number, so a resumed run
draws the rollouts an uninterrupted one would.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..reflect.engine import SAMPLING
from ..reflect.generate import encode_prompt
from ..reflect.head_fit import HeadFitOptions
from ..tasks.jsonl import Example, read_examples
from . import checkpoint
from .optim import make_optimizer
from .evaluation import outcome_grader, sample_graded
from .loop import TrainingLoop
from .launch import is_main_process, rank, world_size
from .rl_math import (clipped_policy_loss, entropy_from_logits, group_advantages, k3_kl, masked_mean,
                      pairwise_ranking_accuracy, token_log_probs)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class GRPOOptions:
    """Everything one joint GRPO + SPR run needs (picklable: it travels to spawned workers).

    `model`: a directory with a policy and tokenizer (an SFT output); its `sprm_head.safetensors` is
    used when present, else a fresh head is trained. `data`: JSONL of questions with answers (default:
    `model`/data/train.jsonl); `eval_data` likewise (default `model`/data/test.jsonl when present).
    `prompts_per_step` is per rank: a step samples prompts_per_step * group_size rollouts on every rank.

    Defaults are tuned for the built-in task's tiny policy (~2.7M parameters) after SFT: 40 steps of
    8 x 8 rollouts per rank take ~4 min with 2 workers on 2 CPU cores. Policy lr 1e-5 keeps pass@1
    (1e-4 collapsed the policy: KL 0.7, pass@1 0.29 -> 0.01); head lr 1e-3 (3e-3 saturates every score
    at 1.0). Rollouts at temperature 0.8: more mixed groups than the test-time 0.6, close to its distribution.
    """

    model: str
    out: str
    data: str | None = None
    eval_data: str | None = None
    algorithm: str = "gradient_allreduce"
    task: str | None = None  # a task whose grader gives the reward (tasks.registry); None: math answers
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    clip_ratio: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    grad_clip: float = 1.0
    head_grad_clip: float = 1.0
    backbone_grad_scale: float | None = None  # None: the model's reflect config (spec: 1e-4)
    updates_per_batch: int = 1
    # Steps (from the start) whose SPR loss skips the pseudo-label filter; 0 = the spec's loss throughout.
    # A fresh head on a small policy can collapse to scoring every step low under the filter.
    spr_filter_warmup_steps: int = 0
    # With the filter on: an outcome class of which it keeps fewer than this share of the scored steps is
    # trained whole that step (reflect.spr_loss's guard; 0 = the spec's loss exactly). Without it the
    # fine-tuned SmolLM2's fresh head fell to scoring every step 1e-10 within 4 steps (docs/real-model.md).
    spr_min_class_share: float = 0.1
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_p: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_questions: int = 100
    eval_samples: int = 8
    eval_temperature: float = SAMPLING.temperature  # test-time sampling of the MetaStone-S1 release
    eval_top_p: float = SAMPLING.top_p
    eval_before: bool = False
    # After training: refit the head on many rollouts of the final policy (reflect.head_fit), outcome labels
    # only. The jointly trained head of the demo's policy ranks at chance within a question.
    refit_head: bool = False
    refit: HeadFitOptions = field(default_factory=HeadFitOptions)
    save_every: int | None = 10  # checkpoint every this many steps and after the last (None: never)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in out/checkpoints

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "group_size", "updates_per_batch", "max_new_tokens", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"save_every must be >= 1 (or None: no checkpoints), got {self.save_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.spr_filter_warmup_steps < 0:
            raise ValueError(f"spr_filter_warmup_steps must be >= 0, got {self.spr_filter_warmup_steps}")
        if not 0.0 <= self.spr_min_class_share <= 1.0:
            raise ValueError(f"spr_min_class_share must be in [0, 1], got {self.spr_min_class_share}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2: GRPO compares rollouts within a group, got {self.group_size}")
        for name in ("lr", "head_lr", "clip_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "kl_coef", "entropy_coef", "temperature", "eval_temperature",
                     "grad_clip", "head_grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.backbone_grad_scale is not None and not 0 <= self.backbone_grad_scale <= 1:
            raise ValueError(f"backbone_grad_scale must be in [0, 1], got {self.backbone_grad_scale}")
        if not (0 < self.top_p <= 1 and 0 < self.eval_top_p <= 1):
            raise ValueError(f"top_p and eval_top_p must be in (0, 1], got {self.top_p} and {self.eval_top_p}")
        if self.eval_questions < 0 or self.eval_samples < 1:
            raise ValueError("eval_questions must be >= 0 and eval_samples >= 1")
        if self.task is not None:
            from ..tasks.registry import get_task

            get_task(self.task)


# ----------------------------------------------------------------------------- pure pieces

@dataclass
class RolloutBatch:
    """A rank's rollouts as one right-padded batch (B = prompts * group_size rows, groups consecutive).

    `response_mask` is in *target* coordinates (B, T-1): entry t is set when token t+1 is a response
    token, i.e. where the logits at position t are scored by the policy loss.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    response_start: torch.Tensor  # (B,) prompt length of each row
    response_mask: torch.Tensor  # (B, T-1) bool
    rewards: torch.Tensor  # (B,) 1.0 correct, 0.0 wrong
    valid: torch.Tensor  # (B,) bool, False for truncated wrong rollouts (skipped by the SPR loss)
    advantages: torch.Tensor  # (B,)
    rollout_scores: torch.Tensor  # (B,) SPRM trajectory score seen while sampling (eval mode)


def pad_rollouts(prompts: list[list[int]], completions: list[list[int]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompt + completion rows: (input_ids, attention_mask, response_start, response_mask)."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many completions as prompts (>= 1), got {len(prompts)} and {len(completions)}")
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros((len(prompts), max(length - 1, 0)), dtype=torch.bool)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[row, : len(p) + len(c)] = 1
        response[row, len(p) - 1 : len(p) - 1 + len(c)] = True  # logits at t predict token t + 1
    starts = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ids, attention, starts, response


def prompt_batches(examples: list[Example], per_step: int, seed: int, rank_: int):
    """Endless batches of `per_step` examples, reshuffled every pass (a different order on every rank)."""
    if len(examples) < per_step:
        raise ValueError(f"each rank has {len(examples)} prompts, fewer than prompts_per_step={per_step}; "
                         "use more data, fewer processes or fewer prompts per step")
    rng = random.Random(seed * 1_000_003 + rank_)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - per_step + 1, per_step):
            yield [examples[i] for i in order[start : start + per_step]]


# ----------------------------------------------------------------------------- data and model

def load_data(options: GRPOOptions) -> tuple[list[Example], list[Example]]:
    """(training questions, evaluation questions); defaults come from the model directory's data/."""
    model_dir = Path(options.model)
    data = options.data
    if data is None:
        data = model_dir / "data" / "train.jsonl"
        if not data.is_file():
            raise ValueError(f"no --data given and {data} does not exist; pass a JSONL of questions and answers")
    train = read_examples(data)
    eval_data = options.eval_data
    if eval_data is None and (model_dir / "data" / "test.jsonl").is_file():
        eval_data = model_dir / "data" / "test.jsonl"
    evaluation = read_examples(eval_data) if eval_data is not None else []
    if options.task is not None:  # e.g. a gym task refuses records without the metadata it grades with
        from ..tasks.registry import get_task

        get_task(options.task).check(train, str(data))
        get_task(options.task).check(evaluation, str(eval_data))
    return train, evaluation


def load_model(options: GRPOOptions):
    """(ReflectiveModel, tokenizer) for `options.model` (`reflect.loading`: a folder, "smollm2", a fitted-head
    folder); a missing head is created fresh."""
    from ..reflect.loading import load_model as load_reflective

    rm, tokenizer = load_reflective(options.model, backbone_grad_scale=options.backbone_grad_scale)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {options.model} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of every loss
    if rm.head.reads_confidence:
        # the joint update scores every position in one forward, where step confidences do not exist yet
        from ..reflect import SPRMHead

        logger.info("the head in %s reads step confidences; GRPO trains a fresh features head jointly "
                    "(use refit_head to fit a confidence head again afterwards)", options.model)
        rm.head = SPRMHead(rm.head.hidden_size, dropout=rm.config.head_dropout)
        rm.config.head_inputs, rm.head_is_trained = "features", False
    return rm, tokenizer


def build_optimizer(rm, options: GRPOOptions) -> torch.optim.Optimizer:
    """One optimizer, two groups: "policy" (lr) and "head" (head_lr); see the module docstring."""
    groups = [
        {"params": [p for p in rm.policy.parameters() if p.requires_grad], "lr": options.lr,
         "max_grad_norm": options.grad_clip, "name": "policy"},
        {"params": list(rm.head.parameters()), "lr": options.head_lr,
         "max_grad_norm": options.head_grad_clip, "name": "head"},
    ]
    # QAdam's warm-up is plain Adam (L2 weight decay); after it, clipping no longer acts (see relax.qadam)
    return make_optimizer(groups, options.algorithm, options.lr, options.weight_decay, options.steps)


def clip_each_group(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Clip every parameter group to its own `max_grad_norm` (0 = no clipping); returns the norms before."""
    norms = {}
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        limit = group.get("max_grad_norm", 0.0)
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, limit if limit > 0 else math.inf)
        norms[group.get("name", str(len(norms)))] = float(norm)
    return norms


# ----------------------------------------------------------------------------- rollouts

def collect_rollouts(rm, tokenizer, examples: list[Example], options: GRPOOptions, seed: int) -> tuple[RolloutBatch, dict]:
    """Sample `group_size` rollouts per example, grade them, and lay them out as one batch."""
    from ..reflect import sample

    is_right = outcome_grader(rm, options.task)
    prompts = [encode_prompt(tokenizer, rm.format_prompt(e.question, tokenizer)) for e in examples]
    groups = sample(rm, tokenizer, prompts, k=options.group_size, temperature=options.temperature,
                    top_p=options.top_p, max_new_tokens=options.max_new_tokens, seed=seed,
                    batch_size=len(prompts) * options.group_size)
    rows_prompt, rows_completion, rewards, truncated, scores = [], [], [], [], []
    for example, prompt, candidates in zip(examples, prompts, groups):
        for c in candidates:
            rows_prompt.append(prompt)
            rows_completion.append(list(c.token_ids))
            rewards.append(1.0 if is_right(c.text, example) else 0.0)
            truncated.append(c.truncated)
            scores.append(c.score)
    ids, attention, starts, response = pad_rollouts(rows_prompt, rows_completion, tokenizer.pad_token_id)
    reward_t = torch.tensor(rewards)
    truncated_t = torch.tensor(truncated, dtype=torch.bool)
    batch = RolloutBatch(
        input_ids=ids, attention_mask=attention, response_start=starts, response_mask=response,
        rewards=reward_t, valid=~(truncated_t & (reward_t == 0)),
        advantages=group_advantages(reward_t, options.group_size), rollout_scores=torch.tensor(scores),
    )
    info = {"truncated": float(truncated_t.sum()), "response_tokens": float(response.sum())}
    return batch, info


def logit_temperature(options: GRPOOptions) -> float:
    """The temperature the rollouts were sampled at, so that the PPO ratio, KL and entropy are those of
    the sampling distribution (on-policy, as verl does); greedy rollouts (0) use the raw logits."""
    return options.temperature if options.temperature > 0 else 1.0


@torch.no_grad()
def reference_log_probs(reference, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Token log-probs (B, T-1) of the rollouts under the frozen reference policy at `temperature`."""
    logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return token_log_probs(logits[:, :-1] / temperature, batch.input_ids[:, 1:])


# ----------------------------------------------------------------------------- the joint update

def joint_update(dp, rm, tokenizer, optimizer, batch: RolloutBatch, ref_logp: torch.Tensor,
                 old_logp: torch.Tensor | None, options: GRPOOptions, process_group,
                 pseudo_label_filter: bool = True) -> tuple[torch.Tensor, dict]:
    """One forward (policy + step logits), total = L_SPR + policy loss, one backward, clip, step.

    Returns (the log-probs of this forward, detached - the old log-probs for later updates, stats).
    """
    rm.eval()
    rm.head.train()  # dropout in the head only (spec); the policy stays deterministic
    out = dp(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits[:, :-1] / logit_temperature(options)  # (B, T-1, V): position t predicts token t + 1
    logp = token_log_probs(logits, batch.input_ids[:, 1:])
    if old_logp is None:
        old_logp = logp.detach()
    mask = batch.response_mask
    surrogate, clipped = clipped_policy_loss(logp, old_logp, batch.advantages[:, None], options.clip_ratio)
    kl = k3_kl(logp, ref_logp)
    entropy = entropy_from_logits(logits)
    policy_loss = masked_mean(surrogate + options.kl_coef * kl - options.entropy_coef * entropy, mask)

    steps = rm.step_mask(tokenizer, batch.input_ids, response_start=batch.response_start,
                         attention_mask=batch.attention_mask)
    from ..reflect import spr_loss

    spr, spr_stats = spr_loss(out.step_logits, steps, batch.rewards, batch.valid, process_group,
                              pseudo_label_filter=pseudo_label_filter, min_class_share=options.spr_min_class_share)
    loss = spr + policy_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = clip_each_group(optimizer)
    optimizer.step()
    with torch.no_grad():
        stats = {
            "spr_loss": float(spr),
            "policy_loss": float(policy_loss),
            "pg_loss": float(masked_mean(surrogate, mask)),
            "kl": float(masked_mean(kl, mask)),
            "entropy": float(masked_mean(entropy, mask)),
            "clip_frac": float(masked_mean(clipped.float(), mask)),
            "grad_norm": norms.get("policy", 0.0),
            "head_grad_norm": norms.get("head", 0.0),
            "spr_trained_steps": spr_stats["trained_steps"],
            "spr_steps": spr_stats["steps"],
        }
    return old_logp, stats


# ----------------------------------------------------------------------------- metrics across ranks

def _sum_over_ranks(values: list[float]) -> list[float]:
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # None: JSON null where a mean has nothing to average


def step_metrics(batch: RolloutBatch, info: dict, update_stats: list[dict], group_size: int) -> dict:
    """This step's metrics, summed or averaged over all ranks (every rank must call it)."""
    correct = batch.rewards == 1
    wins, pairs = pairwise_ranking_accuracy(batch.rollout_scores, correct, group_size)
    n_groups = batch.rewards.numel() // group_size
    groups = batch.rewards.view(n_groups, group_size)
    mixed = float(((groups.min(dim=1).values == 0) & (groups.max(dim=1).values == 1)).sum())
    last = update_stats[-1]
    mean_keys = ["spr_loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "head_grad_norm"]
    local = [
        float(batch.rewards.sum()), float(batch.rewards.numel()),
        float(batch.rollout_scores[correct].sum()), float(correct.sum()),
        float(batch.rollout_scores[~correct].sum()), float((~correct).sum()),
        wins, float(pairs), mixed, float(n_groups), info["truncated"], info["response_tokens"],
        last["spr_trained_steps"], last["spr_steps"],
        *[sum(s[k] for s in update_stats) / len(update_stats) for k in mean_keys],
    ]
    g = _sum_over_ranks(local)
    n_ranks = world_size()
    score_correct, score_wrong = _ratio(g[2], g[3]), _ratio(g[4], g[5])
    metrics = {
        "reward_mean": g[0] / g[1],
        "score_correct": score_correct,
        "score_wrong": score_wrong,
        "score_gap": None if score_correct is None or score_wrong is None else score_correct - score_wrong,
        "score_pair_acc": _ratio(g[6], g[7]),
        "mixed_groups": g[8] / g[9],
        "truncated_frac": g[10] / g[1],
        "response_len": g[11] / g[1],
        "spr_trained_frac": _ratio(g[12], g[13]),
    }
    for i, key in enumerate(mean_keys):
        metrics[key] = g[14 + i] / n_ranks
    return metrics


# ----------------------------------------------------------------------------- evaluation (rank 0)

@torch.no_grad()
def evaluate(rm, tokenizer, examples: list[Example], options: GRPOOptions) -> dict:
    """Greedy pass@1, and `eval_samples` sampled answers per question scored by the SPRM: their mean
    accuracy, the accuracy of the SPRM's pick (best-of-k), and the score separation."""
    is_right = outcome_grader(rm, options.task)
    start = time.perf_counter()
    _, greedy = sample_graded(rm, tokenizer, examples, is_right, k=1, temperature=0.0, top_p=1.0,
                              max_new_tokens=options.max_new_tokens, score=False)
    pass_at_1 = sum(greedy[:, 0].tolist()) / len(examples)
    k = options.eval_samples
    groups, correct = sample_graded(rm, tokenizer, examples, is_right, k=k, temperature=options.eval_temperature,
                                    top_p=options.eval_top_p, max_new_tokens=options.max_new_tokens,
                                    seed=options.seed + 12345)
    scores = torch.tensor([[c.score for c in g] for g in groups])
    best = scores.argmax(dim=1)
    wins, pairs = pairwise_ranking_accuracy(scores.flatten(), correct.flatten(), k)
    return {
        "questions": len(examples),
        "pass@1": pass_at_1,
        "sample_accuracy": float(correct.float().mean()),
        f"sprm_best_of_{k}": float(correct[torch.arange(len(examples)), best].float().mean()),
        f"oracle_of_{k}": float(correct.any(dim=1).float().mean()),
        "score_correct": float(scores[correct].mean()) if correct.any() else None,
        "score_wrong": float(scores[~correct].mean()) if (~correct).any() else None,
        "score_pair_acc": _ratio(wins, pairs),
        "time_s": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- the stage

def run_grpo(options: GRPOOptions) -> dict | None:
    """One rank's joint GRPO + SPR run (call through `train.launch.launch`). Rank 0 returns the summary."""
    from ..relax import DataParallel

    torch.manual_seed(options.seed)  # the fresh head starts alike on every rank (DataParallel also broadcasts)
    train, evaluation = load_data(options)
    rm, tokenizer = load_model(options)
    evaluation = evaluation[: options.eval_questions]
    loop = TrainingLoop(options.out, checkpoint.jsonable(asdict(options)), resume=options.resume,
                        total_steps=options.steps, save_every=options.save_every,
                        keep_checkpoints=options.keep_checkpoints)
    summary: dict = {} if loop.resumed is None else loop.resumed[2]["summary"]
    if options.eval_before and evaluation and is_main_process() and loop.resumed is None:
        summary["eval_before"] = evaluate(rm, tokenizer, evaluation, options)
        logger.info("before GRPO: %s", _format_eval(summary["eval_before"]))
    reference = copy.deepcopy(rm.policy).eval().requires_grad_(False)  # before the wrapper hooks the policy
    optimizer = build_optimizer(rm, options)
    dp = DataParallel(rm, optimizer, algorithm=options.algorithm)
    local = train[rank()::world_size()][: len(train) // world_size()]  # same number of prompts per rank
    if is_main_process():
        logger.info("GRPO: %d prompts on %d rank(s), %d steps of %d x %d prompts x %d rollouts, head %s, "
                    "algorithm %s", len(train), world_size(), options.steps, world_size(), options.prompts_per_step,
                    options.group_size, "trained" if rm.head_is_trained else "fresh", options.algorithm)
    stage = GRPOStage(options, rm, tokenizer, dp, optimizer, reference, local, summary)
    result = loop.run(stage, dp, optimizer)
    history, train_time = result.history, result.train_time_s
    refit_stats = refit_head(rm, tokenizer, train, options) if options.refit_head else None
    if not is_main_process():
        return None  # rank 0 evaluates and saves alone: no collective after this point

    summary.update({"steps": options.steps, "train_time_s": train_time, "world_size": world_size(),
                    "head": "trained" if rm.head_is_trained else "fresh", "head_refit": refit_stats,
                    "first": _window(history, first=True), "last": _window(history, first=False)})
    if evaluation:
        rm.eval()
        summary["eval"] = evaluate(rm, tokenizer, evaluation, options)
        logger.info("after GRPO: %s", _format_eval(summary["eval"]))
    rm.head_is_trained = True
    refitted = refit_stats is not None and "skipped" not in refit_stats
    rm.head_provenance = {"origin": "grpo+refit" if refitted else "grpo", "task": options.task,
                          "fit": {k: v for k, v in refit_stats.items() if k != "val_history"} if refitted else None}

    def write_extra(stage_dir: Path) -> None:
        with open(stage_dir / METRICS_FILE, "w", encoding="utf-8") as f:
            for record in history:
                f.write(json.dumps(record) + "\n")
        source = Path(options.model) / "data"
        if source.is_dir():
            shutil.copytree(source, stage_dir / "data")
        checkpoint.carry_checkpoints(options.out, stage_dir)

    state = {"stage": "grpo", "options": asdict(options), **summary}
    checkpoint.save_stage(options.out, rm, tokenizer, state=state, write_extra=write_extra)
    return summary


class GRPOStage:
    """The GRPO + SPR step for `loop.TrainingLoop`: rollouts, then `updates_per_batch` joint updates against
    the frozen starting policy (the KL reference, saved in checkpoints); a record every step."""

    name = "grpo"

    def __init__(self, options: GRPOOptions, rm, tokenizer, dp, optimizer, reference, prompts: list[Example],
                 summary: dict):
        self.options, self.rm, self.tokenizer, self.dp, self.optimizer = options, rm, tokenizer, dp, optimizer
        self.reference = reference  # the frozen starting policy: the KL term's reference
        self.summary = summary  # what the run measured before training (eval_before), carried by checkpoints
        self.process_group = dist.group.WORLD if world_size() > 1 else None
        self.prompts = prompt_batches(prompts, options.prompts_per_step, options.seed, rank())
        self.time_before = 0.0  # training time before a resume (records' elapsed_s counts it)
        self.start = time.perf_counter()

    def skip(self, steps: int) -> None:
        for _ in range(steps):
            next(self.prompts)
        self.start = time.perf_counter() - self.time_before

    def step(self, step: int) -> dict:
        options = self.options
        step_start = time.perf_counter()
        seed = options.seed * 1_000_003 + step * world_size() + rank()
        batch, info = collect_rollouts(self.rm, self.tokenizer, next(self.prompts), options, seed)
        rollout_time = time.perf_counter() - step_start
        ref_logp = reference_log_probs(self.reference, batch, logit_temperature(options))
        old_logp, update_stats = None, []
        for _ in range(options.updates_per_batch):
            old_logp, stats = joint_update(self.dp, self.rm, self.tokenizer, self.optimizer, batch, ref_logp,
                                           old_logp, options, self.process_group,
                                           step >= options.spr_filter_warmup_steps)
            update_stats.append(stats)
        metrics = step_metrics(batch, info, update_stats, options.group_size)
        metrics = {"step": step + 1, **metrics, "rollout_time_s": rollout_time,
                   "step_time_s": time.perf_counter() - step_start, "elapsed_s": time.perf_counter() - self.start}
        if is_main_process() and ((step + 1) % options.log_every == 0 or step + 1 == options.steps):
            logger.info("step %d/%d reward %.3f spr %.4f score correct %s wrong %s pair-acc %s kl %.4f "
                        "entropy %.3f clip %.3f %.2f s/step", step + 1, options.steps, metrics["reward_mean"],
                        metrics["spr_loss"], _fmt(metrics["score_correct"]), _fmt(metrics["score_wrong"]),
                        _fmt(metrics["score_pair_acc"]), metrics["kl"], metrics["entropy"], metrics["clip_frac"],
                        metrics["step_time_s"])
        return metrics

    def postfix(self, record: dict) -> dict[str, str]:
        return {"reward": f"{record['reward_mean']:.2f}", "gap": _fmt(record["score_gap"])}

    def checkpoint_state(self) -> tuple[dict, dict]:
        return {}, {"reference": self.reference.state_dict(), "summary": self.summary}

    def load_checkpoint_state(self, mine: dict, shared: dict) -> None:
        self.reference.load_state_dict(shared["reference"])
        self.time_before = shared["train_time_s"]


def refit_head(rm, tokenizer, train: list[Example], options: GRPOOptions) -> dict | None:
    """Every rank samples its share of the first `refit.questions` training questions; rank 0 fits a fresh
    head on all of them (`reflect.head_fit`) and puts it on `rm`. Returns the fit's stats on rank 0."""
    from ..reflect.head_fit import collect_rollouts, fit_head

    fit = options.refit
    start = time.perf_counter()
    ids = list(range(min(fit.questions, len(train))))[rank()::world_size()]
    rollouts = collect_rollouts(rm, tokenizer, [train[i] for i in ids], fit, outcome_grader(rm, options.task),
                                question_ids=ids, progress=is_main_process())
    sample_time = time.perf_counter() - start
    if world_size() > 1:
        parts = [None] * world_size() if is_main_process() else None
        dist.gather_object(rollouts, parts, dst=0)
        if not is_main_process():
            return None
        rollouts = [r for part in parts for r in part]
    try:
        head, stats = fit_head(rollouts, rm.head.hidden_size, fit)
    except ValueError as error:
        logger.warning("%s; keeping the head trained jointly with GRPO", error)
        return {"skipped": str(error), "rollouts": len(rollouts)}
    rm.head = head
    rm.config.head_inputs, rm.config.score_aggregation = head.inputs, stats["aggregation"]
    stats.update({"rollouts": len(rollouts), "sample_time_s": sample_time, "time_s": time.perf_counter() - start})
    return stats


def _window(history: list[dict], first: bool) -> dict:
    """Means over the first or last 10% of steps (at least one) of the headline metrics."""
    n = max(1, len(history) // 10)
    rows = history[:n] if first else history[-n:]
    out = {"steps": f"{rows[0]['step']}-{rows[-1]['step']}"}
    for key in ("reward_mean", "score_correct", "score_wrong", "score_gap", "score_pair_acc", "spr_loss", "kl"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _format_eval(ev: dict) -> str:
    return ", ".join(f"{k} {_fmt(v) if isinstance(v, float) or v is None else v}" for k, v in ev.items())

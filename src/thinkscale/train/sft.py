"""Supervised fine-tuning on worked solutions, data-parallel with `thinkscale.relax`.

    result = launch(run_sft, args=(SFTOptions(out="runs/sft"),), nproc=2)

Every rank builds the same data, tokenizer and initial policy from the options (all deterministic
for a seed; the tokenizer is checked to agree across ranks), trains on its own shard of the
examples, and rank 0 evaluates pass@1 on a few test questions and writes the output directory:

    out/  config.json, model.safetensors, tokenizer files  (AutoModelForCausalLM/AutoTokenizer load it)
          reflect_config.json   prompt template, step delimiter, think tags (ReflectiveModel reads it)
          stage_state.json      options, steps, loss, tokens/s, time, pass@1
          data/{train,test,hard}.jsonl  the task's splits (when the data was generated)
          done                  marker: a rerun skips this stage

The loss is the mean cross-entropy over completion tokens only (the prompt is context, not target).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..tasks import completion_from_solution, format_prompt, reflect_config
from ..tasks.arithmetic import ArithmeticConfig
from ..tasks.jsonl import Example, example_from_record, read_examples, write_jsonl
from ..tasks.policy import PolicyConfig, build_policy, count_parameters
from ..tasks.registry import check_solutions, get_task
from ..reflect.model import ReflectConfig
from ..relax import DataParallel
from ..tasks.tokenizer import train_tokenizer
from . import checkpoint
from .evaluation import outcome_grader, sample_graded
from .loop import TrainingLoop
from .optim import make_optimizer
from .launch import is_main_process, rank, world_size

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the HF loss skips


@dataclass
class SFTOptions:
    """Everything one SFT run needs (picklable: it travels to spawned workers).

    Data: `data` (JSONL with solutions) or, when None, the splits of `task_name` (a task of
    `tasks.registry` with its demo config; None or "arithmetic": the arithmetic task with the config
    `task`), `num_train`, `num_test`, `num_hard` problems. `task_name` also grades the pass@1 check
    (None: math equivalence with the answer). Model: `model` (a local HF model directory; any
    tokenizer works, one that writes the think tags and delimiter as single tokens suits the SPRM
    best) or, when None, a fresh `policy` with a tokenizer trained on the training text.
    With a decentralized relax algorithm the replicas differ slightly; rank 0's is the one saved. Length: `steps` optimizer steps, or `epochs` passes over
    each rank's shard when `steps` is None. `batch_size` is per rank.
    Checkpoints: every `save_every` steps (None: never) and after the last step, into out/checkpoints/,
    the newest `keep_checkpoints` kept; `resume` continues from the newest (a restarted worker always does).
    """

    out: str
    data: str | None = None
    eval_data: str | None = None
    model: str | None = None
    task: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    num_train: int = 20000
    num_test: int = 500
    num_hard: int = 200
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: str = "gradient_allreduce"
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int = 160
    seed: int = 0
    log_every: int = 25
    eval_questions: int = 100
    eval_temperature: float = 0.0
    eval_max_new_tokens: int | None = None  # None: max_len (no training example is longer)
    task_name: str | None = None  # a task (tasks.registry) for the data when data is None, and for pass@1
    save_every: int | None = 100
    keep_checkpoints: int = 2
    resume: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None to use epochs), got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_questions < 0 or self.eval_temperature < 0:
            raise ValueError("warmup_steps, eval_questions and eval_temperature must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"save_every must be >= 1 (or None: no checkpoints), got {self.save_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


# ----------------------------------------------------------------------------- pure pieces

def encode_example(tokenizer, question: str, completion: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example: prompt then completion + EOS; prompt labels ignored.

    Prompt and completion are encoded separately so the prompt tokens are exactly what the policy
    is given at inference time.
    """
    prompt_ids = tokenizer.encode(format_prompt(question), add_special_tokens=False)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def encode_examples(tokenizer, examples: list[Example], max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """`encode_example` of each example's question and worked solution (what SFT trains on); with
    `max_tokens`, each cut to that many tokens."""
    encoded = [encode_example(tokenizer, e.question, completion_from_solution(e.solution, e.answer)) for e in examples]
    return encoded if max_tokens is None else [(ids[:max_tokens], labels[:max_tokens]) for ids, labels in encoded]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/labels/attention_mask of shape (B, T_max)."""
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s share: every world_size-th item, all shards cut to the same length so every
    rank runs the same number of steps (collectives must match)."""
    per_rank = len(items) // world_size
    return items[rank::world_size][:per_rank]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps` (step counts from 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batches(examples: list, batch_size: int, seed: int, rank: int):
    """Endless batches over `examples`, reshuffled every epoch (different order on every rank). Fewer
    examples than `batch_size` make no batch: ValueError at the first one, not an endless loop."""
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} training examples on this rank, fewer than the batch size {batch_size}")
    generator = torch.Generator().manual_seed(seed * 100_003 + rank)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


# ----------------------------------------------------------------------------- data and model

def load_data(options: SFTOptions) -> tuple[list[Example], list[Example], dict[str, list[Example]]]:
    """(training examples with solutions, evaluation examples, splits to save with the model)."""
    if options.data is None:
        task, config, hard_config = _generating_task(options)
        splits = task.make_splits(config, options.seed, options.num_train, options.num_test, options.num_hard,
                                  hard_config=hard_config)
        as_examples = {name: [example_from_record(p.to_record()) for p in problems] for name, problems in splits.items()}
        # the worked solution is the SFT target: a task without one says so here, in one line
        as_examples["train"] = [replace(e, solution=p.completion) for e, p in zip(as_examples["train"], splits["train"])]
        return as_examples["train"], as_examples["test"], as_examples
    train = read_examples(options.data)
    missing = [i for i, e in enumerate(train) if e.solution is None]
    if missing:
        raise ValueError(
            f"{options.data}: SFT needs a 'solution' for every example; {len(missing)} lack one "
            f"(first: example {missing[0] + 1})"
        )
    evaluation = read_examples(options.eval_data) if options.eval_data is not None else []
    if options.task_name is not None:
        get_task(options.task_name).check(evaluation, str(options.eval_data))
    return train, evaluation, {}


def _generating_task(options: SFTOptions):
    """(task, config, hard config) that generate the data when `options.data` is None."""
    task = get_task(options.task_name or "arithmetic")
    if task.name == "arithmetic":
        return task, options.task, options.task.harder()
    return task, task.demo_config, task.demo_hard_config


def check_generated_data(options: SFTOptions) -> None:
    """Fail now, in one line, when the task that would generate the data cannot (an unknown task, no
    worked solutions): one training problem is drawn."""
    task, config, _ = _generating_task(options)
    check_solutions(task, config)


def load_model_and_tokenizer(options: SFTOptions, train: list[Example]):
    if options.model is not None:
        from ..reflect.loading import check_model_arg, load_policy, load_tokenizer

        source = check_model_arg(options.model)  # a folder or "smollm2" (a fitted-head folder: its policy)
        tokenizer = load_tokenizer(source)
        model = load_policy(source)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {options.model} has no EOS token; SFT appends EOS to every target")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention anyway
        return model, tokenizer
    texts = (format_prompt(e.question) + completion_from_solution(e.solution, e.answer) for e in train)
    tokenizer = train_tokenizer(texts)
    model = build_policy(options.policy, tokenizer, seed=options.seed)
    return model, tokenizer


def check_same_tokenizer_everywhere(tokenizer) -> None:
    """Each rank trained its own tokenizer; training must not proceed if they differ."""
    if world_size() == 1:
        return
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = int.from_bytes(hashlib.sha256(vocab.encode()).digest()[:7], "big")
    mine = torch.tensor([digest], dtype=torch.long)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError("ranks built different tokenizers from the same data; pass --model with a saved one")


# ----------------------------------------------------------------------------- evaluation

def evaluate_pass_at_1(model, tokenizer, examples: list[Example], temperature: float, max_new_tokens: int,
                       seed: int, task_name: str | None = None) -> dict:
    """pass@1 in the task format with reflect's sampler and math grading (or a task's grader): one sample
    per question (greedy at temperature 0)."""
    from ..reflect import ReflectiveModel

    reflective = ReflectiveModel(model, config=ReflectConfig(**reflect_config()))
    candidates, correct = sample_graded(reflective, tokenizer, examples, outcome_grader(reflective, task_name), k=1,
                                        temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed,
                                        score=False)
    right = correct[:, 0].tolist()
    return {
        "pass@1": sum(right) / len(right),
        "questions": len(right),
        "finished": sum(c[0].finished for c in candidates) / len(right),
        "temperature": temperature,
        "samples": [{"question": e.question, "answer": e.answer, "completion": c[0].text, "correct": ok}
                    for e, c, ok in list(zip(examples, candidates, right))[:5]],
    }


def training_device() -> torch.device:
    """This rank's GPU when CUDA is available (LOCAL_RANK picks it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run_sft(options: SFTOptions) -> dict | None:
    """One rank's SFT run (call through `train.launch.launch`). Rank 0 returns the summary."""
    torch.manual_seed(options.seed)
    train, evaluation, splits = load_data(options)
    model, tokenizer = load_model_and_tokenizer(options, train)
    device = training_device()
    model.to(device)
    check_same_tokenizer_everywhere(tokenizer)
    encoded = [(ids, labels) for ids, labels in encode_examples(tokenizer, train) if len(ids) <= options.max_len]
    if len(encoded) < len(train):
        logger.warning("dropped %d of %d examples longer than max_len=%d tokens",
                       len(train) - len(encoded), len(train), options.max_len)
    local = shard(encoded, rank(), world_size())
    if len(local) < options.batch_size:
        raise ValueError(f"each rank has {len(local)} examples, fewer than batch_size={options.batch_size}; "
                         "use more data, fewer processes or a smaller batch")
    steps_per_epoch = len(local) // options.batch_size
    total_steps = options.steps if options.steps is not None else max(1, round(options.epochs * steps_per_epoch))

    model.train()
    optimizer = make_optimizer(model.parameters(), options.algorithm, options.lr, options.weight_decay,
                               total_steps, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, options.warmup_steps, total_steps, options.min_lr_ratio))
    dp = DataParallel(model, optimizer, algorithm=options.algorithm)
    if is_main_process():
        logger.info("SFT: %d parameters, %d examples on %d rank(s), %d steps of %d x %d, algorithm %s",
                    count_parameters(model), len(encoded), world_size(), total_steps, world_size(),
                    options.batch_size, options.algorithm)
    loop = TrainingLoop(options.out, checkpoint.jsonable(asdict(options)), resume=options.resume,
                        total_steps=total_steps, save_every=options.save_every,
                        keep_checkpoints=options.keep_checkpoints)
    stage = SFTStage(options, dp, optimizer, scheduler, local, tokenizer.pad_token_id, total_steps, device)
    result = loop.run(stage, dp, optimizer)
    history, train_time = result.history, result.train_time_s
    total_tokens = _reduce_mean([stage.total_tokens])[0] * world_size()
    if not is_main_process():
        return None  # rank 0 evaluates and saves alone: no collective after this point

    summary = {
        "steps": total_steps,
        "examples_seen": total_steps * options.batch_size * world_size(),
        "final_loss": history[-1]["loss"],
        "train_time_s": train_time,
        "tokens_per_s": total_tokens / train_time,
        "parameters": count_parameters(model),
        "world_size": world_size(),
        "history": history,
    }
    model.eval()
    if evaluation and options.eval_questions > 0:
        eval_start = time.perf_counter()
        max_new_tokens = options.max_len if options.eval_max_new_tokens is None else options.eval_max_new_tokens
        summary["eval"] = evaluate_pass_at_1(model, tokenizer, evaluation[: options.eval_questions],
                                             options.eval_temperature, max_new_tokens, options.seed,
                                             options.task_name)
        summary["eval"]["time_s"] = time.perf_counter() - eval_start
        logger.info("pass@1 on %d test questions: %.3f (%.1f s)", summary["eval"]["questions"],
                    summary["eval"]["pass@1"], summary["eval"]["time_s"])

    def write_extra(stage_dir: Path) -> None:
        format_ = reflect_config()  # the task format's prompt template, step delimiter and think tags
        ReflectConfig(**format_).save(stage_dir, fields=tuple(format_))
        for name, examples in splits.items():
            write_jsonl(stage_dir / "data" / f"{name}.jsonl", (e.to_record() for e in examples))
        checkpoint.carry_checkpoints(options.out, stage_dir)

    state = {"stage": "sft", "options": checkpoint.jsonable(asdict(options)), **summary}
    checkpoint.save_stage(options.out, model, tokenizer, state=state, write_extra=write_extra)
    return summary


class SFTStage:
    """The SFT step for `loop.TrainingLoop`: one batch, clip, step; a record every `log_every` steps with
    the mean loss and tokens/s of the window since the last one."""

    name = "sft"

    def __init__(self, options: SFTOptions, dp, optimizer, scheduler, examples: list, pad_id: int,
                 total_steps: int, device: torch.device):
        self.options, self.dp, self.optimizer, self.scheduler = options, dp, optimizer, scheduler
        self.pad_id, self.total_steps, self.device = pad_id, total_steps, device
        self.data = batches(examples, options.batch_size, options.seed, rank())
        self.window_loss, self.window_tokens, self.total_tokens = 0.0, 0, 0
        self.window_start = time.perf_counter()

    def skip(self, steps: int) -> None:
        for _ in range(steps):
            next(self.data)
        self.window_start = time.perf_counter()

    def step(self, step: int) -> dict | None:
        options = self.options
        batch = {k: v.to(self.device) for k, v in collate(next(self.data), self.pad_id).items()}
        loss = self.dp(**batch).loss
        loss.backward()
        if options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dp.module.parameters(), options.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(batch["attention_mask"].sum())
        self.window_loss += loss.item()
        self.window_tokens += tokens
        self.total_tokens += tokens
        if (step + 1) % options.log_every != 0 and step + 1 != self.total_steps:
            return None
        stats = _reduce_mean([self.window_loss / ((step % options.log_every) + 1), self.window_tokens])
        elapsed = time.perf_counter() - self.window_start
        record = {"step": step + 1, "loss": stats[0], "tokens_per_s": stats[1] * world_size() / elapsed,
                  "lr": self.scheduler.get_last_lr()[0]}
        if is_main_process():
            logger.info("step %d/%d loss %.4f tokens/s %.0f lr %.2e", step + 1, self.total_steps, record["loss"],
                        record["tokens_per_s"], record["lr"])
        self.window_loss, self.window_tokens, self.window_start = 0.0, 0, time.perf_counter()
        return record

    def postfix(self, record: dict) -> dict[str, str]:
        return {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}

    def checkpoint_state(self) -> tuple[dict, dict]:
        return ({"scheduler": self.scheduler.state_dict(), "window_loss": self.window_loss,
                 "window_tokens": self.window_tokens, "total_tokens": self.total_tokens}, {})

    def load_checkpoint_state(self, mine: dict, shared: dict) -> None:
        self.scheduler.load_state_dict(mine["scheduler"])
        self.window_loss, self.window_tokens = mine["window_loss"], mine["window_tokens"]
        self.total_tokens = mine["total_tokens"]


def _reduce_mean(values: list[float]) -> list[float]:
    """Mean over ranks of each value (identity without a process group)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


"""The demo pipeline: a task, trained with relax and scaled at test time with reflect.

    report = run_demo(DemoConfig())                    # what `thinkscale demo` runs
    report = run_demo(DemoConfig.quick_profile())      # same stages, tiny sizes (CI smoke test)

Stages (each skipped when its folder under `out` is already finished):
    data   the task's train/test/hard splits as JSONL (data/{train,test,hard}.jsonl); `task` names a
           task (tasks.registry: arithmetic, countdown, gym:NAME[:key=value,...])
    sft    supervised fine-tuning on worked solutions, `nproc` workers with a relax algorithm (sft/);
           like grpo, it checkpoints as it goes and a rerun continues from the last checkpoint
    grpo   joint GRPO + SPR training of the policy and its SPRM head, `nproc` workers, then the head
           refitted on rollouts of the final policy (reflect.head_fit; `head_refit` None turns it off) (grpo/)
    eval   k = 1..32 samples per question on test and hard with the GRPO model, plus pass@1 of the SFT
           model on the same questions (eval/<model>-<split>/), questions shared among `nproc` workers
then the combined report (report.json, report.md, PNG plots) is written from the stage outputs.

The budgets of the default profile aim at under 15 minutes on a 2-core CPU machine (measured on an
idle one, 2026-12-01: 9 min; SFT 150 s, GRPO 295 s of which the head refit 82 s, eval 86 s). Every size the stages use is a field below, so the budget is readable in
one place; fields left None use the stage's own default (`SFTOptions`, `GRPOOptions`).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..reflect.engine import SAMPLING
from ..reflect.evaluate import EvalConfig
from ..reflect.head_fit import HeadFitOptions
from ..tasks import THINK_END
from ..tasks.jsonl import write_jsonl
from ..tasks.registry import get_task
from ..tasks.policy import PolicyConfig
from ..train import checkpoint
from ..train.launch import launch, rank
from .evaluation import EvalJob, evaluate_shards, merge_shards
from .stages import Stage, StageResult, mark_done, remove_outputs, run_stages

logger = logging.getLogger(__name__)

SPLITS = ("test", "hard")
STAGE_NAMES = ("data", "sft", "grpo", "eval")
RECORD_FILE = "pipeline.json"
LOG_DIR = "logs"
REPORT_FILES = ("report.json", "report.md", "training_curves.png", "sprm_separation.png",
                "accuracy_vs_k_test.png", "accuracy_vs_k_hard.png")
EVAL_KS = (1, 2, 4, 8, 16, 32)


@dataclass
class DemoConfig:
    """Everything `thinkscale demo` decides. The defaults are the full demo (~15 min on 2 cores)."""

    out: str = "runs/demo"
    nproc: int = 2
    algorithm: str = "gradient_allreduce"
    seed: int = 0
    profile: str = "default"  # "default" or "quick"; recorded in the report
    # data: a task by name (tasks.registry), with its demo sizes unless configs are given.
    # arithmetic: 2-4 additions/subtractions of one-digit operands, sized so a ~1M-parameter policy learns
    # it in ~2 minutes on 2 cores and is right often but not always (test-time scaling needs diversity);
    # hard: 5-6 operations, longer than anything in training (length generalization).
    # countdown: reach a target with 3 numbers (hard: 4); many right answers, so votes are weak.
    task: str = "arithmetic"
    task_config: object | None = None  # None: the task's demo_config
    hard_task_config: object | None = None  # None: the task's demo_hard_config
    num_train: int | None = None  # None: the task's demo size (arithmetic 20000, countdown 8000, gym 2000)
    num_test: int = 200  # test questions evaluated with 32 samples each
    num_hard: int = 100
    # sft (~4-5 min): None = SFTOptions' default
    policy: PolicyConfig | None = field(default_factory=lambda: PolicyConfig(
        hidden_size=128, num_layers=4, num_heads=4))
    sft_steps: int | None = 450
    sft_lr: float | None = 3e-3
    sft_batch_size: int | None = None
    sft_eval_questions: int | None = None
    # grpo (~4 min): None = GRPOOptions' default
    grpo_steps: int | None = 150
    grpo_prompts_per_step: int | None = None
    grpo_group_size: int | None = None
    grpo_max_new_tokens: int | None = None
    # The spec's pseudo-label filter made the fresh head collapse in our runs (sprm@32 63.5% vs 70.0%
    # without it, both below pass@1): train the head on every scored step for all GRPO steps.
    grpo_spr_filter_warmup_steps: int | None = 150
    grpo_eval_questions: int = 0  # GRPO's own end-of-stage check; the eval stage measures more, so off
    # the head refit after GRPO (reflect.head_fit; ~1.5 min): the jointly trained head ranks at chance
    head_refit: HeadFitOptions | None = field(default_factory=HeadFitOptions)
    # eval (~4 min): sampling as in the MetaStone-S1 release (temperature 0.6, top-p 0.95)
    ks: tuple[int, ...] = EVAL_KS
    temperature: float = SAMPLING.temperature
    top_p: float = SAMPLING.top_p
    max_new_tokens: int = 128  # enough for the hard split's 5-6 steps; longer answers count as wrong
    eval_batch_size: int | None = 160  # rows decoded together: 5 questions x 32 samples (~20% faster than 32)
    sft_eval_samples: int = 8  # samples per question for the SFT model's pass@1 (same questions, same sampling)

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        get_task(self.task)  # an unknown name lists the valid ones
        if self.profile not in ("default", "quick"):
            raise ValueError(f"profile must be 'default' or 'quick', got {self.profile!r}")
        if self.num_train is None:
            self.num_train = get_task(self.task).demo_num_train
        for name in ("num_train", "num_test", "num_hard", "sft_eval_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.ks = tuple(sorted(set(self.ks)))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {self.ks}")

    @classmethod
    def quick_profile(cls, **overrides) -> "DemoConfig":
        """The same stages with tiny sizes: a couple of minutes, for smoke tests (accuracy is not the point)."""
        quick = dict(
            profile="quick", num_train=2000, num_test=8, num_hard=6,
            policy=PolicyConfig(hidden_size=64, num_layers=2, num_heads=4),
            sft_steps=60, sft_batch_size=32, sft_eval_questions=8,
            grpo_steps=3, grpo_prompts_per_step=4, grpo_group_size=4, grpo_max_new_tokens=48,
            max_new_tokens=48, sft_eval_samples=2,
            head_refit=HeadFitOptions(questions=32, samples=4, epochs=3, max_new_tokens=48),
        )
        quick.update(overrides)
        return cls(**quick)

    @property
    def task_configs(self) -> tuple[object, object]:
        """(config, hard config) of the task's data."""
        task = get_task(self.task)
        return (task.demo_config if self.task_config is None else self.task_config,
                task.demo_hard_config if self.hard_task_config is None else self.hard_task_config)

    # -- where things go ------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.out)

    def data_file(self, split: str) -> Path:
        return self.root / "data" / f"{split}.jsonl"

    def eval_dir(self, model: str, split: str) -> Path:
        return self.root / "eval" / f"{model}-{split}"


# ----------------------------------------------------------------------------- stage options

def sft_options(config: DemoConfig):
    from ..train.sft import SFTOptions

    overrides = {"policy": config.policy, "steps": config.sft_steps, "lr": config.sft_lr,
                 "batch_size": config.sft_batch_size,
                 "eval_questions": config.sft_eval_questions}
    return SFTOptions(out=str(config.root / "sft"), data=str(config.data_file("train")),
                      eval_data=str(config.data_file("test")), algorithm=config.algorithm, seed=config.seed,
                      task_name=config.task, resume=True,
                      **{k: v for k, v in overrides.items() if v is not None})


def grpo_options(config: DemoConfig):
    from ..train.grpo import GRPOOptions

    overrides = {"steps": config.grpo_steps, "prompts_per_step": config.grpo_prompts_per_step,
                 "group_size": config.grpo_group_size, "max_new_tokens": config.grpo_max_new_tokens,
                 "eval_questions": config.grpo_eval_questions,
                 "spr_filter_warmup_steps": config.grpo_spr_filter_warmup_steps}
    refit = {} if config.head_refit is None else {"refit_head": True, "refit": config.head_refit}
    return GRPOOptions(out=str(config.root / "grpo"), model=str(config.root / "sft"),
                       data=str(config.data_file("train")), algorithm=config.algorithm, seed=config.seed,
                       task=config.task, resume=True, **refit,
                       **{k: v for k, v in overrides.items() if v is not None})


def eval_jobs(config: DemoConfig) -> list[EvalJob]:
    """The GRPO model with every k on each split, and the SFT model's pass@1 on the same questions."""
    def eval_config(ks):
        return EvalConfig(ks=ks, temperature=config.temperature, top_p=config.top_p,
                          max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
                          seed=config.seed, think_end=THINK_END, task=config.task)

    jobs = []
    for split in SPLITS:
        jobs.append(EvalJob(f"grpo-{split}", str(config.root / "grpo"), str(config.data_file(split)),
                            str(config.eval_dir("grpo", split)), eval_config(config.ks)))
    for split in SPLITS:
        jobs.append(EvalJob(f"sft-{split}", str(config.root / "sft"), str(config.data_file(split)),
                            str(config.eval_dir("sft", split)), eval_config((1, config.sft_eval_samples))))
    return jobs


# ----------------------------------------------------------------------------- stage bodies

def make_data(config: DemoConfig) -> None:
    task_config, hard_config = config.task_configs
    splits = get_task(config.task).make_splits(task_config, config.seed, config.num_train, config.num_test,
                                               config.num_hard, hard_config=hard_config)

    def write(stage_dir: Path) -> None:
        for name, problems in splits.items():
            write_jsonl(stage_dir / f"{name}.jsonl", (p.to_record() for p in problems))

    state = {"stage": "data", "seed": config.seed, "task_name": config.task,
             "task": checkpoint.jsonable(task_config.__dict__), "hard_task": checkpoint.jsonable(hard_config.__dict__),
             "sizes": {name: len(problems) for name, problems in splits.items()}}
    checkpoint.save_stage(config.root / "data", state=state, write_extra=write)


def run_on_workers(config: DemoConfig, stage: str, fn, *args):
    """`fn(*args)` on `config.nproc` local workers, each logging to logs/<stage>-rank<r>.log."""
    log_dir = config.root / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    level = logging.getLogger().getEffectiveLevel()
    return launch(_logged_worker, args=(fn, args, str(log_dir / stage), level), nproc=config.nproc,
                  timeout_s=1800.0)


def _logged_worker(fn, args: tuple, log_prefix: str, level: int):
    """Worker body: log to a per-rank file (and warnings to the console in a fresh worker), run `fn(*args)`."""
    root = logging.getLogger()
    added = [logging.FileHandler(f"{log_prefix}-rank{rank()}.log", encoding="utf-8")]
    added[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not root.handlers:  # a spawned worker; in-process (nproc 1) the command's console handler exists
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter(f"[rank {rank()}] %(levelname)s %(name)s: %(message)s"))
        added.append(console)
    for handler in added:
        root.addHandler(handler)
    previous_level = root.level
    root.setLevel(level)
    try:
        return fn(*args)
    finally:
        root.setLevel(previous_level)
        for handler in added:
            root.removeHandler(handler)
            handler.close()


def train_sft(config: DemoConfig) -> None:
    from ..train.sft import run_sft

    run_on_workers(config, "sft", run_sft, sft_options(config))


def train_grpo(config: DemoConfig) -> None:
    from ..train.grpo import run_grpo

    run_on_workers(config, "grpo", run_grpo, grpo_options(config))


def run_eval(config: DemoConfig) -> None:
    jobs = eval_jobs(config)
    run_on_workers(config, "eval", evaluate_shards, jobs)
    for job in jobs:
        merge_shards(job, config.nproc)
    mark_done(config.root / "eval", {"jobs": [job.name for job in jobs]})


# ----------------------------------------------------------------------------- the pipeline

def build_stages(config: DemoConfig) -> list[Stage]:
    root = config.root
    return [
        Stage("data", root / "data", lambda: make_data(config), "generate the train/test/hard splits"),
        Stage("sft", root / "sft", lambda: train_sft(config),
              f"supervised fine-tuning, {config.nproc} workers, {config.algorithm}"),
        Stage("grpo", root / "grpo", lambda: train_grpo(config),
              f"GRPO + SPRM head, {config.nproc} workers, {config.algorithm}"),
        Stage("eval", root / "eval", lambda: run_eval(config),
              f"k = {', '.join(map(str, config.ks))} on test and hard, {config.nproc} workers"),
    ]


def clear_outputs(config: DemoConfig) -> list[Path]:
    """What `--fresh` deletes: this pipeline's stage folders, logs, record and report files only."""
    return remove_outputs(config.root, [*STAGE_NAMES, LOG_DIR, RECORD_FILE, *REPORT_FILES])


def _check_same_task(config: DemoConfig) -> None:
    """Finished stages of another task in `out` must not be resumed as this one's."""
    data = config.root / "data"
    if checkpoint.is_done(data):
        recorded = checkpoint.load_state(data).get("task_name", "arithmetic")  # older demos had arithmetic only
        if recorded != config.task:
            raise ValueError(f"{config.root} holds a demo of task {recorded!r}, not {config.task!r}: "
                             "use another --out, or --fresh to delete it")


def run_demo(config: DemoConfig, fresh: bool = False, announce=None) -> tuple[dict, list[StageResult]]:
    """Run (or resume) every stage, then write the combined report; returns (report, stage results)."""
    from .report import build_report, write_report

    if fresh:
        removed = clear_outputs(config)
        if removed:
            logger.info("--fresh: removed %d earlier outputs in %s", len(removed), config.root)
    config.root.mkdir(parents=True, exist_ok=True)
    _check_same_task(config)
    results = run_stages(build_stages(config), record=config.root / RECORD_FILE, announce=announce)
    report = build_report(config, results)
    write_report(report, config.root)
    return report, results


"""`thinkscale demo`: the whole pipeline on a task (arithmetic by default), one command, no arguments needed.

    thinkscale demo                      # data -> SFT -> GRPO -> eval, 2 workers, writes runs/demo/ (~15 min)
    thinkscale demo --quick --out tmp    # the same stages with tiny sizes (~2-3 min)
    thinkscale demo --fresh              # forget finished stages and start over
    thinkscale demo --task gym:gsm_symbolic   # a reasoning-gym dataset (SFT needs its worked solutions)

Rerunning skips the stages that finished; an interrupted SFT or GRPO stage continues from its last
checkpoint, and evaluation resumes per question.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from thinkscale.commands.argtypes import ensure_writable_dir
from thinkscale.commands.stage import add_parallel_arguments

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thinkscale.tasks import registry

    parser.description = (
        "Run the whole pipeline on a task (arithmetic by default): generate the data, fine-tune a small "
        "policy (SFT), train it with GRPO together with its SPRM head, evaluate test-time scaling with "
        "k = 1..32 samples on the test and the harder held-out split, and write checkpoints, logs, "
        "report.md/report.json and plots. Rerunning skips finished stages and continues an interrupted one "
        "from its last checkpoint.")
    parser.add_argument("--task", default="arithmetic", metavar="TASK",
                        help="the task (default: arithmetic): " + registry.help_text())
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder: stage folders, logs/, report.md, report.json, PNG plots "
                             "(default: runs/demo, runs/demo-<task> for other tasks, e.g. runs/demo-gym-chain_sum)")
    parser.add_argument("--quick", action="store_true",
                        help="the same stages with tiny sizes (a couple of minutes): a smoke test, not a result")
    parser.add_argument("--fresh", action="store_true",
                        help="delete this pipeline's earlier outputs in --out and start from scratch "
                             "(default: resume, skipping finished stages)")
    add_parallel_arguments(parser, "gradient_allreduce", nproc=2, what=" for training and evaluation")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for data, initialization, training order and sampling (default: 0)")


def config_from_args(args: argparse.Namespace):
    from thinkscale.pipeline.demo import DemoConfig
    from thinkscale.relax import algorithms
    from thinkscale.tasks.registry import file_name

    algorithms.resolve(args.algorithm)  # an unknown name fails here, listing the valid ones
    out = args.out if args.out is not None else (
        "runs/demo" if args.task == "arithmetic" else f"runs/demo-{file_name(args.task)}")
    common = dict(out=out, nproc=args.nproc, algorithm=args.algorithm, seed=args.seed, task=args.task)
    return DemoConfig.quick_profile(**common) if args.quick else DemoConfig(**common)


def nproc_warning(nproc: int, cpus: int) -> str | None:
    """The warning for more workers than CPUs (legal, but each worker then gets a fraction of a core)."""
    if nproc <= cpus:
        return None
    return (f"--nproc {nproc} is more than the {cpus} CPUs here; workers will share cores "
            "and the demo will run slower")


def run(args: argparse.Namespace) -> int:
    # Weight loading/saving bars of every worker would bury the stages' progress bars; set before
    # transformers is first imported (workers inherit the environment).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from thinkscale.pipeline.demo import LOG_DIR, REPORT_FILES, build_stages, clear_outputs, run_demo
    from thinkscale.pipeline.report import final_table
    from thinkscale.tasks.registry import check_solutions, get_task
    from thinkscale.train.launch import WorkerFailedError

    config = config_from_args(args)
    check_solutions(get_task(config.task), config.task_configs[0])  # SFT's targets, before any stage runs
    ensure_writable_dir(config.root)
    warning = nproc_warning(config.nproc, os.cpu_count() or 1)
    if warning is not None:
        print(f"thinkscale demo: warning: {warning}", file=sys.stderr)
    if args.fresh:
        clear_outputs(config)
    log_file = _log_to_file(config.root / LOG_DIR / "demo.log")
    # torch's launcher narrates every worker start at INFO; the demo's own lines are enough
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)

    total = len(build_stages(config))
    current = {"stage": None}

    def announce(i, stage, skipping):
        current["stage"] = stage.name
        state = "finished earlier, skipped" if skipping else stage.description
        print(f"[{i + 1}/{total}] {stage.name}: {state}", flush=True)

    print(f"thinkscale demo ({config.profile}): writing {config.root}/ (log: {log_file})", flush=True)
    try:
        report, results = run_demo(config, announce=announce)
    except ValueError as error:  # e.g. --out holds another task's demo
        print(f"thinkscale demo: error: {error}", file=sys.stderr)
        return 2
    except WorkerFailedError as error:
        print(f"thinkscale demo: stage {current['stage']} failed: {error.brief}", file=sys.stderr)
        if args.verbose and error.details:
            print(error.details, file=sys.stderr)
        print("finished stages and checkpoints are kept; fix the problem and rerun to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nthinkscale demo: interrupted during stage {current['stage']}; finished stages are kept, "
              "rerun the same command to resume (or add --fresh to start over)", file=sys.stderr)
        return 130
    print()
    print(final_table(report))
    timing = ", ".join(f"{r.name} {r.status} {r.seconds:.0f} s" for r in results)
    print(f"stages: {timing}")
    print(f"wrote {config.root}/: {', '.join(REPORT_FILES)}, checkpoints sft/ and grpo/, logs/")
    return 0


def _log_to_file(path) -> str:
    """Everything the parent process logs also goes to `path` (workers write logs/<stage>-rank<r>.log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return str(path)

"""What `thinkscale sft` and `thinkscale grpo` share: skip a finished output, run the stage on local
workers, and turn a worker failure or Ctrl-C into an exit code with the reason on stderr."""
from __future__ import annotations

import sys
from typing import Callable


def run_training_stage(command: str, stage: str, fn: Callable, options, nproc: int, overwrite: bool,
                       print_summary: Callable[[dict], None], saved_what: str) -> int:
    from thinkscale.train import checkpoint
    from thinkscale.train.launch import WorkerFailedError, launch

    if checkpoint.is_done(options.out) and not overwrite:
        print(f"{options.out} already holds a finished {stage} run (use --overwrite to retrain)")
        print_summary(checkpoint.load_state(options.out))
        return 0
    try:
        summary = launch(fn, args=(options,), nproc=nproc)
    except WorkerFailedError as e:
        print(f"thinkscale {command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"thinkscale {command}: interrupted", file=sys.stderr)
        return 130
    if summary is not None:  # rank 0 (or the only process)
        print_summary(summary)
        print(f"{saved_what} saved to {options.out}")
    return 0

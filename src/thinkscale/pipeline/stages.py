"""A small stage runner: run stages in order, skip the ones already finished, record what happened.

    stages = [Stage("data", out / "data", make_data), Stage("sft", out / "sft", train_sft), ...]
    results = run_stages(stages, record=out / "pipeline.json")

A stage is finished when its directory holds the `done` marker of `train.checkpoint`; a stage writes
its directory atomically (`checkpoint.save_stage`) or marks it done last (`mark_done`), so an
interrupted stage is never taken for a finished one and simply runs again (resuming where it can).
`record` keeps, per stage, whether this invocation ran or skipped it and how long it took, so a
rerun shows at a glance that finished work was not repeated.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..train import checkpoint

logger = logging.getLogger(__name__)

RAN, SKIPPED = "ran", "skipped"


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: `run()` must leave `path` finished (`checkpoint.is_done(path)`)."""

    name: str
    path: Path
    run: Callable[[], object]
    description: str = ""


@dataclass
class StageResult:
    name: str
    status: str  # RAN or SKIPPED
    seconds: float  # wall time of this invocation (near 0 when skipped)
    seconds_when_run: float | None  # wall time of the invocation that actually ran it, when known


def mark_done(path: str | os.PathLike, info: dict | None = None) -> None:
    """Write the `done` marker of `path` atomically (for stages that fill their directory in place)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / checkpoint.DONE_MARKER
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}) + "\n",
                   encoding="utf-8")
    os.replace(tmp, marker)


def read_record(path: str | os.PathLike) -> dict[str, dict]:
    """{stage name: StageResult as a dict} from a record file; {} when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        logger.warning("%s is unreadable; starting a new stage record", path)
        return {}


def _write_record(path: Path, record: dict[str, dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_stages(stages: Sequence[Stage], record: str | os.PathLike | None = None,
               announce: Callable[[int, Stage, bool], None] | None = None) -> list[StageResult]:
    """Run each unfinished stage in order; skip finished ones. Errors propagate (later stages don't run).

    `record`: JSON file updated after every stage. `announce(i, stage, skipping)` is called before each
    stage (e.g. to print "[2/4] sft").
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    record_path = None if record is None else Path(record)
    previous = {} if record_path is None else read_record(record_path)
    results = []
    for i, stage in enumerate(stages):
        done = checkpoint.is_done(stage.path)
        if announce is not None:
            announce(i, stage, done)
        start = time.perf_counter()
        if done:
            logger.info("stage %s: skipped, already finished in %s", stage.name, stage.path)
            earlier = previous.get(stage.name, {})
            when_run = earlier.get("seconds_when_run")
            result = StageResult(stage.name, SKIPPED, time.perf_counter() - start, when_run)
        else:
            logger.info("stage %s: running -> %s", stage.name, stage.path)
            stage.run()
            if not checkpoint.is_done(stage.path):
                raise RuntimeError(f"stage {stage.name} returned without finishing {stage.path} (no done marker)")
            seconds = time.perf_counter() - start
            logger.info("stage %s: finished in %.1f s", stage.name, seconds)
            result = StageResult(stage.name, RAN, seconds, seconds)
        results.append(result)
        if record_path is not None:
            previous[stage.name] = asdict(result)
            _write_record(record_path, previous)
    return results


def remove_outputs(root: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Delete `root/name` for each name (stage folders, report files) and stale temporaries of them.

    Only the listed names are touched, so pointing a pipeline at a folder with other files is safe.
    """
    root = Path(root)
    removed = []
    for name in names:
        target = root / name
        leftovers = list(root.glob(f".{name}.tmp-*")) + list(root.glob(f".{name}.old-*"))
        for path in ([target] if target.exists() or target.is_symlink() else []) + leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed

"""Atomic checkpoints of a training stage: a directory that is either complete or absent.

    save_stage(out, model, tokenizer, state={"step": 500, "loss": 0.21}, extra_json={"notes.json": {...}})
    if is_done(out): ...                                 # a rerun can skip the finished stage
    state = load_state(out)                              # the model: AutoModelForCausalLM.from_pretrained(out)

and, while a stage trains, periodic checkpoints to resume it exactly (every rank calls these):

    resumed = resume_point(out, options_json, resume)    # None, or (step, this rank's `mine`, `shared`)
    if checkpoint_due(step, total_steps, save_every):
        save_checkpoint(out, step, mine={"model": ..., "rng": rng_state()}, shared={"history": [...]},
                        options=options_json, keep=2)

Layout of a stage directory: the model (`save_pretrained`: config.json, model.safetensors, ...), the
tokenizer files, `stage_state.json` (small JSON state), any extra JSON/files, and the `done` marker.
Everything is written into a temporary sibling directory, the marker last, then renamed into place,
so a crash never leaves a directory that claims to be done.

A periodic checkpoint is such a stage directory too, `out/checkpoints/step-<step>/`: `rank<r>.pt` (each
rank's own state: weights, optimizer, relax algorithm state, RNG), `shared.pt` (rank 0's), and
`stage_state.json` (step, world size, the options). Ranks send their state to rank 0, which writes it
alone, so the checkpoint needs no file system shared between nodes; loading goes the other way.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DONE_MARKER = "done"
STATE_FILE = "stage_state.json"
CHECKPOINTS_DIR = "checkpoints"
SHARED_FILE = "shared.pt"
# Options that may change between a run and its resumption: checkpointing, and paths (a moved folder
# resumes; the weights, optimizer and reference policy come from the checkpoint, not from `model`).
RESUMABLE_CHANGES = frozenset({"resume", "save_every", "keep_checkpoints", "out", "data", "eval_data", "model"})
# options added after checkpoints were written without them: the value that reproduces how those runs
# trained (a checkpoint without the key resumes with exactly this value, and no other)
ADDED_OPTIONS = {"spr_min_class_share": 0.0}


def jsonable(value: Any) -> Any:
    """`value` with tuples turned into lists, recursively (stage state goes to JSON)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def is_done(path: str | os.PathLike) -> bool:
    """Whether `path` holds a completely written stage."""
    return (Path(path) / DONE_MARKER).is_file()


def save_stage(
    path: str | os.PathLike,
    model=None,
    tokenizer=None,
    state: dict | None = None,
    extra_json: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a stage to `path` atomically, replacing what was there.

    model/tokenizer: anything with `save_pretrained(dir)` (None to skip). state: JSON-serializable dict
    saved as stage_state.json. extra_json: {file name: JSON value}. write_extra(tmp_dir): writes any
    other files into the stage before it is sealed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a checkpoint should be readable like any folder
    try:
        if model is not None:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_json(tmp / STATE_FILE, {} if state is None else state)
        for name, value in (extra_json or {}).items():
            _write_json(tmp / name, value)
        if write_extra is not None:
            write_extra(tmp)
        _write_json(tmp / DONE_MARKER, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved stage to %s", path)
    return path


def load_state(path: str | os.PathLike) -> dict:
    """The JSON state of a finished stage; FileNotFoundError if the stage is not done."""
    path = Path(path)
    if not is_done(path):
        raise FileNotFoundError(f"{path} is not a finished stage (no '{DONE_MARKER}' marker)")
    with open(path / STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


def remove_stage(path: str | os.PathLike) -> None:
    """Delete a stage directory; it is renamed aside first, so it is never seen half deleted."""
    path = Path(path)
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.rename(path, aside / "stage")
    shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------- periodic checkpoints

def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINTS_DIR


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(out) / f"step-{step:08d}"


def finished_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint of the stage in `out`, oldest first."""
    found = []
    for path in checkpoints_dir(out).glob("step-*"):
        step = path.name[len("step-"):]
        if step.isdigit() and is_done(path):
            found.append((int(step), path))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = finished_checkpoints(out)
    return found[-1][1] if found else None


def clear_checkpoints(out: str | os.PathLike) -> None:
    """Forget the checkpoints of an earlier run in `out` (a run that starts over)."""
    remove_stage(checkpoints_dir(out))


def rng_state() -> dict:
    """The global generators a training step may draw from (dropout, sampling without a seed).
    Data order and rollout seeds come from explicit generators, rebuilt from the step number."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str | os.PathLike, step: int, mine: dict, shared: dict, options: dict,
                    keep: int) -> Path | None:
    """Every rank calls this after `step` steps: rank 0 gathers each rank's `mine` (its weights,
    optimizer, algorithm and RNG state), writes them with its own `shared` (history, reference policy)
    atomically as checkpoints/step-<step>/, then deletes all but the newest `keep`. `options`: the run's
    options as JSON, checked when resuming. Returns the path on rank 0, None elsewhere."""
    states = _gather_to_rank0(_on_cpu(mine))
    if states is None:
        return None

    def write(tmp: Path) -> None:
        for r, state in enumerate(states):
            torch.save(state, tmp / f"rank{r}.pt")
        torch.save(_on_cpu(shared), tmp / SHARED_FILE)

    info = {"step": step, "world_size": len(states), "options": options}
    path = save_stage(checkpoint_path(out, step), state=info, write_extra=write)
    for _, old in finished_checkpoints(out)[:-keep]:
        remove_stage(old)
    return path


def load_checkpoint(out: str | os.PathLike, options: dict) -> tuple[int, dict, dict] | None:
    """Every rank calls this: (step, this rank's `mine`, `shared`) of the newest finished checkpoint in
    `out`, or None when there is none. ValueError (on every rank) when it was written by another number
    of workers or with options that change training (anything but RESUMABLE_CHANGES)."""
    items = None
    if _rank() == 0:
        path = latest_checkpoint(out)
        try:
            items = [None] * _world_size() if path is None else _read_checkpoint(path, options)
        except ValueError as error:
            items = [str(error)] * _world_size()
    item = _scatter_from_rank0(items)
    if isinstance(item, str):
        raise ValueError(item)
    return item


def resume_point(out: str | os.PathLike, options: dict, resume: bool) -> tuple[int, dict, dict] | None:
    """Every rank calls this at the start of training: the newest checkpoint (as `load_checkpoint`) when
    `resume` is set or the launcher restarted the workers after a failure, else None - a fresh start,
    which removes the checkpoints of an earlier run in `out` so that none is ever mistaken for this one's."""
    from .launch import restart_count

    if resume or restart_count() > 0:
        resumed = load_checkpoint(out, options)
        if restart_count() > 0 and _rank() == 0:
            where = "the start (no checkpoint yet)" if resumed is None else f"step {resumed[0]}"
            logger.warning("workers restarted after a failure (restart %d): resuming from %s",
                           restart_count(), where)
        return resumed
    if _rank() == 0:
        clear_checkpoints(out)
    return None


def checkpoint_due(steps_done: int, total_steps: int, save_every: int | None) -> bool:
    """Whether to checkpoint after `steps_done` steps: every `save_every` steps, and after the last one
    (so that a failure in the evaluation after training does not cost the training)."""
    if save_every is None:
        return False
    return steps_done % save_every == 0 or steps_done == total_steps


def carry_checkpoints(out: str | os.PathLike, stage_dir: Path) -> None:
    """Keep `out`'s checkpoints in the finished stage that replaces it: hard links, so nothing is
    copied and the originals stay intact until the finished stage is in place."""
    source = checkpoints_dir(out)
    if source.is_dir():
        shutil.copytree(source, stage_dir / CHECKPOINTS_DIR, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(".*"))  # not the leftovers of an interrupted save


def check_resumable(path: str | os.PathLike, options: dict, world_size: int | None = None) -> dict:
    """The checkpoint's state; ValueError unless a run with `options` (and `world_size` workers, when
    given) can continue from it: only RESUMABLE_CHANGES may differ."""
    info = load_state(path)
    if world_size is not None and info["world_size"] != world_size:
        raise ValueError(f"{path}: written by {info['world_size']} workers, this run has {world_size}; "
                         f"resume with --nproc {info['world_size']}")
    saved = {**{k: v for k, v in ADDED_OPTIONS.items() if k in options}, **info["options"]}
    changed = sorted(k for k in set(saved) | set(options)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != options.get(k))
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} -> {options.get(k)!r}" for k in changed[:3])
        raise ValueError(f"{path}: written with other options ({diffs}); resume with the same options, "
                         "or start over (sft, grpo: --overwrite; demo: --fresh)")
    return info


def _read_checkpoint(path: Path, options: dict) -> list[tuple[int, dict, dict]]:
    info = check_resumable(path, options, _world_size())
    shared = torch.load(path / SHARED_FILE, weights_only=True)
    logger.info("resuming from %s (step %d)", path, info["step"])
    return [(info["step"], torch.load(path / f"rank{r}.pt", weights_only=True), shared)
            for r in range(info["world_size"])]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_to_rank0(obj: Any) -> list | None:
    """[every rank's obj] on rank 0, None elsewhere (pickled through the process group)."""
    if _world_size() == 1:
        return [obj]
    parts = [None] * _world_size() if _rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def _scatter_from_rank0(items: list | None) -> Any:
    """items[r] on rank r (`items` is read on rank 0 only)."""
    if _world_size() == 1:
        return items[0]
    received = [None]
    dist.scatter_object_list(received, items if _rank() == 0 else None, src=0)
    return received[0]


def _on_cpu(value: Any) -> Any:
    """`value` with every tensor moved to the CPU: another rank (or node) unpickles it."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        moved = type(value)((k, _on_cpu(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # a module state_dict's versions, read by load_state_dict
            moved._metadata = value._metadata
        return moved
    if type(value) in (list, tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and deleted after."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rename(target, old / "stage")  # rename into a fresh empty dir: atomic, same filesystem
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Leftovers of an interrupted save of this stage (never a finished stage)."""
    for prefix in (f".{path.name}.tmp-", f".{path.name}.old-"):
        for leftover in path.parent.glob(prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)

"""Atomic checkpoints of a training stage: a directory that is either complete or absent.

    save_stage(out, model, tokenizer, state={"step": 500, "loss": 0.21}, extra_json={"reflect_config.json": {...}})
    if is_done(out): ...                                 # a rerun can skip the finished stage
    model, tokenizer, state = load_stage(out)

Layout of a stage directory: the model (`save_pretrained`: config.json, model.safetensors, ...), the
tokenizer files, `stage_state.json` (small JSON state), any extra JSON/files, and the `done` marker.
Everything is written into a temporary sibling directory, the marker last, then renamed into place,
so a crash never leaves a directory that claims to be done.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DONE_MARKER = "done"
STATE_FILE = "stage_state.json"


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


def load_stage(path: str | os.PathLike, **model_kwargs) -> tuple[Any, Any, dict]:
    """(model, tokenizer, state) of a finished stage, loaded with the transformers Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = load_state(path)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, state


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

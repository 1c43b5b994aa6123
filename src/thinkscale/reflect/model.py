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

from .atomic import write_atomic, write_text_atomic
from .head import HEAD_INPUTS, NUM_CONFIDENCE_INPUTS, SPRMHead, scale_backbone_grad
from .loss import SCORE_AGGREGATIONS
from .provenance import HeadRecord, policy_fingerprint, read_record, record_path, write_record
from .release import RELEASE_HEAD_NAME, load_release_head
from .sources import load_policy, resolve_model
from .steps import Delimiter, delimiter_token_ids, release_delimiter, single_token_id, step_mask

logger = logging.getLogger(__name__)

CONFIG_NAME = "reflect_config.json"
HEAD_NAME = "sprm_head.safetensors"
# where HF causal LMs keep their decoder blocks
LAYER_STACK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "transformer.layers",
                     "gpt_neox.layers", "model.language_model.layers")
_UNSET: Any = object()  # "argument not given", so that think_tags=None can mean "no think tags"
# where steps end and which of them count: thinkscale's rules (`steps.delimiter_token_ids`, the span from
# the first think-start to the last think-end of the response) or the MetaStone-S1 release scorer's
# (the ids the delimiter text encodes to, the region between the single think tags; `steps.step_mask`)
STEP_RULES = ("thinkscale", "release")
# what a release head (score_module.pt) implies when its folder carries no reflect_config.json
RELEASE_CONFIG = {"step_rules": "release", "head_inputs": "features", "score_aggregation": "geomean",
                  "feature_layer": -2}
DEFAULT_FEATURE_LAYER = -2  # the second-to-last decoder layer (MetaStone-S1's hidden_states[-2])


@dataclass
class ReflectConfig:
    """What the reflective model needs besides the policy weights; saved as reflect_config.json.

        >>> from thinkscale.reflect import ReflectConfig
        >>> config = ReflectConfig(step_delimiter="\\n", think_tags=None)   # a chat model: a step a line
        >>> config.head_inputs, config.score_aggregation                 # the spec's head and score
        ('features', 'geomean')
    """

    step_delimiter: str = ".\n\n"
    think_tags: tuple[str, str] | None = ("<think>", "</think>")
    prompt_template: str | None = None  # e.g. "Q: {question}\nA:"; None -> chat template or question + "\n"
    # a line added after every question, e.g. how to write the answer ("... as \\boxed{...}."): what a chat
    # model needs to answer in a task's format without being fine-tuned on it
    instruction: str | None = None
    backbone_grad_scale: float = 1e-4  # fraction of the SPR-loss gradient that reaches the policy
    head_dropout: float = 0.5
    # what the head reads (`head.HEAD_INPUTS`; the spec: "features") and how step scores make the
    # trajectory score (`loss.SCORE_AGGREGATIONS`; the spec: "geomean")
    head_inputs: str = "features"
    score_aggregation: str = "geomean"
    step_rules: str = "thinkscale"  # see STEP_RULES; "release" for a MetaStone-S1 release model
    # the decoder layer whose output the head reads, an index into the layer stack: -2 = the second-to-last
    # (the spec's and the release's); `bench probe` finds where step correctness is most readable
    feature_layer: int = DEFAULT_FEATURE_LAYER

    def __post_init__(self) -> None:
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            raise ValueError(f"step_delimiter must be a non-empty string, got {self.step_delimiter!r}")
        if self.think_tags is not None:
            self.think_tags = tuple(self.think_tags)
            if len(self.think_tags) != 2 or not all(isinstance(t, str) and t for t in self.think_tags):
                raise ValueError(f"think_tags must be (start, end) strings or None, got {self.think_tags!r}")
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction.strip()):
            raise ValueError(f"instruction must be a non-empty string or None, got {self.instruction!r}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {self.prompt_template!r}")
        if not 0.0 <= self.backbone_grad_scale <= 1.0:
            raise ValueError(f"backbone_grad_scale must be in [0, 1], got {self.backbone_grad_scale}")
        if self.head_inputs not in HEAD_INPUTS:
            raise ValueError(f"head_inputs must be one of {', '.join(HEAD_INPUTS)}, got {self.head_inputs!r}")
        if self.score_aggregation not in SCORE_AGGREGATIONS:
            raise ValueError(f"score_aggregation must be one of {', '.join(SCORE_AGGREGATIONS)}, "
                             f"got {self.score_aggregation!r}")
        if self.step_rules not in STEP_RULES:
            raise ValueError(f"step_rules must be one of {', '.join(STEP_RULES)}, got {self.step_rules!r}")
        if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int):
            raise ValueError(f"feature_layer must be an integer layer index, got {self.feature_layer!r}")

    def save(self, directory: str | os.PathLike, fields: tuple[str, ...] | None = None) -> None:
        """Write reflect_config.json into `directory` (atomically): the one writer of that file. With
        `fields`, only those: what a folder fixes, leaving the rest to the loader's other sources (a
        fine-tuned policy fixes its prompt format, not a release head's step rules)."""
        values = dataclasses.asdict(self)
        if fields is not None:
            values = {name: values[name] for name in fields}
        write_text_atomic(os.path.join(os.fspath(directory), CONFIG_NAME), json.dumps(values, indent=2))


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
    """Policy LM (`.policy`) + SPRM head (`.head`); `forward` returns policy logits and step logits.

    A pretrained one loads with `ReflectiveModel.from_pretrained(folder)` (or "smollm2", or a `thinkscale
    fit-head` folder); a policy object gets a fresh head:

        >>> from thinkscale.reflect import ReflectiveModel
        >>> from thinkscale.tasks.policy import tiny_policy
        >>> policy, tokenizer = tiny_policy()                      # 2 layers of width 32, untrained
        >>> rm = ReflectiveModel(policy)                           # a fresh head on its hidden states
        >>> import torch
        >>> out = rm(torch.tensor([[1, 2, 3]]))
        >>> out.logits.shape, out.step_logits.shape      # (batch, positions, vocabulary); one step logit a position
        (torch.Size([1, 3, 277]), torch.Size([1, 3]))
    """

    def __init__(self, policy: nn.Module, head: SPRMHead | None = None, config: ReflectConfig | None = None,
                 head_is_trained: bool = False) -> None:
        super().__init__()
        self.config = config if config is not None else ReflectConfig()
        layers = find_decoder_layers(policy)
        if len(layers) < 2:
            raise ValueError(f"the policy has {len(layers)} decoder layer(s); the SPRM head reads the "
                             "second-to-last one, so at least 2 are needed")
        if not -len(layers) <= self.config.feature_layer < len(layers):
            raise ValueError(f"feature_layer {self.config.feature_layer} is outside the policy's {len(layers)} "
                             f"decoder layers (valid: -{len(layers)} to {len(layers) - 1})")
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
        # where the head comes from, written into its record on save: origin (provenance.ORIGINS), task, fit
        self.head_provenance: dict[str, Any] = {"origin": "unknown" if head_is_trained else "fresh"}
        forward_params = inspect.signature(policy.forward).parameters
        # transformers >= 5.x calls the KV cache `cache`, earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        self._step_tokens: dict[tuple, StepTokens] = {}

    @property
    def feature_layer(self) -> nn.Module:
        """The decoder block whose output the head reads (`config.feature_layer`)."""
        return find_decoder_layers(self.policy)[self.config.feature_layer]

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
        key = (id(tokenizer), getattr(tokenizer, "name_or_path", None), len(tokenizer), self.config.step_delimiter,
               self.config.think_tags, self.config.step_rules)
        if key not in self._step_tokens:
            if self.config.step_rules == "release":
                delimiter = release_delimiter(tokenizer, self.config.step_delimiter)
            else:
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
        """`steps.step_mask` with this model's delimiter, think tags and step rules (see there for padding)."""
        st = self.step_tokens(tokenizer)
        region = "single" if self.config.step_rules == "release" else "first_last"
        return step_mask(input_ids, st.delimiter, st.think_start_id, st.think_end_id, response_start, attention_mask,
                         region)

    def with_instruction(self, question: str) -> str:
        """The question followed by the config's instruction line, if it has one."""
        return question if self.config.instruction is None else f"{question}\n{self.config.instruction}"

    def format_prompt(self, question: str, tokenizer) -> str:
        """The prompt text for a question (followed by the config's instruction line, if any): the config's
        template, else the chat template, else question + newline."""
        question = self.with_instruction(question)
        if self.config.prompt_template is not None:
            return self.config.prompt_template.replace("{question}", question)
        if getattr(tokenizer, "chat_template", None) is not None:
            return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
        return question + "\n"

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None) -> None:
        """Policy (HF format), head (sprm_head.safetensors + its record sprm_head.json) and reflect_config.json
        in one directory; the record names the policy as "." (this folder)."""
        os.makedirs(save_directory, exist_ok=True)
        self.policy.save_pretrained(save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        self.save_head(save_directory, policy_reference=".")

    def save_head(self, directory: str | os.PathLike, policy_reference: str = ".") -> None:
        """The head alone: sprm_head.safetensors, reflect_config.json and the record sprm_head.json, which
        names `policy_reference` ("smollm2", a folder, "." = beside it) and fingerprints this model's policy.

        Each file is written atomically and the record last, so a folder with a record is complete. A folder
        with no policy weights (`thinkscale fit-head`'s) loads with `from_pretrained(directory)`.
        """
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        write_atomic(os.path.join(directory, HEAD_NAME), lambda tmp: save_file(state, tmp))
        self.config.save(directory)
        record = HeadRecord(
            trained=self.head_is_trained, hidden_size=self.head.hidden_size, inputs=self.head.inputs,
            aggregation=self.config.score_aggregation, step_delimiter=self.config.step_delimiter,
            policy=policy_reference, policy_fingerprint=policy_fingerprint(self.policy),
            origin=self.head_provenance.get("origin", "unknown"), task=self.head_provenance.get("task"),
            fit=self.head_provenance.get("fit"))
        write_record(record_path(os.path.join(directory, HEAD_NAME)), record)

    @classmethod
    def from_pretrained(cls, policy: str | os.PathLike | nn.Module, head: str | os.PathLike | SPRMHead | None = None,
                        step_delimiter: str | None = None, think_tags: Any = _UNSET, prompt_template: str | None = None,
                        backbone_grad_scale: float | None = None, force_head: bool = False, instruction: str | None = None,
                        feature_layer: int | None = None, **hf_kwargs: Any) -> "ReflectiveModel":
        """Load a policy and attach a head.

        policy: a model object, or what `sources.resolve_model` takes: a Hugging Face folder (with any HF
        kwargs such as gguf_file or torch_dtype), "smollm2", or a fitted-head folder (`thinkscale fit-head`:
        its record names the policy, which is loaded; its head comes along).
        head: None -> the folder's own head: sprm_head.safetensors, else a MetaStone-S1 release
        score_module.pt, else a fresh untrained head; a path (a head file, or a folder holding one) that
        must exist; or an SPRMHead.
        A head with a record is trained or not as the record says, and is refused (ValueError) on a policy
        whose weights differ from the ones it was fitted to, unless `force_head`. A head without a record
        (saved before records existed, or a release head) counts as trained and its policy is not checked.
        Config, later ones winning: the model's defaults (`sources`), a release head's rules, the policy
        folder's reflect_config.json, the head folder's (what the head was fitted with), the keyword arguments.
        """
        policy_dir, head_dir, saved = None, None, {}
        if isinstance(policy, (str, os.PathLike)):
            source = resolve_model(policy, gguf_file=hf_kwargs.pop("gguf_file", None))
            model = load_policy(source, **hf_kwargs)
            policy_dir, head_dir, saved = source.folder, source.head_folder, dict(source.defaults)
        elif isinstance(policy, nn.Module):
            if hf_kwargs:
                raise TypeError(f"HF loading arguments {sorted(hf_kwargs)} only apply when policy is a path")
            model = policy
        else:
            raise TypeError(f"policy must be a path or an nn.Module, got {type(policy).__name__}")

        head_file = None if isinstance(head, SPRMHead) else _find_head(head if head is not None else head_dir,
                                                                       policy_dir)
        is_release = head_file is not None and head_file.endswith(".pt")
        if is_release:
            saved.update(RELEASE_CONFIG)
        config_dirs = [policy_dir] + ([os.path.dirname(head_file)] if head_file is not None else [])
        for folder in dict.fromkeys(d for d in config_dirs if d is not None):
            if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
                saved.update(_read_json(os.path.join(folder, CONFIG_NAME)))
        overrides = {"step_delimiter": step_delimiter, "prompt_template": prompt_template,
                     "backbone_grad_scale": backbone_grad_scale, "instruction": instruction,
                     "feature_layer": feature_layer}
        saved.update({k: v for k, v in overrides.items() if v is not None})
        if think_tags is not _UNSET:
            saved["think_tags"] = think_tags
        config = ReflectConfig(**saved)

        hidden = _hidden_size(model)
        module, trained, provenance = None, False, {"origin": "fresh"}
        if isinstance(head, SPRMHead):
            module, trained, provenance = head, True, {"origin": "unknown"}
        elif is_release:
            module, trained, provenance = load_release_head(head_file, hidden, config.head_dropout), True, {"origin": "release"}
            logger.info("%s: a MetaStone-S1 release head, scored with the release's step rules (no record: taken "
                        "as trained, its policy not checked)", head_file)
        elif head_file is not None:
            module = _load_head_file(head_file, hidden, config.head_dropout, config.head_inputs)
            record = read_record(record_path(head_file))
            if record is None:
                trained, provenance = True, {"origin": "unknown"}
                logger.info("%s has no %s beside it (saved before head records): taken as trained, as before; "
                            "its policy is not checked", head_file, os.path.basename(record_path(head_file)))
            else:
                _check_policy(record, model, head_file, force_head)
                trained, provenance = record.trained, {"origin": record.origin, "task": record.task, "fit": record.fit}
        else:
            logger.info("no trained SPRM head found; attached a fresh head (hidden size %d)", hidden)
        rm = cls(model, module, config, head_is_trained=trained)
        rm.head_provenance = provenance
        return rm


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _check_policy(record: HeadRecord, policy: nn.Module, head_file: str, force: bool) -> None:
    """Refuse (ValueError, one line) a head whose record fingerprints other policy weights, unless forced."""
    if record.policy_fingerprint is None:
        return
    actual = policy_fingerprint(policy)
    if actual == record.policy_fingerprint:
        return
    folder = os.path.dirname(os.path.abspath(head_file))
    fitted_to = folder if record.policy in (None, ".") else record.policy
    message = (f"the SPRM head {head_file} was fitted to the policy {fitted_to} (weights {record.short_fingerprint()}), "
               f"not to this one (weights {actual.split(':')[-1][:12]})")
    if not force:
        raise ValueError(message + "; its scores would be noise here (force_head=True / --force-head uses it anyway)")
    logger.warning("%s; using it anyway (forced)", message)


def _find_head(head: str | os.PathLike | None, policy_dir: str | None) -> str | None:
    """The head file to load: `head` (a file, or a folder holding sprm_head.safetensors or score_module.pt),
    which must exist; None -> the policy folder's own head, if it has one."""
    if head is None:
        for name in (HEAD_NAME, RELEASE_HEAD_NAME):
            if policy_dir is not None and os.path.isfile(os.path.join(policy_dir, name)):
                return os.path.join(policy_dir, name)
        return None
    if not isinstance(head, (str, os.PathLike)):
        raise TypeError(f"head must be None, a path or an SPRMHead, got {type(head).__name__}")
    path = os.fspath(head)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in (HEAD_NAME, RELEASE_HEAD_NAME) if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"SPRM head not found: no {HEAD_NAME} or {RELEASE_HEAD_NAME} in {path}")
        return found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SPRM head file not found: {path}")
    return path


def _load_head_file(path: str, hidden: int, dropout: float, inputs: str = "features") -> SPRMHead:
    """An SPRMHead from a thinkscale head file (safetensors, keys net.*), checked against the policy width."""
    from safetensors.torch import load_file

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
    return module

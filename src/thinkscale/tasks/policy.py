"""A small causal-LM policy built from a Hugging Face config (Llama or Qwen2 family), no hub needed.

    policy = build_policy(PolicyConfig(), tokenizer)   # ~3M parameters with the task tokenizer
    policy.save_pretrained(dir); AutoModelForCausalLM.from_pretrained(dir)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

FAMILIES = {"llama": "llama", "qwen2": "qwen2"}  # our name -> transformers model_type


@dataclass(frozen=True)
class PolicyConfig:
    """Size of the policy. The default (hidden 192, 6 layers, ~2.7M parameters) learns the default
    arithmetic task in a few CPU minutes; tests use hidden 32-64 and 2 layers."""

    family: str = "llama"
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int | None = None  # None: same as num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown policy family {self.family!r}; allowed: {sorted(FAMILIES)}")
        for name in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if kv < 1 or self.num_heads % kv != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")


def build_config(config: PolicyConfig, vocab_size: int, pad_token_id: int | None, eos_token_id: int | None):
    """The transformers config for `config` with the tokenizer's vocabulary and special ids."""
    return AutoConfig.for_model(
        FAMILIES[config.family],
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size if config.intermediate_size is None else config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads if config.num_kv_heads is None else config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_theta=config.rope_theta,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def build_policy(config: PolicyConfig, tokenizer, seed: int | None = None) -> PreTrainedModel:
    """A freshly initialized causal LM sized by `config`, with `tokenizer`'s vocabulary.

    With `seed` the initial weights are reproducible (the global torch RNG state is restored after).
    """
    hf_config = build_config(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    if seed is None:
        model = AutoModelForCausalLM.from_config(hf_config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config)
    # Generation should stop on EOS and pad with the pad token without warnings.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def tiny_policy(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """(policy, tokenizer) small enough for examples and tests: 2 layers of width 32, a tokenizer trained
    on one worked arithmetic solution. Untrained: what it writes is noise, but every API runs on it.

        >>> from thinkscale.tasks.policy import tiny_policy
        >>> policy, tokenizer = tiny_policy()
        >>> policy.config.num_hidden_layers, policy.config.hidden_size
        (2, 32)
    """
    from .tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["What is 1 + 2?\n<think>\n1 + 2 = 3.\n\n</think>\n\\boxed{3}"])
    config = PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return build_policy(config, tokenizer, seed=seed), tokenizer

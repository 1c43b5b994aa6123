"""Splicing KV caches: what lets rows join a batch that is already decoding.

A decode batch's cache holds, per layer, keys and values of shape (B, H, L, D) over L columns shared by
every row, with an attention mask (B, L) saying which columns are a row's own (left padding: a row's real
columns are its rightmost ones at any time). Rows prefilled apart can join it: both caches are left-padded
with masked zero columns to the same width and stacked along the batch. A masked column gets exactly zero
attention weight, so a row attends to the same keys whatever it was stacked with.

transformers' cache classes offer `reorder_cache` (select and repeat rows) but no concatenation, so this
works on the public `keys` / `values` of plain `DynamicLayer`s (full attention, unquantized); for any other
layer type `splice_supported` is False and callers decode without joining (the server logs it once).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


def splice_supported(cache: Any) -> bool:
    """Whether rows can join this cache: every layer a plain DynamicLayer holding (B, H, L, D) tensors."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None and layer.keys.dim() == 4
                                for layer in layers)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def splice(cache: Any, attn: torch.Tensor, other: Any, other_attn: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` in place (both left-padded to the wider of the two); returns the
    joined attention mask (B + B', L). `other` is consumed."""
    if not (splice_supported(cache) and splice_supported(other)) or len(cache.layers) != len(other.layers):
        raise ValueError("these KV caches cannot be spliced (only plain DynamicCache layers can)")
    width = max(attn.shape[1], other_attn.shape[1])
    for mine, theirs in zip(cache.layers, other.layers):
        mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)], dim=0)
        mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)], dim=0)
    return torch.cat([_left_pad(attn, width, 1), _left_pad(other_attn, width, 1)], dim=0)


def trim_left(cache: Any, attn: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns no row attends to (left behind by rows that left); returns the new mask."""
    used = attn.any(dim=0)
    if not splice_supported(cache) or bool(used[0]) or not bool(used.any()):
        return attn
    first = int(used.to(torch.int8).argmax())
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return attn[:, first:]

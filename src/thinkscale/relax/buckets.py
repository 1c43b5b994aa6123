"""Gradient buckets: parameters grouped in (approximate) backward order, one flat buffer each.

Parameters are taken in reversed registration order (backward visits the last layers first), split by
dtype and by kind (an algorithm may keep some parameters apart, e.g. 1-D ones), and a bucket closes once it holds `bucket_bytes` (it may overshoot by one tensor). Each bucket
owns one contiguous buffer; a parameter's `.grad` becomes a view into it when its gradient is ready
(`take_grad`), so later iterations accumulate straight into the buffer (unless the loop sets grads to
None, then the fresh gradient is copied in once) and a bucket is communicated without packing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Bucket:
    index: int
    params: list[torch.nn.Parameter]
    flat: torch.Tensor  # 1-D, numel >= sum of param sizes (padded for some algorithms)
    views: list[torch.Tensor] = field(default_factory=list)  # grad views, one per param
    ready: set[int] = field(default_factory=set)  # ids of params whose grad is final this iteration
    kind: str = ""  # the algorithm's name for how this bucket is treated ("" = the default)

    @property
    def numel(self) -> int:
        """Elements that belong to parameters (the padding excluded)."""
        return sum(p.numel() for p in self.params)

    @property
    def is_ready(self) -> bool:
        return len(self.ready) == len(self.params)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat` shaped like each parameter, in this bucket's layout."""
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def take_grad(self, index: int) -> None:
        """Make params[index].grad the bucket view, keeping the gradient it holds (its grad is ready)."""
        p, view = self.params[index], self.views[index]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        p.grad = view

    def stage_missing(self, index: int) -> None:
        """params[index] got no gradient this iteration: its slot takes what this rank contributes (its
        current grad, or zeros), without making the slot its grad (the engine decides that after the
        exchange, as DDP does for unused parameters)."""
        p, view = self.params[index], self.views[index]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() == view.data_ptr():
            p.grad = view.clone()  # the slot is about to be averaged; the local value stays apart
        else:
            view.copy_(p.grad)


def plan_buckets(params: list[torch.nn.Parameter], bucket_bytes: int,
                 kind: Callable[[torch.nn.Parameter], str] = lambda p: "") -> list[list[torch.nn.Parameter]]:
    """Group parameters into buckets: reversed order, one dtype and kind per bucket, closed at
    `bucket_bytes`. Buckets are listed in the order backward is expected to complete them: by their
    last tensor. (Sorting by the first would hold a bucket of biases, which closes only at the input
    layer, in front of the big weight buckets: the engine launches buckets in order, so none of them
    could start before the end of backward.)"""
    open_by_key: dict[tuple, tuple[list[torch.nn.Parameter], int]] = {}
    planned: list[tuple[int, list[torch.nn.Parameter]]] = []
    for position, p in enumerate(reversed(params)):
        key = (p.dtype, kind(p))
        group, size = open_by_key.get(key, ([], 0))
        group.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            planned.append((position, group))
            open_by_key.pop(key, None)
        else:
            open_by_key[key] = (group, size)
    last_position = len(params)  # still open at the end: they complete with the last parameter
    planned.extend((last_position, group) for group, _ in open_by_key.values())
    return [group for _, group in sorted(planned, key=lambda item: item[0])]


def build_buckets(params: list[torch.nn.Parameter], bucket_bytes: int, pad_multiple: int = 1,
                  kind: Callable[[torch.nn.Parameter], str] = lambda p: "") -> list[Bucket]:
    """Allocate each bucket's flat buffer (padded to `pad_multiple` elements) and its grad views."""
    buckets = []
    for index, group in enumerate(plan_buckets(params, bucket_bytes, kind)):
        numel = sum(p.numel() for p in group)
        padded = -(-numel // pad_multiple) * pad_multiple
        flat = torch.zeros(padded, dtype=group[0].dtype, device=group[0].device)
        bucket = Bucket(index=index, params=group, flat=flat, kind=kind(group[0]))
        bucket.views = bucket.split(flat)
        buckets.append(bucket)
    return buckets


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One new contiguous 1-D copy of `tensors` (weight-space algorithms communicate these)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` back into `tensors` in place."""
    offset = 0
    for t in tensors:
        t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def group_by_dtype(tensors: list) -> list[list]:
    """`tensors` grouped by dtype (flat tensors hold one dtype), each group in the given order."""
    groups: dict[torch.dtype, list] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())

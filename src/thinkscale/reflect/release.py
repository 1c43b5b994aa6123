"""The MetaStone-S1 release's head file, `score_module.pt`, read into an `SPRMHead` (and written, for tests
and for handing a head back to release tools).

A released model folder is an ordinary Hugging Face folder plus `score_module.pt`: `torch.save` of the
state dict of `nn.Sequential(Linear(c, 2c), ReLU, Dropout, Linear(2c, 1))`, keys `0.weight`, `0.bias`,
`3.weight`, `3.bias`. `SPRMHead.net` is that same Sequential, so the keys map onto `net.0.*` / `net.3.*`.
The file is read with `torch.load(weights_only=True)`: a pickle that holds anything but tensors is
refused before any of its code can run.
"""
from __future__ import annotations

import os
import pickle
import re

import torch

from .atomic import write_atomic
from .head import SPRMHead

RELEASE_HEAD_NAME = "score_module.pt"
RELEASE_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")


def load_release_head(path: str | os.PathLike, hidden_size: int, dropout: float = 0.5) -> SPRMHead:
    """A features head (eval mode) with the weights of a release `score_module.pt`.

    ValueError naming the file and the problem when it is not a plain state dict of that shape for a
    policy of width `hidden_size`.
    """
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as error:
        raise ValueError(f"{path}: not a plain state dict of tensors, refused by torch.load(weights_only=True) "
                         f"({_reason(error)})") from None
    check_release_state(state, hidden_size, path)
    head = SPRMHead(hidden_size, dropout=dropout, inputs="features")
    head.load_state_dict({f"net.{k}": v.float() for k, v in state.items()})
    return head.eval()


def _reason(error: BaseException) -> str:
    """The telling line of a torch.load error ("Unsupported global: GLOBAL torch.nn...Linear ..."), short."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    telling = [line for line in lines if "Unsupported" in line] or lines or [type(error).__name__]
    text = telling[0].replace("WeightsUnpickler error: ", "")
    return text.split(" was not an allowed global")[0][:160]


def check_release_state(state: object, hidden_size: int, where: str) -> None:
    """ValueError unless `state` is {0.weight (2c, c), 0.bias (2c,), 3.weight (1, 2c), 3.bias (1,)} of tensors."""
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a state dict, found a {type(state).__name__}")
    if set(state) != set(RELEASE_KEYS):
        raise ValueError(f"{where}: expected the keys {', '.join(RELEASE_KEYS)} of "
                         f"Sequential(Linear(c, 2c), ReLU, Dropout, Linear(2c, 1)), found {', '.join(map(str, state))}")
    c = hidden_size
    shapes = {"0.weight": (2 * c, c), "0.bias": (2 * c,), "3.weight": (1, 2 * c), "3.bias": (1,)}
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{where}: {key} is not a floating-point tensor")
        if tuple(value.shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {shape} for a policy of "
                             f"hidden size {c}")


def save_release_head(head: SPRMHead, path: str | os.PathLike) -> None:
    """Write a features head as a release `score_module.pt` (keys 0.* and 3.*), atomically."""
    if head.inputs != "features":
        raise ValueError(f"the release format holds a features head; this one reads {head.inputs!r}")
    state = {k.removeprefix("net."): v.detach().cpu().clone() for k, v in head.state_dict().items()}
    write_atomic(path, lambda tmp: torch.save(state, tmp))

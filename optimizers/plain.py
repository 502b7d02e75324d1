"""Plain torch optimizers under fedprobe names (also the bases the wrappers wrap)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from optimizers.registry import OPTIMIZERS

ParamsT = Any  # iterable of tensors or of param-group dicts, as torch.optim takes


@OPTIMIZERS.register("sgd")
def sgd(params: ParamsT, lr: float, **options: Any) -> Optimizer:
    """Plain SGD (torch.optim.SGD, no momentum unless given)."""
    return torch.optim.SGD(params, lr=lr, **options)


@OPTIMIZERS.register("momentum")
def momentum(params: ParamsT, lr: float, momentum: float = 0.9, **options: Any) -> Optimizer:
    """SGD with heavy-ball momentum 0.9 (torch.optim.SGD)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, **options)


@OPTIMIZERS.register("adam")
def adam(params: ParamsT, lr: float, **options: Any) -> Optimizer:
    """Adam (torch.optim.Adam)."""
    return torch.optim.Adam(params, lr=lr, **options)


@OPTIMIZERS.register("adamw")
def adamw(params: ParamsT, lr: float, **options: Any) -> Optimizer:
    """AdamW, decoupled weight decay (torch.optim.AdamW)."""
    return torch.optim.AdamW(params, lr=lr, **options)


# the torch class each plain name builds; build() checks options against it
PLAIN_CLASSES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "momentum": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}

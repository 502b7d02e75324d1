"""Optimizers: plain torch ones and wrappers (DBD, RDBD, Reject / Random Vector Accelerating).

>>> import torch
>>> w = torch.nn.Parameter(torch.zeros(3))
>>> opt = build("rdbd", [w], base="momentum", lr=0.1)
>>> isinstance(opt, torch.optim.Optimizer), sorted(diagnostics(opt))[:2]
(True, ['lr_eff', 'lr_scale'])
"""

from optimizers.registry import OPTIMIZERS
from optimizers import plain as _plain  # noqa: F401  (registers sgd, momentum, adam, adamw)
from optimizers.wrapper import WrappedOptimizer
from optimizers.dbd import DeltaBarDelta, RegrettableDeltaBarDelta
from optimizers.reject import RejectAccelerating
from optimizers.random_vector import RandomVectorAccelerating
from optimizers.build import build, diagnostics

__all__ = [
    "OPTIMIZERS",
    "WrappedOptimizer",
    "DeltaBarDelta",
    "RegrettableDeltaBarDelta",
    "RejectAccelerating",
    "RandomVectorAccelerating",
    "build",
    "diagnostics",
]

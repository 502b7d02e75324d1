"""The state one gradient-inversion run shares between its random starts, and its wall-clock safety cap.

Budgets are iterations (``attacks.gradient_inversion``); ``max_seconds`` is only a cap, checked inside every
objective evaluation, that ends a search early and marks the result ``budget_limited``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from attacks.base import Observation
from attacks.gradients import replay_facts


class BudgetExceeded(RuntimeError):
    """The ``max_seconds`` safety cap fired inside an objective evaluation."""


class SearchState:
    """What one attack run shares between its starts: the simulation inputs and the safety cap."""

    def __init__(self, obs: Observation, model: nn.Module, params: dict[str, torch.Tensor], names: list[str],
                 tgt: dict[str, torch.Tensor], labels: torch.Tensor | None, steps: int, lr: float, bs: int,
                 example_clip: float, update_clip: float, weight: dict[str, Any] | None,
                 max_seconds: float) -> None:
        self.obs, self.model, self.params, self.names, self.tgt, self.labels = obs, model, params, names, tgt, labels
        self.steps, self.lr, self.bs = steps, lr, bs
        self.example_clip, self.update_clip, self.weight = example_clip, update_clip, weight  # weight: prune / noise
        self.replay = replay_facts(obs)  # the client's momentum, weight decay, batching
        self.deadline = time.perf_counter() + max_seconds if max_seconds > 0 else math.inf
        self.budget_limited = False

    def check(self) -> None:
        if time.perf_counter() > self.deadline:
            self.budget_limited = True
            raise BudgetExceeded

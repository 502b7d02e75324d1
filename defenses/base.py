"""The defense plugin contract.

A defense may act at three places, each an optional hook:

* the client's training step: :meth:`Defense.setup` may replace the model,
  optimizer and loader (Opacus ``make_private`` does), :meth:`Defense.loss` may
  change the loss (the copyright objective);
* the outgoing update: :meth:`Defense.transform_update` (clip, noise, prune);
* server aggregation: :meth:`Defense.wrap_strategy` wraps the Flower strategy
  (central DP).

``config.defenses`` is a list; hooks run in list order. State that must survive
across rounds for one client (a privacy accountant) lives in ``ctx.state``, a
JSON-serialisable dict that the ClientApp keeps in Flower's per-node context. It is
*public accounting state*: the client reports it with every reply (the server
checkpoints it and hands it back after ``--resume``), so a defense must never keep a
secret there (secrets come from :mod:`defenses.randomness`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fl.registry import Registry

DEFENSES: Registry[type["Defense"]] = Registry("defense", entry_point_group="fedprobe.defenses",
                                              base="defenses.base:Defense")


@dataclass
class ClientContext:
    """Everything a client-side defense may read or replace during one round."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any  # torch DataLoader
    server_round: int
    partition_id: int
    num_examples: int
    sample_rate: float  # batch_size / num_examples
    local_steps: int
    epochs: int
    device: torch.device
    task: Any  # models.tasks.TaskSpec
    sampled_fraction: float  # clients_per_round / num_clients (for accounting under client sampling)
    num_rounds: int = 1  # federation.rounds (for defenses that budget privacy over the whole run)
    state: dict[str, Any] = field(default_factory=dict)  # persists across rounds for this client
    metrics: dict[str, float] = field(default_factory=dict)  # reported to the server, logged to MLflow
    refused: str = ""  # why the client will not train this round (a spent privacy budget); see refuse()

    def refuse(self, reason: str) -> None:
        """Called in ``setup``: the client trains nothing this round and its reply is not aggregated."""
        self.refused = self.refused or reason


class Defense:
    """Base class: every hook is a no-op; override the ones the defense needs."""

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"unexpected parameters {sorted(params)}")

    # client side -----------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError (one line, with the fix) when this defense cannot run on ``model``; called by
        ``fedprobe run`` once the model is built, before Ray starts. No side effects."""

    def setup(self, ctx: ClientContext) -> None:
        """Before local training; may replace ctx.model / ctx.optimizer / ctx.loader."""

    def loss(self, loss: torch.Tensor, ctx: ClientContext, batch: dict[str, torch.Tensor], per_example: torch.Tensor | None) -> torch.Tensor:
        """Change the training loss (default unchanged). ``per_example`` is the unreduced loss when known."""
        return loss

    def after_training(self, ctx: ClientContext) -> None:
        """After local training, before the update is computed (accounting, metrics)."""

    def transform_update(self, update: dict[str, torch.Tensor], ctx: ClientContext) -> dict[str, torch.Tensor]:
        """The outgoing update (client - global), per parameter; return the one to send."""
        return update

    # server side -----------------------------------------------------------------
    def wrap_strategy(self, strategy: Any, config: Any) -> Any:
        """Wrap the Flower strategy that aggregates (server-side defenses)."""
        return strategy

    def server_metrics(self, server_round: int) -> dict[str, float]:
        """Server-side metrics for this round (central epsilon, ...)."""
        return {}

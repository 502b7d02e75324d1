"""Fault injection for robustness tests: clients that send corrupt updates.

Registered as the defense-slot plugin ``faulty_update`` (it acts on the outgoing
update, like a defense, but breaks it): the server must reject what it sends.
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import DEFENSES, ClientContext, Defense

MODES = ("nan", "inf", "shape", "dtype", "missing", "huge", "nan_weight", "extra_metric")


@DEFENSES.register("faulty_update")
class FaultyUpdate(Defense):
    """Fault injection: chosen clients send NaN / Inf / huge / wrongly shaped or typed / incomplete updates, a NaN weight or an extra metric."""

    def __init__(self, mode: str = "nan", clients: list[int] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"faulty_update mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.clients = set(clients or [])

    def transform_update(self, update: dict[str, torch.Tensor], ctx: ClientContext) -> dict[str, torch.Tensor]:
        if self.clients and ctx.partition_id not in self.clients:
            return update
        out: dict[str, Any] = dict(update)
        name = next(iter(out))
        if self.mode == "nan_weight":  # FedAvg's weight: NaN poisons the weighted mean
            ctx.metrics["num-examples"] = float("nan")
            return out
        if self.mode == "extra_metric":  # one key the others lack: Flower aborts the round on it
            ctx.metrics["surprise_metric"] = 1.0
            return out
        if self.mode == "huge":  # finite, but 1e30: as fatal to the mean as a NaN
            out[name] = torch.full_like(out[name], 1e30)
        elif self.mode == "nan":
            out[name] = torch.full_like(out[name], float("nan"))
        elif self.mode == "inf":
            out[name] = torch.full_like(out[name], float("inf"))
        elif self.mode == "shape":
            out[name] = torch.zeros(out[name].numel() + 1)
        elif self.mode == "dtype":
            out[name] = out[name].double()
        else:
            del out[name]
        return out

"""Conversions between torch state, numpy arrays and Flower's ArrayRecord, and update checks."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named trainable parameters: what travels between server and clients.

    Frozen weights (a pretrained base under an adapter, buffers) are rebuilt
    identically on both sides from the config and seed, so they never travel.
    """
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters (names must match)."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"parameters {missing[:3]} not in model (config mismatch between server and client?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(torch.as_tensor(value, dtype=params[name].dtype))


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v.detach().cpu().numpy()))
                        for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True)) for k, arr in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    return int(sum(len(arr.data) for arr in record.values()))


class InvalidUpdate(ValueError):
    """A client's reply that must not reach the global model."""


def check_update(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Reject NaN/Inf values, unknown or missing keys, wrong shapes or dtypes."""
    if set(received) != set(expected):
        extra = sorted(set(received) - set(expected))[:3]
        missing = sorted(set(expected) - set(received))[:3]
        raise InvalidUpdate(f"parameter names differ (unexpected {extra}, missing {missing})")
    for name, value in received.items():
        ref = expected[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise InvalidUpdate(f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise InvalidUpdate(f"{name}: dtype {value.dtype}, expected {ref.dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InvalidUpdate(f"{name}: contains NaN or Inf")

"""Conversions between torch state, numpy arrays and Flower's ArrayRecord, and update checks.

fedprobe's own messages carry a model as one flat array per dtype (:func:`to_flat_record`): its
key, ``fedprobe.flat|<dtype>|<layout>``, holds the names and shapes (JSON), so the record is
self-describing and survives Flower's key-wise strategies (FedAvg, the DP wrappers, Krum, median)
unchanged. Serialising 40-150 small tensors one by one (``np.save`` per tensor) was ~15 % of a tiny
client's CPU per update (issue 19). :func:`from_record` reads both forms; :func:`to_record` (one
array per tensor) stays for what a user's own app sends and receives (``fl.audit``), and for runs
whose server-side defense wraps the strategy with code that indexes arrays by parameter
(``central_dp``'s canaries): the server picks the form, a client replies in the form it received.
"""

from __future__ import annotations

import json

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


FLAT_PREFIX = "fedprobe.flat|"


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """One array per tensor (the form a plain Flower app uses)."""
    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v.detach().cpu().numpy()))
                        for k, v in state.items()})


def to_flat_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """One flat array per dtype; the key names the dtype and the layout ``[[name, shape], ...]`` in order."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, value in state.items():
        groups.setdefault(value.dtype, []).append((name, value))
    out = {}
    for dtype, items in groups.items():
        layout = json.dumps([[n, list(v.shape)] for n, v in items], separators=(",", ":"))
        flat = torch.cat([v.detach().reshape(-1).cpu() for _, v in items])  # [sum of numels]
        out[f"{FLAT_PREFIX}{str(dtype).removeprefix('torch.')}|{layout}"] = Array.from_numpy_ndarray(flat.numpy())
    return ArrayRecord(out)


def is_flat(record: ArrayRecord) -> bool:
    return any(k.startswith(FLAT_PREFIX) for k in record.keys())


def like(record: ArrayRecord, state: dict[str, torch.Tensor]) -> ArrayRecord:
    """``state`` in the same form as ``record`` (a reply mirrors the form of the model it was sent)."""
    return to_flat_record(state) if is_flat(record) else to_record(state)


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """name -> tensor from either form. A flat array is read once; its tensors are views of that one buffer."""
    out: dict[str, torch.Tensor] = {}
    for key, arr in record.items():
        if not key.startswith(FLAT_PREFIX):
            out[key] = torch.from_numpy(np.array(arr.numpy(), copy=True))
            continue
        layout = _layout(key)
        values = arr.numpy()  # np.load: a fresh array, read once
        flat = torch.from_numpy(values if values.flags.writeable else values.copy()).reshape(-1)
        sizes = [int(np.prod(shape)) for _, shape in layout]
        if sum(sizes) != flat.numel():
            raise ValueError(f"flat array of {flat.numel()} values does not match its layout ({sum(sizes)} values)")
        for (name, shape), piece in zip(layout, torch.split(flat, sizes)):
            out[name] = piece.view(shape)
    return out


def _layout(key: str) -> list[tuple[str, list[int]]]:
    try:
        _, _dtype, layout = key.split("|", 2)
        items = json.loads(layout)
        return [(str(n), [int(d) for d in shape]) for n, shape in items]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed flat-array key {key[:60]!r}: {exc}") from None


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

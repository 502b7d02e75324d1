"""Server-side checks that one client cannot defeat (issue 16): weights, update norms, metric keys.

Beside :func:`fl.arrays.check_update` (names, shapes, dtypes, NaN/Inf), a reply must carry a
positive finite aggregation weight, an update norm within ``max_update_ratio`` times the
median of the *other* clients' norms (a finite 1e30 is as fatal to FedAvg as a NaN), and the
metric keys every other reply has: Flower's FedAvg aborts the whole round on one extra key,
so extra keys are dropped with an event instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Message, MetricRecord

from fl.arrays import InvalidUpdate

WEIGHT_KEYS = ("num-examples", "uniform-weight")


def check_weight(content: object, keys: tuple[str, ...] = WEIGHT_KEYS, *, record: str | None = "metrics",
                 required: str | None = "num-examples") -> None:
    """The aggregation weights must be finite and > 0 (``num-examples = NaN`` poisons FedAvg's mean).

    fedprobe's own replies carry them in the record ``metrics`` and must have ``num-examples``;
    :class:`fl.audit.AuditStrategy` checks the wrapped strategy's ``weighted_by_key`` in whichever metric
    record the user's app sends (``record=None``), and leaves a missing key to that strategy's own check."""
    if record is None:
        records = [rec for _, rec in content.metric_records.items()]  # type: ignore[attr-defined]
    else:
        records = [content[record]] if record in content else []  # type: ignore[operator,index]
        if not records:
            raise InvalidUpdate(f"no {record!r} record (the aggregation weight travels there)")
    for metrics in records:
        for key in keys:
            if key in metrics:
                v = metrics[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
                        or float(v) <= 0:
                    raise InvalidUpdate(f"aggregation weight {key} = {v!r} is not a finite number > 0")
    if required is not None and not any(required in m for m in records):
        raise InvalidUpdate(f"aggregation weight {required} is missing")


def update_norm(received: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> float:
    """L2 norm of (received - sent), in float64 (1e30 entries overflow float32 norms)."""
    total = 0.0
    for k, v in received.items():
        if v.is_floating_point() and k in sent:
            total += float(torch.linalg.vector_norm((v.double() - sent[k].double())) ** 2)
    return math.sqrt(total)


def outliers(norms: list[float], ratio: float) -> list[int]:
    """Indices whose norm exceeds ``ratio`` x the median of the others' norms (needs >= 2 replies; 0 = off)."""
    if ratio <= 0 or len(norms) < 2:
        return []
    out = []
    for i, n in enumerate(norms):
        others = float(np.median([m for j, m in enumerate(norms) if j != i]))
        if not math.isfinite(n) or n > ratio * max(others, 1e-12):
            out.append(i)
    return out


def harmonise_metrics(server_round: int, replies: list[tuple[Message, int]]) -> list[str]:
    """Keep only the metric keys every reply has (in place); one event per client whose keys were dropped."""
    if len(replies) < 2:
        return []
    keys = [set(r.content["metrics"].keys()) for r, _ in replies]
    common = set.intersection(*keys)
    events = []
    for (reply, pid), have in zip(replies, keys):
        extra = sorted(have - common)
        if extra:
            rec = reply.content["metrics"]
            reply.content["metrics"] = MetricRecord({k: rec[k] for k in rec.keys() if k in common})
            events.append(f"round {server_round}: client {pid} sent metric keys the others did not ({', '.join(extra[:5])}"
                          f"{', ...' if len(extra) > 5 else ''}): dropped before aggregation")
    return events

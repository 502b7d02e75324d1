"""Flower Datasets' partitioners on fedprobe's data: ``data.partition = "<name>"`` + ``data.partition_params``.

``flwr-datasets`` (the library every Flower example partitions with) defines IID, Dirichlet, pathological,
shard, linear/square/exponential size and inner-Dirichlet partitioners over a Hugging Face ``Dataset``. fedprobe
hands them its training split as a two-column ``Dataset`` (``label``, and the item's index) and reads the
indices back, so any of them, or a user's own ``Partitioner`` subclass by dotted path, splits any fedprobe
dataset. As Flower's ``FederatedDataset`` does, the split is shuffled first, with the experiment seed; the
seed also goes to every partitioner that takes one: same config and seed, same partitions.

fedprobe's own ``iid`` and ``dirichlet`` (``fl.data.partition``) stay the defaults, so recorded results keep their
partitions; ``flwr_iid`` and ``flwr_dirichlet`` are Flower's versions.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from fl.config import FLOWER_PARTITIONS, OWN_PARTITIONS
from fl.registry import Registry

PARTITIONERS: Registry = Registry("partitioner", entry_point_group="fedprobe.partitioners",
                                  base="flwr_datasets.partitioner:Partitioner")

FLOWER, OWN = FLOWER_PARTITIONS, OWN_PARTITIONS


def names() -> list[str]:
    return [*OWN, *FLOWER]


def _resolve(name: str) -> Any:
    if name in FLOWER:
        import flwr_datasets.partitioner as fp

        return getattr(fp, FLOWER[name])
    if ":" in name:
        return PARTITIONERS.get(name)
    raise ValueError(f"data.partition {name!r} unknown; choose one of {', '.join(names())}, or a "
                     "flwr_datasets Partitioner subclass as 'package.module:Class'")


def flower_partition(name: str, params: dict[str, Any], labels: np.ndarray | None, n_items: int, n_parts: int,
                     seed: int) -> list[np.ndarray]:
    """``n_parts`` sorted index arrays into ``range(n_items)`` from the partitioner ``name`` (see the module doc)."""
    from datasets import Dataset

    cls = _resolve(name)
    sig = inspect.signature(cls.__init__).parameters
    kwargs = dict(params)
    if "num_partitions" in sig:
        kwargs.setdefault("num_partitions", n_parts)
    if "partition_by" in sig:
        if labels is None:
            raise ValueError(f"data.partition {name!r} splits by label, and this dataset has no labels; "
                             "use data.partition = 'iid'")
        kwargs.setdefault("partition_by", "label")
    if "seed" in sig:
        kwargs.setdefault("seed", seed)
    try:
        partitioner = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data.partition {name!r} with data.partition_params {params}: {exc}") from None
    columns = {"_fedprobe_index": np.arange(n_items, dtype=np.int64)}
    if labels is not None:
        columns["label"] = np.asarray(labels, dtype=np.int64)
    partitioner.dataset = Dataset.from_dict(columns).shuffle(seed=seed)  # as FederatedDataset(shuffle=True, seed)
    if partitioner.num_partitions != n_parts:
        raise ValueError(f"data.partition {name!r} makes {partitioner.num_partitions} partitions, the federation has "
                         f"{n_parts} clients (federation.num_clients); make them agree")
    parts = []
    for pid in range(n_parts):
        try:
            idx = np.sort(np.asarray(partitioner.load_partition(pid)["_fedprobe_index"], dtype=np.int64))
        except ValueError as exc:
            raise ValueError(f"data.partition {name!r}: {str(exc).splitlines()[0]}") from None
        if len(idx) == 0:
            raise ValueError(f"data.partition {name!r} left client {pid} without data; change data.partition_params "
                             "or use fewer clients")
        parts.append(idx)
    return parts

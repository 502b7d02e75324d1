"""From a data config to a federated view: central test split + per-client partitions.

``load_federated`` is called in every simulated client process, so it is cached
in-process (keyed on the config JSON) and stores only index arrays per client; a
client's ``Subset`` views and its train/val split are made on demand by ``partition``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from fl.config import DataConfig
from fl.data.base import DATASETS, ArrayDataset, DataError, LoadedData, collate
from fl.data.partition import PartitionError, dirichlet_partition, iid_partition
from fl.registry import RegistryError
from models.tasks import TaskSpec


class _TestSplitView:
    """What both views offer from the central test split: batching, decoding and the server's data-free priors."""

    task: TaskSpec
    test: Dataset
    tokenizer: Any

    def test_labels(self) -> np.ndarray | None:
        raise NotImplementedError

    @staticmethod
    def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items into the batch dict of :mod:`models.tasks` (a picklable plain function)."""
        return collate(items)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids as text (attack artifacts); ids joined by spaces when the dataset has no tokenizer."""
        if self.tokenizer is None:
            return " ".join(map(str, token_ids))
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def label_prior(self) -> list[float] | None:
        """Class frequencies of the central test split: the label prior the server itself holds
        (it evaluates on that split), used for the data-free ``attack_label_baseline``."""
        test_labels = self.test_labels()
        if test_labels is None or self.task.kind == "lm" or self.task.num_classes <= 0:
            return None
        counts = np.bincount(test_labels, minlength=self.task.num_classes)[: self.task.num_classes]
        return (counts / max(counts.sum(), 1)).tolist() if counts.sum() else None

    def image_prior(self) -> torch.Tensor | None:
        """The mean image of the central test split (what the server holds), for ``attack_psnr_baseline``."""
        if self.task.kind != "image" or len(self.test) == 0:
            return None
        return torch.stack([self.test[i]["pixel_values"] for i in range(len(self.test))]).float().mean(0)

    def token_prior(self) -> torch.Tensor | None:
        """Each position's most frequent token in the central test split [L] (what the server holds), the data-free
        guess beside text attacks (``attack_token_baseline``)."""
        if self.task.kind not in ("text", "lm") or len(self.test) == 0:
            return None
        ids = torch.stack([self.test[i]["input_ids"] for i in range(len(self.test))])  # [N, L]
        return torch.mode(ids, dim=0).values  # [L]


@dataclass
class FederatedData(_TestSplitView):
    """One dataset split for federated learning (what a client process loads).

    ``test`` is the held-out central test split; client ``pid`` owns the items
    ``client_indices[pid]`` (indices into ``dataset``), of which a ``val_fraction`` share
    (seeded by ``(seed, pid)``) is its local validation set.
    """

    task: TaskSpec
    dataset: ArrayDataset
    test: Dataset
    client_indices: list[np.ndarray]
    val_fraction: float
    seed: int
    labels: np.ndarray | None = None
    tokenizer: Any = None

    def test_labels(self) -> np.ndarray | None:
        return None if self.labels is None else self.labels[np.asarray(self.test.indices, dtype=np.int64)]

    @property
    def num_partitions(self) -> int:
        return len(self.client_indices)

    def partition_indices(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices into ``dataset`` for client ``pid``."""
        if not 0 <= pid < self.num_partitions:
            raise DataError(f"partition id {pid} out of range; this federation has {self.num_partitions} partitions")
        idx = self.client_indices[pid]
        n_val = int(round(len(idx) * self.val_fraction))
        n_val = min(n_val, len(idx) - 1)  # keep >= 1 training item
        perm = np.random.default_rng([self.seed, pid]).permutation(idx)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def partition(self, pid: int) -> tuple[Dataset, Dataset]:
        """(client train, client val) datasets of client ``pid`` (val may be empty)."""
        train, val = self.partition_indices(pid)
        return Subset(self.dataset, train.tolist()), Subset(self.dataset, val.tolist())


@dataclass
class ServerData(_TestSplitView):
    """What the server holds of the data: a copy of the central test split (it evaluates on it and takes its
    data-free priors from it), the task and the tokenizer. Never the clients' partitions, nor the items behind
    them: an attack plugin runs in the server's process, and there it must find no victim's data (issue 16)."""

    task: TaskSpec
    test: ArrayDataset
    labels: np.ndarray | None = None  # of the test items
    tokenizer: Any = None

    def test_labels(self) -> np.ndarray | None:
        return self.labels


@lru_cache(maxsize=8)
def _load_raw(name: str, params_json: str) -> LoadedData:
    try:
        loaded = DATASETS.create(name, **json.loads(params_json))
    except RegistryError as exc:
        raise DataError(f"data.dataset: {exc}") from None
    if not isinstance(loaded, LoadedData):
        raise DataError(f"dataset {name!r} returned {type(loaded).__name__}, expected fl.data.LoadedData")
    return loaded


def load_dataset(name: str, params: dict[str, Any] | None = None) -> LoadedData:
    """The whole dataset ``name`` loaded with ``params`` (cached in-process)."""
    return _load_raw(name, json.dumps(params or {}, sort_keys=True))


def _test_split(n: int, labels: np.ndarray | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices; ``ceil(fraction * n)`` test items, stratified by label when labels exist.

    Stratification without scikit-learn (importing it costs seconds in every client
    process): items get the key (rank within its shuffled class + U[0,1)) / class size and
    the smallest keys form the test split, so every class gives a ``fraction`` share (+-1).
    """
    n_test = int(np.ceil(fraction * n))
    if not 0 < n_test < n:
        raise DataError(f"cannot hold out data.test_fraction={fraction} of {n} items; change data.test_fraction")
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    key = np.empty(n)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        key[idx] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    order = np.argsort(key, kind="stable")
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@lru_cache(maxsize=16)
def _load_federated(cfg_json: str, num_clients: int, seed: int) -> FederatedData:
    cfg = DataConfig.model_validate_json(cfg_json)
    loaded = load_dataset(cfg.dataset, cfg.params)
    n = len(loaded.data)
    labels = loaded.labels
    train_idx, test_idx = _test_split(n, labels, cfg.test_fraction, seed)
    try:
        if cfg.partition not in ("iid", "dirichlet"):  # a Flower Datasets partitioner (fl.data.flower_partition)
            from fl.data.flower_partition import flower_partition

            parts = flower_partition(cfg.partition, cfg.partition_params, None if labels is None else labels[train_idx],
                                     len(train_idx), num_clients, seed)
        elif cfg.partition == "iid":
            parts = iid_partition(len(train_idx), num_clients, seed)
        else:
            if labels is None:
                raise DataError(
                    f"dataset {cfg.dataset!r} has no labels to skew; use data.partition = 'iid'"
                )
            parts = dirichlet_partition(labels[train_idx], num_clients, cfg.alpha, seed)
    except (PartitionError, ValueError) as exc:
        raise DataError(f"partitioning {cfg.dataset!r}: {exc}") from None
    return FederatedData(
        task=loaded.task,
        dataset=loaded.data,
        test=Subset(loaded.data, test_idx.tolist()),
        client_indices=[train_idx[p] for p in parts],
        val_fraction=cfg.val_fraction,
        seed=seed,
        labels=labels,
        tokenizer=loaded.tokenizer,
    )


def load_federated(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Load ``cfg.dataset``, hold out the test split, partition the rest among ``num_clients``.

    Deterministic in ``(cfg, num_clients, seed)``; cached in-process on the config JSON.
    Raises :class:`DataError` (a ValueError) with a one-line fix for any bad input.
    """
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    return _load_federated(cfg.model_dump_json(), int(num_clients), int(seed))


def load_server_data(cfg: DataConfig, num_clients: int, seed: int) -> ServerData:
    """The server's view of ``load_federated(cfg, num_clients, seed)``: its test split, copied out of the whole
    dataset; then this process's caches are cleared (the preflight filled them), so once this returns nothing in
    the server's memory holds a client's items."""
    full = load_federated(cfg, num_clients, seed)  # the preflight's split, when it ran in this process
    if isinstance(full.dataset, ArrayDataset):
        idx = torch.as_tensor(np.asarray(full.test.indices, dtype=np.int64))
        test = ArrayDataset({k: v.index_select(0, idx).clone() for k, v in full.dataset.tensors.items()})
    else:  # a loader's own Dataset: its test items, stacked
        test = ArrayDataset(collate([full.test[i] for i in range(len(full.test))]))
    clear_caches()
    return ServerData(task=full.task, test=test, labels=full.test_labels(), tokenizer=full.tokenizer)


def clear_caches() -> None:
    """Forget every dataset and split this process loaded (``load_dataset``, ``load_federated``)."""
    _load_raw.cache_clear()
    _load_federated.cache_clear()

"""Partitioners: every item exactly once, deterministic, Dirichlet skew grows as alpha falls."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.data.partition import PartitionError, dirichlet_partition, iid_partition, label_skew


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(allidx) == n, "some item is missing or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_iid_exact_cover_balanced(n: int, k: int, seed: int) -> None:
    if n < k:
        with pytest.raises(PartitionError, match="fewer clients"):
            iid_partition(n, k, seed)
        return
    parts = iid_partition(n, k, seed)
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_deterministic_and_seed_dependent() -> None:
    a, b, c = iid_partition(100, 7, 3), iid_partition(100, 7, 3), iid_partition(100, 7, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 400),
    k=st.integers(1, 20),
    n_cls=st.integers(1, 8),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_exact_cover_min_size(n: int, k: int, n_cls: int, alpha: float, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(n_cls, size=n)
    parts = dirichlet_partition(labels, k, alpha, seed, min_size=1)
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_deterministic() -> None:
    labels = np.repeat(np.arange(10), 50)
    a = dirichlet_partition(labels, 8, 0.3, seed=11)
    b = dirichlet_partition(labels, 8, 0.3, seed=11)
    c = dirichlet_partition(labels, 8, 0.3, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    labels = np.repeat(np.arange(10), 200)
    skew = {a: np.mean([label_skew(dirichlet_partition(labels, 20, a, s), labels) for s in range(3)])
            for a in (0.05, 0.5, 5.0, 500.0)}
    assert skew[0.05] > skew[0.5] > skew[5.0] > skew[500.0]
    assert skew[500.0] < 0.1 and skew[0.05] > 0.6
    iid = iid_partition(len(labels), 20, 0)
    assert label_skew(iid, labels) < 0.15


def test_dirichlet_many_clients_tiny_alpha_terminates_nonempty() -> None:
    labels = np.random.default_rng(0).integers(10, size=3000)
    parts = dirichlet_partition(labels, 1000, 0.01, seed=0, min_size=2)
    _assert_exact_cover(parts, 3000)
    assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(5, dtype=int), 10, 0.5, 0), "fewer clients"),
        ((np.zeros(50, dtype=int), 2, 0.0, 0), "alpha must be > 0"),
        ((np.zeros((5, 2), dtype=int), 2, 0.5, 0), "1-D"),
    ],
)
def test_dirichlet_bad_input(args, match) -> None:
    with pytest.raises(PartitionError, match=match):
        dirichlet_partition(*args)


# --- Flower Datasets' partitioners through data.partition (fl.data.flower_partition) ----------------------------

def _federated(partition: str, params: dict | None = None, clients: int = 5, seed: int = 0):
    from fl.config import DataConfig
    from fl.data.federated import load_federated

    return load_federated(DataConfig(dataset="digits", partition=partition, partition_params=params or {}), clients,
                          seed)


def _train_labels(fd) -> list[np.ndarray]:
    return [fd.labels[idx] for idx in fd.client_indices]


@pytest.mark.parametrize("name, params", [
    ("flwr_iid", {}), ("flwr_dirichlet", {"alpha": 0.3, "min_partition_size": 5}),
    ("pathological", {"num_classes_per_partition": 2}), ("shard", {"num_shards_per_partition": 2}),
    ("linear", {}), ("square", {}), ("exponential", {}),
])
def test_flower_partitioners_cover_the_training_split_deterministically(name, params):
    fd = _federated(name, params)
    all_idx = np.concatenate(fd.client_indices)
    assert len(all_idx) == len(set(all_idx.tolist()))  # disjoint
    assert all(len(p) > 0 for p in fd.client_indices)
    again = _federated(name, params)  # a fresh load (the in-process cache keys on the config: same object)
    assert all(np.array_equal(a, b) for a, b in zip(fd.client_indices, again.client_indices))
    other = _federated(name, params, seed=1)
    if name not in ("linear", "square", "exponential"):  # sizes are fixed there, the shuffled members still move
        assert any(not np.array_equal(a, b) for a, b in zip(fd.client_indices, other.client_indices))


def test_flower_partitioners_keep_their_definitions():
    """What each partitioner promises, checked on fedprobe's digits: classes per client, size ratios."""
    for labels in _train_labels(_federated("pathological", {"num_classes_per_partition": 2})):
        assert len(np.unique(labels)) <= 2
    sizes = [len(p) for p in _federated("linear").client_indices]  # partition i ~ (i + 1)
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] == pytest.approx(5, rel=0.05)
    sizes = [len(p) for p in _federated("square").client_indices]  # ~ (i + 1)^2
    assert sizes[-1] / sizes[0] == pytest.approx(25, rel=0.1)
    iid = _train_labels(_federated("flwr_iid"))
    skewed = _train_labels(_federated("flwr_dirichlet", {"alpha": 0.05, "min_partition_size": 1}))
    assert label_skew([np.arange(len(x)) for x in iid], np.concatenate(iid)) < 0.2
    spread = lambda parts: np.mean([len(np.unique(p)) for p in parts])  # noqa: E731
    assert spread(skewed) < spread(iid)


def test_flower_partitioner_refusals():
    from fl.config import ConfigError, load_config
    from fl.data.base import DataError

    with pytest.raises(ValueError, match="data.partition 'nope' unknown"):
        _federated("nope")
    with pytest.raises(ValueError, match="partition_params apply to Flower"):
        _federated("iid", {"alpha": 1})
    with pytest.raises(DataError, match="num_classes_per_partition"):
        _federated("pathological", {})  # a required argument missing: named by Flower, one line
    with pytest.raises(DataError, match="makes 3 partitions, the federation has 5"):
        _federated("size", {"partition_sizes": [10, 10, 10]})
    with pytest.raises(DataError, match="not a subclass"):
        _federated("fl.data.partition:iid_partition")
    assert isinstance(ConfigError("x"), ValueError) and callable(load_config)

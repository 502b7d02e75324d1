"""digits_subset: digits restricted to some classes, relabelled in the given order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl.data import DATASETS, DataError, load_dataset


def test_keeps_only_the_classes_and_relabels_in_order() -> None:
    full = load_dataset("digits")
    sub = DATASETS.create("digits_subset", classes=[7, 2])
    assert sub.task.num_classes == 2 and sub.task.extra["class_names"] == ["7", "2"]
    assert len(sub.data) == int(np.sum(np.isin(full.labels, [7, 2])))
    assert np.array_equal(np.bincount(sub.labels), [np.sum(full.labels == 7), np.sum(full.labels == 2)])
    # the first "7" image of the subset is the first 7 of the full set (up to normalisation)
    raw_sub = sub.data.tensors["pixel_values"] * sub.task.std[0] + sub.task.mean[0]
    raw_full = full.data.tensors["pixel_values"] * full.task.std[0] + full.task.mean[0]
    first7 = int(np.flatnonzero(full.labels == 7)[0])
    assert torch.allclose(raw_sub[int(np.flatnonzero(sub.labels == 0)[0])], raw_full[first7], atol=1e-5)


def test_default_is_digits_5_to_9_and_disjoint_from_0_to_4() -> None:
    target, source = DATASETS.create("digits_subset"), DATASETS.create("digits_subset", classes=[0, 1, 2, 3, 4])
    assert target.task.extra["class_names"] == ["5", "6", "7", "8", "9"]
    assert len(target.data) + len(source.data) == 1797


@pytest.mark.parametrize("classes", [[], [3, 3], [10], ["5"], 5])
def test_bad_classes_are_one_line_errors(classes: object) -> None:
    with pytest.raises(DataError, match="digits_subset: classes"):
        DATASETS.create("digits_subset", classes=classes)

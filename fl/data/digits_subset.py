"""scikit-learn digits restricted to some classes (a pretraining task and a disjoint fine-tuning task).

``digits_subset(classes=[0, 1, 2, 3, 4])`` keeps those digits and relabels them 0..k-1 in the
order given (class names stay the digits, e.g. "5"). Issue 3's fine-tuning comparison pretrains a
ViT on digits 0-4 (``experiments/pretrain_base.py``) and fine-tunes it on digits 5-9, so the
pretrained base never saw the target classes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fl.data.base import DATASETS, DataError, LoadedData, image_data, resize_images
from fl.data.datasets import _load_digits


def _check_classes(classes: Sequence[int]) -> list[int]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise DataError(f"digits_subset: classes must be a non-empty list of digits 0-9, e.g. [5, 6, 7, 8, 9]; got {classes!r}")
    out = list(classes)
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9 for c in out):
        raise DataError(f"digits_subset: classes must be integers 0-9, got {out!r}")
    if len(set(out)) != len(out):
        raise DataError(f"digits_subset: classes must not repeat, got {out!r}")
    return out


@DATASETS.register("digits_subset")
def digits_subset(classes: Sequence[int] = (5, 6, 7, 8, 9), image_size: int = 8) -> LoadedData:
    """scikit-learn digits restricted to some classes, relabelled 0..k-1; params: classes ([5..9]), image_size (8)."""
    keep = _check_classes(classes)
    if not isinstance(image_size, int) or image_size < 4:
        raise DataError(f"digits_subset: image_size must be an integer >= 4, got {image_size!r}")
    images, target = _load_digits()
    mask = np.isin(target, keep)
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[keep] = np.arange(len(keep))
    x = (images[mask].astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = resize_images(x, image_size)
    return image_data(x, relabel[target[mask]], [str(c) for c in keep], "digits_subset")

"""Built-in image dataset: scikit-learn's handwritten digits (ships with scikit-learn, offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fl.data.base import DATASETS, DataError, LoadedData, image_data, resize_images


@DATASETS.register("digits")
def digits(image_size: int = 8) -> LoadedData:
    """scikit-learn 8x8 handwritten digits (1797 images, 10 classes); params: image_size (default 8)."""
    if not isinstance(image_size, int) or image_size < 4:
        raise DataError(f"digits: image_size must be an integer >= 4, got {image_size!r}")
    images, target = _load_digits()
    x = (images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = resize_images(x, image_size)
    return image_data(x, target, [str(i) for i in range(10)], "digits")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8], target [1797]) from the CSV scikit-learn ships.

    Read directly because ``import sklearn`` costs ~3 s, paid in every simulated client
    process; falls back to ``sklearn.datasets.load_digits`` if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        data = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target

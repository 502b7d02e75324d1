"""Built-in image dataset: scikit-learn's handwritten digits (ships with scikit-learn, offline)."""

from __future__ import annotations

import numpy as np

from fl.data.base import DATASETS, DataError, LoadedData, image_data, resize_images


@DATASETS.register("digits")
def digits(image_size: int = 8) -> LoadedData:
    """scikit-learn 8x8 handwritten digits (1797 images, 10 classes); params: image_size (default 8)."""
    from sklearn.datasets import load_digits

    if not isinstance(image_size, int) or image_size < 4:
        raise DataError(f"digits: image_size must be an integer >= 4, got {image_size!r}")
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = resize_images(x, image_size)
    return image_data(x, d.target, [str(i) for i in range(10)], "digits")

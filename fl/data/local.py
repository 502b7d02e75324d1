"""Loaders for data on local disk: an image folder, CSV / JSONL text, a saved Hugging Face dataset.

Nothing here downloads. Text without a ``tokenizer`` folder gets a word-level tokenizer
trained on the file itself (see :func:`fl.data.base.word_tokenizer`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fl.data.base import (
    DATASETS,
    DataError,
    LoadedData,
    encode_labels,
    image_data,
    load_tokenizer,
    text_data,
    word_tokenizer,
)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _existing(path: str, source: str, want_dir: bool) -> Path:
    if not path:
        raise DataError(f"{source}: set data.params.path to the {'folder' if want_dir else 'file'} to load")
    p = Path(path).expanduser()
    if want_dir and not p.is_dir():
        raise DataError(f"{source}: folder not found: {p} (set data.params.path to an existing folder)")
    if not want_dir and not p.is_file():
        raise DataError(f"{source}: file not found: {p} (set data.params.path to an existing file)")
    return p


def _pil_to_array(img: Any, mode: str, image_size: int) -> np.ndarray:
    """PIL image -> [C, S, S] float32 in [0, 1]."""
    from PIL import Image

    img = img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _check_mode(mode: str, source: str) -> None:
    if mode not in ("L", "RGB"):
        raise DataError(f"{source}: mode must be 'L' (grey) or 'RGB', got {mode!r}")


@DATASETS.register("image_folder")
def image_folder(path: str = "", image_size: int = 32, mode: str = "RGB") -> LoadedData:
    """images in PATH/<class name>/*.png|jpg|...; params: path, image_size (32), mode (RGB or L)."""
    from PIL import Image, UnidentifiedImageError

    _check_mode(mode, "image_folder")
    root = _existing(path, "image_folder", want_dir=True)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image_folder: no class sub-folders in {root} (expected {root}/<class name>/<image files>)")
    images, labels = [], []
    for y, d in enumerate(class_dirs):
        for f in sorted(d.rglob("*")):
            if f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
                continue
            try:
                with Image.open(f) as img:
                    images.append(_pil_to_array(img, mode, image_size))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"image_folder: cannot read image {f} ({exc}); remove or replace the file") from None
            labels.append(y)
    if not images:
        raise DataError(f"image_folder: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return image_data(np.stack(images), np.array(labels), [d.name for d in class_dirs], f"image_folder:{root}")


def _text_task(
    texts: Sequence[Any],
    raw_labels: Sequence[Any] | None,
    source: str,
    tokenizer: str,
    seq_len: int,
    kind: str,
    vocab_size: int,
) -> LoadedData:
    if kind not in ("text", "lm"):
        raise DataError(f"{source}: kind must be 'text' (classification) or 'lm' (causal LM), got {kind!r}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"{source}: row {bad} has a non-text value {texts[bad]!r} in the text column")
    tok = load_tokenizer(tokenizer) if tokenizer else word_tokenizer(texts, vocab_size=vocab_size)
    if raw_labels is None:
        labels, names = None, []
    else:
        labels, names = encode_labels(list(raw_labels), source)
    return text_data(texts, labels, tok, seq_len, kind, names, source)  # type: ignore[arg-type]


def _columns(rows: list[dict[str, Any]], text_column: str, label_column: str, kind: str, source: str):
    if not rows:
        raise DataError(f"{source}: no rows")
    cols = set(rows[0])
    need = [text_column] + ([label_column] if kind == "text" else [])
    missing = [c for c in need if c not in cols]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; columns are {', '.join(sorted(cols))} "
            "(set data.params.text_column / label_column)"
        )
    for i, r in enumerate(rows):
        if any(c not in r or r[c] is None for c in need):
            raise DataError(f"{source}: row {i} lacks a value for {', '.join(need)}")
    texts = [r[text_column] for r in rows]
    labels = [r[label_column] for r in rows] if label_column in cols else None
    return texts, labels


@DATASETS.register("text_csv")
def text_csv(
    path: str = "",
    text_column: str = "text",
    label_column: str = "label",
    tokenizer: str = "",
    seq_len: int = 64,
    kind: str = "text",
    vocab_size: int = 0,
) -> LoadedData:
    """a CSV file with header; params: path, text_column, label_column, tokenizer (folder), seq_len, kind."""
    p = _existing(path, "text_csv", want_dir=False)
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"text_csv: cannot parse {p} as UTF-8 CSV ({exc})") from None
    texts, labels = _columns(rows, text_column, label_column, kind, f"text_csv:{p}")
    return _text_task(texts, labels, f"text_csv:{p}", tokenizer, seq_len, kind, vocab_size)


@DATASETS.register("text_jsonl")
def text_jsonl(
    path: str = "",
    text_column: str = "text",
    label_column: str = "label",
    tokenizer: str = "",
    seq_len: int = 64,
    kind: str = "text",
    vocab_size: int = 0,
) -> LoadedData:
    """a JSON-lines file, one object per line; params as text_csv."""
    p = _existing(path, "text_jsonl", want_dir=False)
    rows = []
    try:
        with p.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"text_jsonl: line {n} of {p} is not a JSON object")
                    rows.append(row)
    except json.JSONDecodeError as exc:
        raise DataError(f"text_jsonl: line {n} of {p} is not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"text_jsonl: {p} is not UTF-8 text") from None
    texts, labels = _columns(rows, text_column, label_column, kind, f"text_jsonl:{p}")
    return _text_task(texts, labels, f"text_jsonl:{p}", tokenizer, seq_len, kind, vocab_size)


@DATASETS.register("pixel_csv")
def pixel_csv(path: str = "", label_column: str = "label", shape: list[int] | None = None,
              max_value: float = 255.0) -> LoadedData:
    """images as CSV rows (MNIST-CSV style): a label column, then one column per pixel; params: path,
    label_column, shape ([C, H, W]; default one grey square channel), max_value (255: pixels / 255 -> [0, 1]).
    A tabular CSV of F numeric features is shape [1, 1, F] (one mean/std for all features: scale them first)."""
    source = "pixel_csv"
    p = _existing(path, source, want_dir=False)
    if not max_value > 0:
        raise DataError(f"{source}: max_value must be > 0 (the largest pixel value, e.g. 255), got {max_value!r}")
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [r for r in reader if r]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{source}: cannot parse {p} as UTF-8 CSV ({exc})") from None
    if not header or label_column not in header:
        raise DataError(f"{source}: {p} has no {label_column!r} column in its header "
                        f"({', '.join((header or [])[:5])}{', ...' if header and len(header) > 5 else ''}); "
                        "set data.params.label_column")
    if not rows:
        raise DataError(f"{source}: {p} has a header but no rows")
    li = header.index(label_column)
    n_pix = len(header) - 1
    if shape is None:
        side = int(round(n_pix ** 0.5))
        if side * side != n_pix:
            raise DataError(f"{source}: {n_pix} pixel columns are not a square image; set data.params.shape = [C, H, W]")
        shape = [1, side, side]
    if len(shape) != 3 or any(int(d) < 1 for d in shape) or int(np.prod(shape)) != n_pix:
        raise DataError(f"{source}: shape {list(shape)} does not hold the {n_pix} pixel columns of {p} "
                        "(need [C, H, W] with C * H * W = the number of pixel columns)")
    try:
        pixels = np.array([[float(v) for j, v in enumerate(r) if j != li] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise DataError(f"{source}: a pixel value in {p} is not a number ({exc})") from None
    if pixels.shape[1] != n_pix:
        raise DataError(f"{source}: rows of {p} have {pixels.shape[1]} pixel values, the header names {n_pix}")
    raw = [r[li] for r in rows]
    try:
        raw = [int(v) for v in raw]  # numeric labels sort numerically
    except ValueError:
        pass
    labels, names = encode_labels(raw, f"{source}:{p}")
    images = np.clip(pixels / float(max_value), 0.0, 1.0).reshape(len(rows), *[int(d) for d in shape])
    return image_data(images, labels, names, f"{source}:{p}")


@DATASETS.register("hf_disk")
def hf_disk(
    path: str = "",
    split: str = "train",
    image_column: str = "",
    text_column: str = "",
    label_column: str = "label",
    image_size: int = 32,
    mode: str = "RGB",
    tokenizer: str = "",
    seq_len: int = 64,
    kind: str = "",
    vocab_size: int = 0,
) -> LoadedData:
    """a Hugging Face dataset written by save_to_disk; params: path, split, image_/text_/label_column, ..."""
    try:
        import datasets as hfds
    except ImportError:
        raise DataError("hf_disk needs the 'datasets' package: pip install 'datasets>=5.2,<6'") from None
    source = "hf_disk"
    root = _existing(path, source, want_dir=True)
    try:
        ds = hfds.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"hf_disk: {root} is not a dataset saved with save_to_disk ({str(exc).splitlines()[0]})") from None
    if isinstance(ds, hfds.DatasetDict):
        if split not in ds:
            raise DataError(f"hf_disk: split {split!r} not in {root}; choose data.params.split from {', '.join(ds)}")
        ds = ds[split]
    cols = list(ds.column_names)
    image_column = image_column or next((c for c in ("image", "img", "pixel_values") if c in cols), "")
    text_column = text_column or next((c for c in ("text", "sentence", "content") if c in cols), "")
    is_image = bool(image_column) and kind in ("", "image")
    if not is_image and not text_column:
        raise DataError(
            f"hf_disk: no image or text column found in {cols}; set data.params.image_column or text_column"
        )
    for c in [image_column if is_image else text_column] + ([label_column] if kind != "lm" else []):
        if c not in cols:
            raise DataError(f"hf_disk: column {c!r} not in {cols}; set data.params.*_column")
    if is_image:
        _check_mode(mode, source)
        from PIL import Image

        imgs = []
        for v in ds[image_column]:
            img = v if isinstance(v, Image.Image) else Image.fromarray(np.asarray(v, dtype=np.uint8))
            imgs.append(_pil_to_array(img, mode, image_size))
        labels, names = encode_labels(list(ds[label_column]), source)
        feat = ds.features.get(label_column)
        if getattr(feat, "names", None) and len(feat.names) >= len(names):  # ClassLabel: keep its names
            labels = np.asarray(ds[label_column], dtype=np.int64)
            names = list(feat.names)
        return image_data(np.stack(imgs), labels, names, f"{source}:{root}")
    raw = list(ds[label_column]) if label_column in cols else None
    return _text_task(list(ds[text_column]), raw, f"{source}:{root}", tokenizer, seq_len, kind or "text", vocab_size)

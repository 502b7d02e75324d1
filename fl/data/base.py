"""Shared pieces of the data layer: the dataset registry, in-memory datasets, collate.

A registered dataset is a loader function ``loader(**params) -> LoadedData``; its
docstring's first line is what ``fedprobe list`` shows. Loaders turn raw data into
fixed-shape tensors once (images normalised to [C, H, W], text tokenised and padded to
``seq_len``), so the batch format of :mod:`models.tasks` is a plain ``torch.stack``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fl.registry import Registry
from models.tasks import TaskKind, TaskSpec

DATASETS: Registry = Registry("dataset", entry_point_group="fedprobe.datasets")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class DataError(ValueError):
    """A dataset that cannot be loaded (one line: what is wrong and how to fix it)."""


class ArrayDataset(Dataset):
    """Items ``{key: tensor[i]}`` over a dict of tensors sharing their first dimension."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"tensors disagree on the number of items: {sizes}")
        self.tensors = tensors
        self._n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of items into the batch dict of :mod:`models.tasks`."""
    if not items:
        raise DataError("cannot collate an empty batch")
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@dataclass
class LoadedData:
    """What a dataset loader returns: the whole dataset as tensors, before any split.

    ``labels`` ([N] int) are the keys the Dirichlet partitioner and the stratified test
    split use (the class for classification; the source class for generated LM text;
    None when the data has no labels). ``tokenizer`` is the text tokenizer, if any.
    """

    task: TaskSpec
    data: ArrayDataset
    labels: np.ndarray | None
    tokenizer: Any = None


# --- images -------------------------------------------------------------------------


def image_data(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], source: str) -> LoadedData:
    """images: [N, C, H, W] floats in [0, 1]; normalised per channel with the data's mean/std."""
    if images.ndim != 4:
        raise DataError(f"{source}: expected images [N, C, H, W], got shape {images.shape}")
    x = torch.as_tensor(images, dtype=torch.float32)
    mean = x.mean(dim=(0, 2, 3))  # [C]
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-6)  # [C]
    x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    labels = np.asarray(labels, dtype=np.int64)
    task = TaskSpec(
        kind="image",
        num_classes=len(class_names),
        image_shape=tuple(int(s) for s in x.shape[1:]),  # type: ignore[arg-type]
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        extra={"source": source, "class_names": [str(c) for c in class_names]},
    )
    return LoadedData(task, ArrayDataset({"pixel_values": x, "labels": torch.from_numpy(labels)}), labels)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize [N, C, H, W] -> [N, C, size, size] (no-op when already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    t = torch.nn.functional.interpolate(
        torch.as_tensor(x, dtype=torch.float32), size=(size, size), mode="bilinear", align_corners=False
    )
    return t.numpy()


# --- text ---------------------------------------------------------------------------


def word_tokenizer(texts: Sequence[str], vocab_size: int = 0, min_frequency: int = 1, lowercase: bool = True) -> Any:
    """Train a word-level tokenizer on ``texts`` offline and wrap it for ``transformers``.

    Uses ``tokenizers`` (WordLevel + whitespace/punctuation split), adds
    [PAD]/[UNK]/[CLS]/[SEP]/[MASK] (ids 0-4) and the template ``[CLS] text [SEP]``.
    ``vocab_size`` 0 keeps every word seen ``min_frequency`` times.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs: dict[str, Any] = {"special_tokens": list(SPECIAL_TOKENS), "min_frequency": min_frequency}
    if vocab_size:
        kwargs["vocab_size"] = vocab_size
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(**kwargs))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(path: str) -> Any:
    """A tokenizer saved with ``save_pretrained`` in a local folder, or a named checkpoint's (``"minilm"``, see
    :mod:`models.pretrained`); never downloads."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from models.family import ModelError
    from models.pretrained import resolve_pretrained

    try:
        path = resolve_pretrained(path)
    except ModelError as exc:
        raise DataError(f"data.params.tokenizer: {exc}") from None
    if not Path(path).is_dir():
        raise DataError(f"tokenizer folder not found: {path} (give a folder written by tokenizer.save_pretrained)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        # GPT-2 style tokenizers have no pad token; reuse EOS so batches can be padded
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def text_data(
    texts: Sequence[str],
    labels: np.ndarray | None,
    tokenizer: Any,
    seq_len: int,
    kind: TaskKind,
    class_names: Sequence[str],
    source: str,
) -> LoadedData:
    """Tokenise to fixed length; kind "text" -> class labels [N], kind "lm" -> token labels [N, L]."""
    if kind not in ("text", "lm"):
        raise DataError(f"{source}: kind must be 'text' or 'lm', got {kind!r}")
    if seq_len < 2:
        raise DataError(f"{source}: seq_len must be >= 2, got {seq_len}")
    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    ids = enc["input_ids"].long()  # [N, L]
    mask = enc["attention_mask"].long()  # [N, L]
    tensors = {"input_ids": ids, "attention_mask": mask}
    if kind == "lm":
        tensors["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        if labels is None:
            raise DataError(f"{source}: a text classification task needs labels")
        tensors["labels"] = torch.as_tensor(labels, dtype=torch.long)
    special = {
        f"{name}_token_id": int(getattr(tokenizer, f"{name}_token_id"))
        for name in ("cls", "sep", "mask", "unk", "eos", "bos")
        if getattr(tokenizer, f"{name}_token_id", None) is not None
    }
    task = TaskSpec(
        kind=kind,
        num_classes=len(class_names) if kind == "text" else 0,
        seq_len=seq_len,
        vocab_size=len(tokenizer),
        pad_token_id=int(tokenizer.pad_token_id),
        extra={"source": source, "class_names": [str(c) for c in class_names], **special},
    )
    keys = None if labels is None else np.asarray(labels, dtype=np.int64)
    return LoadedData(task, ArrayDataset(tensors), keys, tokenizer)


def encode_labels(raw: Sequence[Any], source: str) -> tuple[np.ndarray, list[str]]:
    """Map arbitrary label values to 0..K-1 (sorted; ints sort numerically)."""
    if len(raw) == 0:
        raise DataError(f"{source}: no rows")
    try:
        classes = sorted(set(raw))
    except TypeError:
        classes = sorted({str(r) for r in raw})
        raw = [str(r) for r in raw]
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[r] for r in raw], dtype=np.int64), [str(c) for c in classes]

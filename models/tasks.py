"""What a model is trained to do, and the one loss every training loop uses.

A batch is a dict of tensors:

* image classification: ``pixel_values`` [B, C, H, W], ``labels`` [B]
* text classification:  ``input_ids`` [B, L], ``attention_mask`` [B, L], ``labels`` [B]
* causal LM:            ``input_ids`` [B, L], ``attention_mask`` [B, L], ``labels`` [B, L]
  (-100 marks positions not scored, e.g. padding)

Models are Hugging Face ``transformers`` models; ``model(**inputs).logits`` is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

TaskKind = Literal["image", "text", "lm"]


@dataclass(frozen=True)
class TaskSpec:
    """Shape facts a model builder and an attacker both need (no data)."""

    kind: TaskKind
    num_classes: int = 0  # classification tasks
    image_shape: tuple[int, int, int] = (0, 0, 0)  # (C, H, W) for images
    seq_len: int = 0  # token tasks
    vocab_size: int = 0
    pad_token_id: int = 0
    mean: tuple[float, ...] = ()  # image normalisation, for de-normalising reconstructions
    std: tuple[float, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        d = dict(d)
        for k in ("image_shape", "mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "inputs_embeds")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a batch that go into ``model(**inputs)``."""
    return {k: v for k, v in batch.items() if k in INPUT_KEYS}


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**model_inputs(batch))
    return out.logits if hasattr(out, "logits") else out


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """Unreduced loss, one value per example [B]."""
    if task.kind == "lm":
        # next-token prediction: logits [B, L, V] predict labels shifted by one
        shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
        shift_labels = labels[:, 1:].reshape(-1)
        tok = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
        tok = tok.view(labels.size(0), -1)
        counts = (labels[:, 1:] != -100).sum(1).clamp(min=1)
        return tok.sum(1) / counts
    return F.cross_entropy(logits, labels, reduction="none")


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, logits) for one batch."""
    logits = logits_of(model, batch)
    return per_example_loss(logits, batch["labels"], task).mean(), logits

"""What a model is trained to do, and the one loss every training loop uses.

A batch is a dict of tensors:

* image classification: ``pixel_values`` [B, C, H, W], ``labels`` [B]
* text classification:  ``input_ids`` [B, L], ``attention_mask`` [B, L], ``labels`` [B]
* causal LM:            ``input_ids`` [B, L], ``attention_mask`` [B, L], ``labels`` [B, L]
  (-100 marks positions not scored, e.g. padding)

Hugging Face ``transformers`` models are called with keywords, ``model(**inputs).logits``; a plain
``nn.Module`` (a user's CNN) is called as ``model(x)`` and returns logits: the task says which
(``TaskSpec.call``), so no model needs a shim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

TaskKind = Literal["image", "text", "lm"]
CallStyle = Literal["keywords", "positional"]


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
    # how the model is called: "keywords" = model(pixel_values=x) / model(input_ids=..., attention_mask=...)
    # (transformers); "positional" = model(x) with x the batch's main input (a plain nn.Module returning logits)
    call: CallStyle = "keywords"
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


def call_args(inputs: dict[str, torch.Tensor], task: "TaskSpec | None" = None
              ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(args, kwargs) of the model call for ``inputs`` under ``task.call`` (keywords when no task is given)."""
    inputs = model_inputs(inputs)
    if task is None or task.call == "keywords":
        return (), inputs
    key = "pixel_values" if "pixel_values" in inputs else "input_ids" if "input_ids" in inputs else next(iter(inputs))
    return (inputs[key],), {}


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor], task: "TaskSpec | None" = None) -> torch.Tensor:
    args, kwargs = call_args(batch, task)
    out = model(*args, **kwargs)
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
    logits = logits_of(model, batch, task)
    return per_example_loss(logits, batch["labels"], task).mean(), logits


QUERY_SUFFIXES = ("q_proj", "query")  # transformers 5 / 4 names of the attention query projection
KEY_SUFFIXES = ("k_proj", "key")


def first_attention_projections(model: nn.Module) -> tuple[str, str]:
    """Names of the first attention layer's query and key projections (``nn.Linear`` modules)."""
    mods = dict(model.named_modules())
    q = next((n for n, m in mods.items() if n.endswith(QUERY_SUFFIXES) and isinstance(m, nn.Linear)), "")
    k = next((n for n, m in mods.items() if n.endswith(KEY_SUFFIXES) and isinstance(m, nn.Linear)
              and n.rsplit(".", 1)[0] == q.rsplit(".", 1)[0]), "")
    if not q or not k:
        raise ValueError("the model has no query/key projection (*q_proj / *query nn.Linear) to share attention from")
    return q, k


@torch.no_grad()
def first_layer_attention(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention maps [B, H, n, n], the layer's input [B, n, d]) of the first attention layer on ``batch``.

    The maps are what a split-learning-like client mode shares with the server; the input
    (the query projection's input) is the ground truth an attention-inversion attack is scored on.
    [project's choice] The maps are softmax(q k^T * scaling) per head with q, k recomputed by the
    layer's own projections from the captured input -- the standard kernel's maths -- rather than
    read from ``output_attentions`` or from hooks on the projections' outputs, both of which gave
    maps that did not match the layer's softmax when checked here (transformers 5.24; cause not
    found). Padding masks are not applied (image tasks).
    """
    q_name, k_name = first_attention_projections(model)
    mods = dict(model.named_modules())
    parent = mods[q_name.rsplit(".", 1)[0]] if "." in q_name else model
    captured: dict[str, torch.Tensor] = {}
    hook = mods[q_name].register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0].detach().clone()))
    try:
        model(**model_inputs(batch))
    finally:
        hook.remove()
    x = captured["x"]  # [B, n, d]
    heads = int(getattr(parent, "num_heads", 0) or getattr(getattr(model, "config", None), "num_attention_heads", 0))
    q, k = mods[q_name](x), mods[k_name](x)  # [B, n, H * dh], recomputed from the captured input
    B, n, width = q.shape
    dh = width // heads
    scaling = float(getattr(parent, "scaling", dh**-0.5))
    qh, kh = q.view(B, n, heads, dh).transpose(1, 2), k.view(B, n, heads, dh).transpose(1, 2)  # [B, H, n, dh]
    return torch.softmax(qh @ kh.transpose(-1, -2) * scaling, dim=-1), x

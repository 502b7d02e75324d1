"""Built-in model families: ViT (images), BERT (text classification), GPT-2 (LM and text).

Sizes are deliberately small so federated simulations run on a laptop CPU:

======  ===========  ========  ======  =====
family  size         hidden    layers  heads
======  ===========  ========  ======  =====
all     tiny         64        2       4 (bert/gpt2: 2)
all     small        128       4       4
======  ===========  ========  ======  =====

ViT patches: the smallest patch size giving at most 4 (tiny: a 2x2 grid) or 16 (small)
patches, e.g. 4x4 patches on 8x8 digits; override with ``model.params.patch_size``. ViT
weights start with ``initializer_range = 0.1``: with the usual 0.02 the CLS token's
attention stays near uniform and a tiny ViT on digits needs many more rounds (measured:
3 FedAvg rounds, 10 clients: 0.66-0.74 test accuracy at 0.02, 0.90-0.92 at 0.1).

All dropout is 0 by default (set e.g. ``model.params.hidden_dropout_prob``): gradient
inversion attacks and DP accounting assume a deterministic forward pass.
"""

from __future__ import annotations

import math
from typing import Any

from models.family import MODELS, ModelError, ModelFamily
from models.tasks import TaskSpec


def patch_size_for(height: int, width: int, max_patches: int) -> int:
    """Smallest patch size dividing both sides with at most ``max_patches`` patches."""
    g = math.gcd(height, width)
    for p in range(1, g + 1):
        if g % p == 0 and (height // p) * (width // p) <= max_patches:
            return p
    return g


@MODELS.register("vit")
class ViTFamily(ModelFamily):
    """ViT image classifier (transformers ViTForImageClassification); input pixel_values."""

    kinds = ("image",)
    sizes = {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_patches=4),
        "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, max_patches=16),
    }

    def config_class(self) -> type:
        from transformers import ViTConfig

        return ViTConfig

    def model_class(self, task: TaskSpec) -> type:
        from transformers import ViTForImageClassification

        return ViTForImageClassification

    def check_task(self, task: TaskSpec) -> None:
        super().check_task(task)
        _, h, w = task.image_shape
        if h != w:
            raise ModelError(f"vit needs square images, got {h}x{w}; set data.params.image_size")

    def config(self, size: str, task: TaskSpec) -> Any:
        s = dict(self.sizes[size])
        c, h, w = task.image_shape
        self.check_task(task)
        patch = patch_size_for(h, w, s.pop("max_patches"))
        return self.config_class()(
            **s,
            image_size=h,
            patch_size=patch,
            encoder_stride=patch,
            num_channels=c,
            num_labels=task.num_classes,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            initializer_range=0.1,  # 0.02 leaves attention ~uniform for many rounds on small data (measured)
        )

    def fit_pretrained(self, config: Any, task: TaskSpec) -> None:
        c, h, _ = task.image_shape
        if (config.num_channels, config.image_size) != (c, h):
            raise ModelError(
                f"model.pretrained ViT takes {config.num_channels}x{config.image_size}px images, the data has "
                f"{c}x{h}px; set data.params.image_size / mode to match"
            )
        super().fit_pretrained(config, task)


def _check_vocab(config: Any, task: TaskSpec) -> None:
    if config.vocab_size < task.vocab_size:
        raise ModelError(
            f"model.pretrained has vocab_size {config.vocab_size} < the tokenizer's {task.vocab_size}; "
            "use the tokenizer saved with the model (data.params.tokenizer)"
        )


@MODELS.register("bert")
class BertFamily(ModelFamily):
    """BERT encoder classifier (transformers BertForSequenceClassification); input_ids + attention_mask."""

    kinds = ("text",)
    sizes = {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
        "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    }

    def config_class(self) -> type:
        from transformers import BertConfig

        return BertConfig

    def model_class(self, task: TaskSpec) -> type:
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification

    def config(self, size: str, task: TaskSpec) -> Any:
        return self.config_class()(
            **self.sizes[size],
            vocab_size=task.vocab_size,
            max_position_embeddings=max(task.seq_len, 8),
            pad_token_id=task.pad_token_id,
            num_labels=task.num_classes,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )

    def fit_pretrained(self, config: Any, task: TaskSpec) -> None:
        _check_vocab(config, task)
        super().fit_pretrained(config, task)


@MODELS.register("gpt2")
class GPT2Family(ModelFamily):
    """GPT-2 decoder: GPT2LMHeadModel for lm tasks, GPT2ForSequenceClassification for text."""

    kinds = ("lm", "text")
    sizes = {
        "tiny": dict(n_embd=64, n_layer=2, n_head=2),
        "small": dict(n_embd=128, n_layer=4, n_head=4),
    }

    def config_class(self) -> type:
        from transformers import GPT2Config

        return GPT2Config

    def model_class(self, task: TaskSpec) -> type:
        from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

        return GPT2LMHeadModel if task.kind == "lm" else GPT2ForSequenceClassification

    def config(self, size: str, task: TaskSpec) -> Any:
        bos = task.extra.get("bos_token_id", task.extra.get("cls_token_id", task.pad_token_id))
        eos = task.extra.get("eos_token_id", task.extra.get("sep_token_id", task.pad_token_id))
        return self.config_class()(
            **self.sizes[size],
            vocab_size=task.vocab_size,
            n_positions=max(task.seq_len, 8),
            pad_token_id=task.pad_token_id,  # GPT2ForSequenceClassification pools the last non-pad token
            bos_token_id=bos,
            eos_token_id=eos,
            num_labels=max(task.num_classes, 1),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )

    def fit_pretrained(self, config: Any, task: TaskSpec) -> None:
        _check_vocab(config, task)
        if config.pad_token_id is None:
            config.pad_token_id = task.pad_token_id
        super().fit_pretrained(config, task)

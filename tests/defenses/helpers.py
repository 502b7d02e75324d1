"""Tiny offline models, data and a local-training loop that calls the defense hooks like fl.training."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils.data import DataLoader

from defenses.base import ClientContext, Defense
from models.tasks import TaskSpec, logits_of, per_example_loss

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny(family: str, seed: int = 0) -> tuple[torch.nn.Module, TaskSpec, list[dict[str, torch.Tensor]]]:
    """(model, task, 16 examples) for family in bert, vit, gpt2; every dropout is 0."""
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, ViTConfig,
                              ViTForImageClassification)

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32,
                                                         max_position_embeddings=16, num_labels=3, **NO_DROPOUT))
        data = [{"input_ids": torch.randint(0, 40, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
                 "labels": torch.tensor(i % 3)} for i in range(16)]
        return model, TaskSpec("text", num_classes=3, seq_len=8, vocab_size=40), data
    if family == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                    num_labels=3, **NO_DROPOUT))
        data = [{"pixel_values": torch.randn(1, 8, 8, generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
        return model, TaskSpec("image", num_classes=3, image_shape=(1, 8, 8)), data
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=0, pad_token_id=0))
        data = []
        for i in range(16):
            ids = torch.randint(1, 40, (8,), generator=g)
            labels = ids.clone()
            labels[6:] = -100  # padding is never scored
            data.append({"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels})
        return model, TaskSpec("lm", seq_len=8, vocab_size=40), data
    raise ValueError(family)


def make_ctx(model: torch.nn.Module, task: TaskSpec, data: list, batch_size: int = 4, lr: float = 0.1,
             state: dict | None = None, server_round: int = 1, local_steps: int = 0, shuffle: bool = False) -> ClientContext:
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = local_steps or len(loader)
    return ClientContext(model=model, optimizer=opt, loader=loader, server_round=server_round, partition_id=0,
                         num_examples=len(data), sample_rate=min(1.0, batch_size / max(len(data), 1)), local_steps=steps, epochs=1,
                         device=torch.device("cpu"), task=task, sampled_fraction=1.0, state=dict(state or {}))


def run_round(ctx: ClientContext, defenses: list[Defense]) -> dict[str, torch.Tensor]:
    """The fl.training loop, in short: returns the defended update (trainable params, original names)."""
    model = ctx.model
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    for d in defenses:
        d.setup(ctx)
    step = 0
    while step < ctx.local_steps:
        for batch in ctx.loader:
            if step >= ctx.local_steps:
                break
            step += 1
            if len(batch["labels"]) == 0:
                continue
            per_example = per_example_loss(logits_of(ctx.model, batch), batch["labels"], ctx.task)
            loss = per_example.mean()
            for d in defenses:
                loss = d.loss(loss, ctx, batch, per_example)
            ctx.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctx.optimizer.step()
    for d in defenses:
        d.after_training(ctx)
    update = {k: v.detach() - start[k] for k, v in model.named_parameters() if v.requires_grad}
    for d in defenses:
        update = d.transform_update(update, ctx)
    return update


def fresh_ctx(**kw: Any) -> ClientContext:
    """A context for hooks that only need the round bookkeeping (transform_update, accounting)."""
    model = torch.nn.Linear(2, 2)
    return make_ctx(model, TaskSpec("image", num_classes=2), [{"pixel_values": torch.zeros(2), "labels": torch.tensor(0)}] * 4, **kw)


def stack(data: list[dict[str, torch.Tensor]], n: int = 4) -> dict[str, torch.Tensor]:
    """The first ``n`` examples as one batch (what ``make_ctx``'s unshuffled loader yields first at its default
    batch size)."""
    return {k: torch.stack([d[k] for d in data[:n]]) for k in data[0]}


def per_example_grads(model: torch.nn.Module, task: TaskSpec, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]} gradients of each trainable parameter, one backward per single example (the reference
    Opacus's per-sample gradients must equal); leaves the model's grads zeroed."""
    ref: list[dict[str, torch.Tensor]] = []
    for i in range(len(batch["labels"])):
        model.zero_grad()
        bi = {k: v[i:i + 1] for k, v in batch.items()}
        per_example_loss(logits_of(model, bi), bi["labels"], task).mean().backward()
        ref.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    return {n: torch.stack([r[n] for r in ref]) for n in ref[0]}

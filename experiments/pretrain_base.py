"""Pretrain a small ViT backbone offline, for issue 3's fine-tuning comparison (experiment 1).

PEFT methods (NTK-Attention, LoRA, P-Tuning v2) adapt a *pretrained* base, and nothing may download at
run time, so this script makes one here: it trains the project's ViT (``model.family = "vit"``) on
scikit-learn digits **0-4** (``digits_subset``, classes [0, 1, 2, 3, 4]), with every parameter trainable,
and writes the **backbone only** (``ViTModel``: patch embedding, encoder, final layer norm; no
classifier) with ``save_pretrained``. The fine-tuning task is digits **5-9** (``digits_subset``
default), which the backbone never saw; ``model.pretrained = <out>`` loads it with a freshly
initialised (seeded) head of the target task's size, so every arm starts from the same weights.

    python -m experiments.pretrain_base --out fedprobe-output/pretrained/vit-tiny-digits04

The folder is not committed (``fedprobe-output/`` is git-ignored); rerun this to recreate it.
Full-batch-free plain Adam loop, one CPU thread, about 10-60 s for ``tiny`` on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from fl.config import ModelConfig

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)


def pretrain_base(
    out: str | Path,
    classes: Sequence[int] = PRETRAIN_CLASSES,
    size: str = "tiny",
    epochs: int = 40,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: float = 0.2,
) -> dict[str, Any]:
    """Train a ViT on ``digits_subset(classes)`` and save its backbone to ``out``; return a summary dict.

    ``holdout`` of the images (stratified) are kept out of training to report accuracy. The budget is
    ``epochs`` only (no wall-clock cap), so the same arguments give the same backbone on a busy machine too.
    """
    from fl.data import DATASETS, collate
    from models import build_model
    from models.tasks import logits_of, per_example_loss

    if epochs < 1 or not 0 < holdout < 1:
        raise ValueError(f"need epochs >= 1 and 0 < holdout < 1, got epochs={epochs}, holdout={holdout}")
    data = DATASETS.create("digits_subset", classes=list(classes))
    task = data.task
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[: int(round(holdout * np.sum(data.labels == c)))]
                               for c in range(task.num_classes)])
    train_idx = np.setdiff1d(np.arange(len(data.data)), test_idx)
    train, test = Subset(data.data, train_idx.tolist()), Subset(data.data, test_idx.tolist())

    model = build_model(ModelConfig(family="vit", size=size), task, seed=seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    t0, done, loss_v = time.perf_counter(), 0, float("nan")
    for _ in range(epochs):
        for batch in loader:
            loss = per_example_loss(logits_of(model, batch), batch["labels"], task).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
        done += 1
    model.eval()
    with torch.no_grad():
        batch = collate([test[i] for i in range(len(test))])
        acc = float((logits_of(model, batch).argmax(-1) == batch["labels"]).float().mean())

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.vit.save_pretrained(out)  # backbone only: the target task gets a fresh head
    summary = {"task": f"digits_subset classes={list(classes)}", "size": size, "epochs": done, "seed": seed,
               "lr": lr, "batch_size": batch_size, "train_examples": len(train), "holdout_examples": len(test),
               "final_train_loss": loss_v, "holdout_accuracy": acc, "seconds": time.perf_counter() - t0,
               "parameters": sum(p.numel() for p in model.vit.parameters())}
    (out / "pretraining.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fedprobe-output/pretrained/vit-tiny-digits04", help="folder to save_pretrained into")
    ap.add_argument("--classes", type=int, nargs="+", default=list(PRETRAIN_CLASSES))
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = pretrain_base(args.out, args.classes, args.size, args.epochs, args.batch_size, args.lr, args.seed)
    print(json.dumps(summary, indent=2))
    print(f"saved the backbone to {args.out}; use it with --set model.pretrained={args.out}")


if __name__ == "__main__":
    main()

"""Offline training of the in-context learner on balanced prompts (fixed seed, cached)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from models.icl.model import ICLModelConfig, ICLTransformer
from models.icl.tasks import ICLTask, sample_training_batch


def output_loss(pred: torch.Tensor, y: torch.Tensor, loss: str, reduction: str = "mean") -> torch.Tensor:
    """ℓ(ŷ, y): squared error (``mse``) or logistic loss on y ∈ {-1, +1} (``bce``)."""
    if loss == "mse":
        return F.mse_loss(pred, y, reduction=reduction)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(pred, (y > 0).to(pred.dtype), reduction=reduction)
    raise ValueError(f"loss must be 'mse' or 'bce', got {loss!r}")


def _cache_path(cache_dir: Path, task: ICLTask, cfg: ICLModelConfig, hp: dict) -> Path:
    key = json.dumps({"task": asdict(task), "model": cfg.to_dict(), **hp}, sort_keys=True)
    return cache_dir / f"icl-{task.kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def train_icl_model(task: ICLTask, cfg: ICLModelConfig | None = None, *, steps: int = 3000, batch: int = 128,
                    lr: float = 1e-3, seed: int = 0, cache_dir: str | Path | None = None,
                    verbose: bool = False) -> ICLTransformer:
    """Train ``ICLTransformer`` to predict y_q from (x_1, y_1, …, x_k, y_k, x_q) on balanced prompts.

    Every row of a batch is a fresh task β, k examples and one query from D_val; k is drawn
    uniformly from [1, m] per batch so that every prompt length is trained.
    With ``cache_dir`` the weights are stored under a key of (task, config, hyper-parameters)
    and loaded instead of retrained. Returns the model in eval mode with gradients off.
    """
    cfg = cfg or ICLModelConfig(dim=task.dim, n_examples=task.n_examples)
    if (cfg.dim, cfg.n_examples) != (task.dim, task.n_examples):
        raise ValueError(f"model (dim={cfg.dim}, n_examples={cfg.n_examples}) does not match "
                         f"task (dim={task.dim}, n_examples={task.n_examples})")
    hp = {"steps": steps, "batch": batch, "lr": lr, "seed": seed}
    path = _cache_path(Path(cache_dir), task, cfg, hp) if cache_dir is not None else None
    torch.manual_seed(seed)
    model = ICLTransformer(cfg)
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return _freeze(model)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for step in range(steps):
        k = int(torch.randint(1, task.n_examples + 1, (), generator=gen))
        xs, ys, xq, yq = sample_training_batch(task, batch, gen, k)
        loss = output_loss(model(xs, ys, xq), yq, task.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if verbose and (step % 500 == 0 or step == steps - 1):
            print(f"[icl-train {task.kind}] step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return _freeze(model)


def _freeze(model: ICLTransformer) -> ICLTransformer:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

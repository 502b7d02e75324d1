"""Baselines that adapt the in-context learner on the same validation set RICL uses.

* :func:`fine_tune`: classic fine-tuning, all parameters θ of a copy of the model trained
  on the validation points with the (biased) prompt as context, w = 1.
* :func:`prefix_tune`: k prefix vectors before the prompt trained with θ frozen (see
  :class:`models.icl.model.ICLTransformer`).

Both minimise the same mean validation loss as RICL with Adam for a fixed number of
steps, so the comparison is at equal data and similar compute.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from models.icl.model import ICLTransformer
from models.icl.reweight import LossName, ValSet
from models.icl.tasks import Prompt
from models.icl.train import output_loss

Predictor = Callable[[torch.Tensor], torch.Tensor]  # xq [n, d] -> ŷ [n]


def fine_tune(model: ICLTransformer, prompt: Prompt, val: ValSet, *, loss: LossName = "mse", steps: int = 100,
              lr: float = 1e-4) -> Predictor:
    """Fine-tune a copy of ``model`` on the validation set with ``prompt`` as context."""
    tuned = copy.deepcopy(model)
    params = [p for n, p in tuned.named_parameters() if n != "gpt2.wpe.weight"]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    xq, yq = val
    tuned.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        output_loss(tuned.predict(prompt, xq), yq, loss).backward()
        opt.step()
    tuned.eval()
    for p in params:
        p.requires_grad_(False)
    return lambda x: tuned.predict(prompt, x)


def prefix_tune(model: ICLTransformer, prompt: Prompt, val: ValSet, *, loss: LossName = "mse", n_prefix: int = 4,
                steps: int = 100, lr: float = 1e-2, seed: int = 0) -> Predictor:
    """Learn ``n_prefix`` prefix embeddings (θ frozen), initialised near zero."""
    g = torch.Generator().manual_seed(seed)
    prefix = (0.01 * torch.randn(n_prefix, model.cfg.n_embd, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([prefix], lr=lr)
    xq, yq = val
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        output_loss(model.predict(prompt, xq, prefix=prefix), yq, loss).backward()
        opt.step()
    P = prefix.detach()
    return lambda x: model.predict(prompt, x, prefix=P)

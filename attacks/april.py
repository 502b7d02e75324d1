"""APRIL-style closed-form recovery of a ViT's input from its position-embedding update.

Lu et al. (CVPR 2022, "APRIL: Finding the Achilles' heel on privacy for vision
transformers") observe that a learnable position embedding is added to the patch
embeddings, so its gradient is the gradient at the embedding layer's output. For the
patch projection z_t = W p_t + b + pos_t (p_t the t-th flattened patch, W [D, P]):

    dL/dpos_t = delta_t                dL/dW = sum_t delta_t p_t^T = Delta^T Patches

so with Delta [N, D] read off the position-embedding gradient, the patches solve the
linear system Delta^T Patches = dL/dW (least squares; exact when the N patch rows of
Delta are independent, i.e. N <= D). [derived] Both updates are the same linear
combination of the step gradients for plain SGD and SGD with momentum, so the solve is
unchanged by the learning rate, by local steps on one example (FedAvg), and by any
scaling of the whole update (per-example or update clipping): it is scale-invariant by
construction. It assumes one example: with several, the solve returns a
Delta-weighted blend of their patches (returned once per example; the scores show it).
Adam's per-coordinate scaling breaks the linear relation. Labels come from the
output-bias gradient (iDLG).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from attacks.base import ATTACKS, Attack, Observation, Reconstruction
from attacks.gradients import examples_touched, infer_labels


def _find(params: dict[str, torch.Tensor], pos_name: str, proj_name: str) -> tuple[str, str]:
    pos = pos_name or next((k for k in params if k.endswith("position_embeddings")), "")
    proj = proj_name or next((k for k in params if "patch_embed" in k and k.endswith("weight") and params[k].dim() == 4), "")
    if not pos or not proj:
        raise ValueError("april needs a ViT with a learnable position embedding (*position_embeddings) and a "
                         "convolutional patch projection (*patch_embeddings*.weight [D, C, p, p]); "
                         "name them with position_embeddings= and patch_projection=")
    return pos, proj


@ATTACKS.register("april")
class APRIL(Attack):
    """Closed-form ViT input recovery from the position-embedding and patch-projection updates."""

    def __init__(self, position_embeddings: str = "", patch_projection: str = "", rcond: float = 1e-10,
                 **params: Any) -> None:
        super().__init__(**params)
        if not rcond > 0:
            raise ValueError(f"april rcond must be > 0, got {rcond!r}")
        self.pos_name, self.proj_name, self.rcond = position_embeddings, patch_projection, float(rcond)

    def check_model(self, params: dict[str, torch.Tensor]) -> None:
        missing = [n for n in (self.pos_name, self.proj_name) if n and n not in params]
        if missing:
            raise ValueError(f"april: {missing} not among the model's trainable parameters; check "
                             "position_embeddings / patch_projection")
        _find(params, self.pos_name, self.proj_name)

    def attack(self, obs: Observation) -> Reconstruction:
        t0 = time.perf_counter()
        c, h, w = obs.task.image_shape
        if c * h * w == 0:
            raise ValueError("april attacks image tasks; it needs task.image_shape (C, H, W)")
        upd = {k: v.detach().double().cpu() for k, v in obs.update().items()}
        pos, proj = _find(upd, self.pos_name, self.proj_name)
        W = upd[proj]  # [D, C, p, p]
        D, p = W.shape[0], W.shape[-1]
        gh, gw = h // p, w // p
        N = gh * gw
        dpos = upd[pos].reshape(-1, D)  # [1 + N, D] with a CLS row first, or [N, D]
        delta = dpos[dpos.shape[0] - N:]  # [N, D]: the patch tokens' rows
        dW = W.reshape(D, -1)  # [D, C p p]
        patches = torch.linalg.lstsq(delta.T, dW, rcond=self.rcond, driver="gelsd").solution  # [N, C p p]
        resid = float((delta.T @ patches - dW).norm() / dW.norm().clamp_min(1e-30))
        img = patches.reshape(gh, gw, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, gh * p, gw * p)
        n = examples_touched(obs)
        inputs = img.float().expand(n, c, h, w).clone()
        labels = infer_labels(obs, n)
        return Reconstruction(inputs=inputs, labels=None if labels is None else labels.cpu(), metrics={
            "solve_residual": resid, "solve_rank": float(torch.linalg.matrix_rank(delta)),
            "attack_seconds": time.perf_counter() - t0})

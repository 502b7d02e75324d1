"""RICL and LARICL: reweighted in-context learning (Chu, Song, Yang, arXiv 2310.03331).

Notation (spec section 8): a prompt has m examples (x_i, y_i) with content
embeddings e_i; reweighting feeds w_i · e_i, so the model output for a query q is
ŷ_q(w) = F_θ([w_1 e_1, …, w_m e_m, e_q]) with θ frozen. A *model* here is anything
with ``predict(prompt, xq, w) -> ŷ`` where w is [m] (shared) or [n_q, m] (one row
per query; rows must not interact, which lets one backward pass give the Jacobian).

Validation objective (unbiased validation set V of n points from D_val, see
``models.icl.tasks``)::

    L_V(w) = (1/n) [ Σ_{(q, y) ∈ V} ℓ(ŷ_q(w), y) + λ ‖w − 1‖² ]

with ℓ the squared error (regression) or the logistic loss on a logit
(classification). The paper's part [paper]: one weight per in-context example
multiplying its embedding, learned on an unbiased validation set with the model
frozen, by gradient descent. This project's choices [derived]: the exact objective
above (sum form of the spec scaled by 1/n, so λ means the same in RICL and LARICL),
positivity by w = softplus(v), optional normalisation Σ w_i = m, Adam or L-BFGS on v.

LARICL [derived]: linearise ŷ(w) ≈ ŷ(1) + J (w − 1), J = ∂ŷ/∂w [n, m], and minimise
the objective above for the linear model. For squared error this is the closed form
w = 1 + (JᵀJ + λI)⁻¹ Jᵀ (y − ŷ(1)); for the logistic loss it is the minimiser found by
Newton iterations on the (convex) linearised objective, whose first step is the same
formula with Gauss–Newton weights. Weights are then clipped to w ≥ ``w_min``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from models.icl.tasks import Prompt
from models.icl.train import output_loss

LossName = Literal["mse", "bce"]
ValSet = tuple[torch.Tensor, torch.Tensor]  # (xq [n, d], yq [n])
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(v) = 1


class Reweightable(Protocol):
    def predict(self, prompt: Prompt, xq: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class ReweightResult:
    """Learned weights w [m] and the validation objective at w and at w = 1."""

    weights: torch.Tensor
    val_loss: float
    val_loss_uniform: float
    history: list[float] = field(default_factory=list)


def _check(prompt: Prompt, val: ValSet, loss: str, lam: float) -> None:
    if loss not in ("mse", "bce"):
        raise ValueError(f"loss must be 'mse' or 'bce', got {loss!r}")
    if lam < 0:
        raise ValueError(f"ridge lam must be >= 0, got {lam}")
    xq, yq = val
    if xq.ndim != 2 or yq.shape != xq.shape[:1] or xq.shape[0] == 0:
        raise ValueError(f"val set must be (xq [n, d], yq [n]) with n >= 1, got {tuple(xq.shape)}, {tuple(yq.shape)}")
    if xq.shape[1] != prompt.xs.shape[1]:
        raise ValueError(f"val inputs have dim {xq.shape[1]} but the prompt has dim {prompt.xs.shape[1]}")


def val_objective(model: Reweightable, prompt: Prompt, val: ValSet, w: torch.Tensor, loss: LossName = "mse",
                  lam: float = 0.0) -> torch.Tensor:
    """L_V(w) = (1/n)[Σ ℓ(ŷ_q(w), y_q) + λ‖w − 1‖²] (differentiable in w)."""
    xq, yq = val
    pred = model.predict(prompt, xq, w)
    total = output_loss(pred, yq.to(pred.dtype), loss, reduction="sum") + lam * (w - 1).pow(2).sum()
    return total / xq.shape[0]


def weights_from_logits(v: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """w = softplus(v) > 0, optionally rescaled so that Σ w_i = m."""
    w = F.softplus(v)
    return w * (w.numel() / w.sum()) if normalize else w


def ricl_weights(model: Reweightable, prompt: Prompt, val: ValSet, *, loss: LossName = "mse", lam: float = 0.0,
                 steps: int = 200, lr: float = 0.05, optimizer: Literal["adam", "lbfgs"] = "adam",
                 normalize: bool = False, dtype: torch.dtype = torch.float32) -> ReweightResult:
    """RICL: learn w = softplus(v) by minimising L_V(w) with the model frozen (only v trains)."""
    _check(prompt, val, loss, lam)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    v = torch.full((prompt.m,), _SOFTPLUS_INV_1, dtype=dtype, requires_grad=True)

    def objective() -> torch.Tensor:
        return val_objective(model, prompt, val, weights_from_logits(v, normalize), loss, lam)

    with torch.no_grad():
        uniform = val_objective(model, prompt, val, torch.ones(prompt.m, dtype=dtype), loss, lam).item()
    history: list[float] = []
    if optimizer == "adam":
        opt = torch.optim.Adam([v], lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            obj = objective()
            obj.backward()
            opt.step()
            history.append(obj.item())
    elif optimizer == "lbfgs":
        opt = torch.optim.LBFGS([v], lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            obj = objective()
            obj.backward()
            history.append(obj.item())
            return obj

        opt.step(closure)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    w = weights_from_logits(v.detach(), normalize)
    with torch.no_grad():
        final = val_objective(model, prompt, val, w, loss, lam).item()
    return ReweightResult(weights=w, val_loss=final, val_loss_uniform=uniform, history=history)


def output_jacobian(model: Reweightable, prompt: Prompt, xq: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ(w) [n], J = ∂ŷ/∂w [n, m]) in one backward pass: each query row gets its own copy of w."""
    W = w.detach().expand(xq.shape[0], -1).clone().requires_grad_(True)  # [n, m]
    with torch.enable_grad():
        pred = model.predict(prompt, xq, W)
        (J,) = torch.autograd.grad(pred.sum(), W)
    return pred.detach(), J


def laricl_weights(model: Reweightable, prompt: Prompt, val: ValSet, *, loss: LossName = "mse",
                   lam: float | Sequence[float] = 1e-2, newton_iters: int = 20, w_min: float = 0.0,
                   dtype: torch.dtype = torch.float32) -> ReweightResult:
    """LARICL: closed-form weights of the ridge problem linearised in w around w = 1.

    ``lam`` may be a sequence: the closed form is solved for each λ from the same Jacobian
    and the λ whose weights give the lowest validation loss of the *true* model (without
    penalty) is kept [derived: guards against linearisation error; one forward per λ].
    """
    lams = [float(lam)] if isinstance(lam, (int, float)) else [float(x) for x in lam]
    if not lams:
        raise ValueError("lam must be a number or a non-empty sequence of numbers")
    for x in lams:
        _check(prompt, val, loss, x)
    xq, yq = val
    one = torch.ones(prompt.m, dtype=dtype)
    y0, J = output_jacobian(model, prompt, xq, one)  # ŷ(1) [n], J [n, m]
    y = yq.to(y0.dtype)
    eye = torch.eye(prompt.m, dtype=J.dtype)
    best: tuple[float, float, torch.Tensor] | None = None
    for lm in lams:
        if loss == "mse":  # w − 1 = (JᵀJ + λI)⁻¹ Jᵀ (y − ŷ(1))
            delta = torch.linalg.solve(J.T @ J + lm * eye, J.T @ (y - y0))
        else:  # Newton on Σ ℓ_logistic(ŷ(1) + Jδ) + λ‖δ‖² (convex); Gauss–Newton weights s = σ(1 − σ)
            t = (y > 0).to(J.dtype)
            delta = torch.zeros(prompt.m, dtype=J.dtype)
            for _ in range(max(1, newton_iters)):
                p = torch.sigmoid(y0 + J @ delta)
                grad = J.T @ (p - t) + 2 * lm * delta
                hess = J.T @ (J * (p * (1 - p)).unsqueeze(1)) + 2 * lm * eye
                delta = delta - torch.linalg.solve(hess, grad)
        w = (1 + delta).clamp(min=w_min).detach()
        if len(lams) == 1:
            best = (0.0, lm, w)
            break
        with torch.no_grad():
            score = val_objective(model, prompt, val, w, loss, 0.0).item()
        if best is None or score < best[0]:
            best = (score, lm, w)
    assert best is not None
    _, lm, w = best
    with torch.no_grad():
        final = val_objective(model, prompt, val, w, loss, lm).item()
        uniform = val_objective(model, prompt, val, one, loss, lm).item()
    return ReweightResult(weights=w, val_loss=final, val_loss_uniform=uniform, history=[lm])


def ricl_client_weights(model: Reweightable, prompts: Prompt, val_set: ValSet, *, method: Literal["ricl", "laricl"] = "ricl",
                        **opts: Any) -> dict[str, Any]:
    """Client-side RICL: learn the prompt's weights on this client's own validation split.

    The model is frozen and nothing but w leaves the client. Returns ``weights`` [m],
    ``num_examples`` (validation size, the aggregation weight), ``val_loss`` and
    ``val_loss_uniform``; combine clients with :func:`aggregate_client_weights`.
    """
    fn = {"ricl": ricl_weights, "laricl": laricl_weights}.get(method)
    if fn is None:
        raise ValueError(f"method must be 'ricl' or 'laricl', got {method!r}")
    res = fn(model, prompts, val_set, **opts)
    return {"weights": res.weights, "num_examples": int(val_set[0].shape[0]),
            "val_loss": res.val_loss, "val_loss_uniform": res.val_loss_uniform}


def aggregate_client_weights(replies: list[dict[str, Any]]) -> torch.Tensor:
    """Server side: validation-size-weighted mean of the clients' weights (FedAvg in w)."""
    if not replies:
        raise ValueError("aggregate_client_weights needs at least one client reply")
    n = torch.tensor([float(r["num_examples"]) for r in replies])
    W = torch.stack([r["weights"].to(torch.float64) for r in replies])
    return (n.unsqueeze(1) * W).sum(0) / n.sum()

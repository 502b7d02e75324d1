"""Closed-form in-context learners with weights, for tests and sanity baselines.

Both implement ``predict(prompt, xq, w)`` like :class:`models.icl.model.ICLTransformer`,
w [m] or [n_q, m] (one row per query).

* :class:`WeightedRidgeICL`: the implicit-regression view of ICL (spec 8(a)): the
  prompt induces a weighted ridge regression θ(w) = argmin Σ_i w_i (φ(x_i)ᵀθ − y_i)² + ρ‖θ‖²,
  φ(x) = [x; 1] (with intercept) or x, and ŷ_q = φ(x_q)ᵀ θ(w). A linear, not softmax,
  regression: this project's choice, because its optimum is closed form.
* :class:`LinearKernelICL`: one gradient step from θ = 0 on the weighted least squares,
  ŷ_q = (η/m) Σ_i w_i y_i ⟨x_i, x_q⟩, which is what a linear self-attention layer computes
  (von Oswald et al. 2023). Exactly linear in w, used for the LARICL = RICL identity.
"""

from __future__ import annotations

import torch

from models.icl.tasks import Prompt


def _rows(w: torch.Tensor | None, nq: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    if w is None:
        return torch.ones(nq, m, dtype=dtype)
    return w.to(dtype).expand(nq, m)


class WeightedRidgeICL:
    """ŷ_q(w) = φ(x_q)ᵀ (ΦᵀWΦ + ρI)⁻¹ ΦᵀW y."""

    def __init__(self, ridge: float = 1e-3, intercept: bool = True) -> None:
        self.ridge, self.intercept = ridge, intercept

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1) if self.intercept else x

    def predict(self, prompt: Prompt, xq: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        dt = w.dtype if w is not None else xq.dtype
        W = _rows(w, xq.shape[0], prompt.m, dt)  # [n, m]
        P = self._phi(prompt.xs.to(dt))  # [m, p]
        A = torch.einsum("nm,mp,mq->npq", W, P, P) + self.ridge * torch.eye(P.shape[1], dtype=dt)
        b = torch.einsum("nm,mp,m->np", W, P, prompt.ys.to(dt))
        theta = torch.linalg.solve(A, b)  # [n, p]
        return (self._phi(xq.to(dt)) * theta).sum(-1)


class LinearKernelICL:
    """ŷ_q(w) = (η/m) Σ_i w_i y_i ⟨x_i, x_q⟩ (exactly linear in w)."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def predict(self, prompt: Prompt, xq: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        dt = w.dtype if w is not None else xq.dtype
        W = _rows(w, xq.shape[0], prompt.m, dt)
        K = xq.to(dt) @ prompt.xs.to(dt).T  # [n, m]
        return self.lr / prompt.m * (W * K * prompt.ys.to(dt)).sum(-1)

"""Seed 5's model problem: DLG on one-example softmax regression.

f(x; A) = softmax(A x), L = 1/2 |f - b|^2; the server sees g* = dL/dA and solves
min_x' |dL/dA(x') - g*|^2 (Zhu et al. 2019's objective) with L-BFGS in float64.
[derived] (spec section 5: only the abstract of 2311.13624 was available): the
closed form dL/dA = (diag(f) - f f^T)(f - b) x^T is rank one, so x is identifiable up
to the scale fixed by f; the noise experiment adds N(0, sigma^2) to g*.
"""

from __future__ import annotations

import torch


def gradient_wrt_A(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dL/dA = (diag(f) - f f^T)(f - b) x^T for f = softmax(A x)."""
    f = torch.softmax(A @ x, 0)
    J = torch.diag(f) - torch.outer(f, f)  # softmax Jacobian [k, k]
    return torch.outer(J @ (f - b), x)


def recover_input(A: torch.Tensor, g: torch.Tensor, b: torch.Tensor, *, iterations: int = 200,
                  x0: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(x_hat, final matching loss) minimising |gradient_wrt_A(A, x', b) - g|^2 over x'.

    Without ``x0`` the objective is non-convex; since g is rank one, x is parallel to g's
    top right singular vector, so the search starts from +-t times it (t in 0.25..8) and
    keeps the best.
    """
    if x0 is not None:
        return _lbfgs(A, g, b, x0, iterations)
    u = torch.linalg.svd(g)[2][0]
    runs = [_lbfgs(A, g, b, s * t * u, iterations) for s in (1.0, -1.0) for t in (0.25, 1.0, 2.0, 4.0, 8.0)]
    return min(runs, key=lambda r: r[1])


def _lbfgs(A: torch.Tensor, g: torch.Tensor, b: torch.Tensor, x0: torch.Tensor, iterations: int) -> tuple[torch.Tensor, float]:
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-30, tolerance_change=1e-30)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((gradient_wrt_A(A, x, b) - g) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach(), float(((gradient_wrt_A(A, x.detach(), b) - g) ** 2).sum())

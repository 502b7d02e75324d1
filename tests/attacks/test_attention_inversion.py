"""Seed 6: attention-weight inversion (spec section 6(d))."""

import torch

from attacks.attention_inversion import attention_map, hessian, invert, loss_and_grad, qk_product, score
from attacks.base import ATTACKS, Observation
from models.tasks import TaskSpec


def _problem(d=6, n=5, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(heads, d, d, generator=g, dtype=torch.float64) / d**0.5
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    return W, X, attention_map(X, W)


def test_gradient_matches_finite_differences():
    W, X, B = _problem()
    B = B.flip(-1)  # non-zero residual so that every gradient term matters
    Y = X + 0.3 * torch.randn_like(X)
    _, grad = loss_and_grad(Y, W, B, lam=0.1)
    eps, fd = 1e-6, torch.zeros_like(Y)
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            E = torch.zeros_like(Y)
            E[i, j] = eps
            fd[i, j] = (loss_and_grad(Y + E, W, B, 0.1)[0] - loss_and_grad(Y - E, W, B, 0.1)[0]) / (2 * eps)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-9)
    # autograd agrees too
    Yr = Y.clone().requires_grad_(True)
    loss_and_grad(Yr, W, B, 0.1)[0].backward()
    assert torch.allclose(Yr.grad, grad, atol=1e-10)


def test_newton_and_gd_drive_loss_to_roundoff_near_the_solution():
    W, X, B = _problem()
    torch.manual_seed(1)
    X0 = X + 0.05 * torch.randn_like(X)
    newton = invert(W, B, X0=X0, lam=0.0, method="newton", steps=50, tol=1e-28)
    assert newton.losses[-1] < 1e-24 and newton.losses[-1] < 1e-8 * newton.losses[0]
    gd = invert(W, B, X0=X0, lam=0.0, method="gd", steps=300, lr=1.0)
    assert gd.losses[-1] < 1e-2 * gd.losses[0]
    assert gd.losses == sorted(gd.losses, reverse=True)  # monotone descent
    s = score(newton.X, X, W)
    assert s["attention_error"] < 1e-8 and s["logit_error"] < 1e-5


def test_regularised_hessian_is_positive_definite_at_the_solution():
    # at X* the residual vanishes, so H = J^T J + lam I >= lam I; without lam it is only PSD (often near-singular)
    W, X, B = _problem()
    lam = 1e-3
    assert torch.linalg.eigvalsh(hessian(X, W, B, lam))[0] > lam * (1 - 1e-6)
    assert torch.linalg.eigvalsh(hessian(X, W, B, 0.0))[0] > -1e-10  # PSD (Gauss-Newton) at X*
    # far from X* the residual adds negative curvature that a small ridge does not cover (non-convexity)
    far = hessian(X + torch.randn(X.shape, generator=torch.Generator().manual_seed(4), dtype=X.dtype), W, B, lam)
    assert torch.linalg.eigvalsh(far)[0] < 0


def test_score_is_invariant_to_sign_but_detects_wrong_x():
    W, X, B = _problem()
    s = score(-X, X, W)
    assert s["attention_error"] < 1e-12 and s["x_error_sign"] < 1e-12 and s["x_error_procrustes"] < 1e-10
    bad = score(torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=X.dtype), X, W)
    assert bad["attention_error"] > 0.05 and bad["x_error_sign"] > 0.3


def test_plugin_recovers_attention_from_shared_maps():
    torch.manual_seed(0)
    d, n, H = 8, 6, 4
    wq, wk = torch.randn(d, d) / d**0.5, torch.randn(d, d) / d**0.5
    W = qk_product(wq.double(), wk.double(), H)
    X = torch.randn(d, n, dtype=torch.float64)
    A = attention_map(X, W)  # [H, n, n]
    params = {"l.q.weight": wq, "l.k.weight": wk, "l.q.bias": torch.ones(d)}
    att = ATTACKS.create("attention_inversion", q_weight="l.q.weight", k_weight="l.k.weight", num_heads=H, restarts=4, steps=100)
    crafted = att.craft(params, 1, 0)
    assert crafted["l.q.bias"].abs().sum() == 0 and params["l.q.bias"].abs().sum() > 0
    obs = Observation(1, 0, 0, params, params, {}, TaskSpec(kind="image"), lambda: torch.nn.Identity(),
                      shared={"attention": A[None]})
    rec = att.attack(obs)
    assert rec.artifacts["X"].shape == (1, d, n)
    assert rec.metrics["attention_error"] < 1e-3


def test_convergence_is_tested_on_the_attention_fit_not_the_ridge_and_the_default_solves():
    from attacks.attention_inversion import attention_map, invert, qk_product

    g = torch.Generator().manual_seed(1003)
    W = qk_product(torch.randn(8, 8, generator=g, dtype=torch.float64) / 8**0.5,
                   torch.randn(8, 8, generator=g, dtype=torch.float64) / 8**0.5, 4)
    X = torch.randn(8, 12, generator=g, dtype=torch.float64)
    B = attention_map(X, W)
    # at the true X the maps match exactly; the ridge term (lam/2 |X|^2 ~ 0.05 here) must not hide that
    at_truth = invert(W, B, X0=X.clone(), lam=1e-3, steps=5)
    assert at_truth.converged
    solved = invert(W, B, seed=0, steps=100)  # the defaults: no ridge, Newton
    assert solved.converged and solved.iterations < 100
    assert (attention_map(solved.X, W) - B).norm() / B.norm() < 1e-6


def test_identifiability_one_head_has_a_continuous_symmetry_several_heads_do_not():
    from attacks.attention_inversion import identifiability

    g = torch.Generator().manual_seed(5)
    for d in (4, 8):
        wq, wk = (torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 for _ in range(2))
        one, four = qk_product(wq, wk, 1), qk_product(wq, wk, 4)
        r1, r4 = identifiability(one, n=16), identifiability(four, n=16)
        assert r1["symmetry_dim"] == d // 2 and not r1["identifiable"]
        assert r4["symmetry_dim"] == 0 and r4["identifiable"]
        assert not identifiability(four, n=d // 4)["identifiable"]  # 4 (n - 1) < d: too few equations
        # the symmetry is real: moving X along it keeps every map of the one-head problem, and moves X
        J = torch.func.jacrev(lambda M: M.T @ one[0] + one[0] @ M)(torch.zeros(d, d, dtype=torch.float64))
        M = torch.linalg.svd(J.reshape(d * d, d * d)).Vh[-1].reshape(d, d)  # a null direction
        R = torch.linalg.matrix_exp(0.7 * M / M.norm())
        X = torch.randn(d, 16, generator=g, dtype=torch.float64)
        assert torch.allclose(attention_map(R @ X, one), attention_map(X, one), atol=1e-10)
        assert (R @ X - X).norm() > 0.1 * X.norm()
        assert not torch.allclose(attention_map(R @ X, four), attention_map(X, four), atol=1e-6)
    big = identifiability(torch.randn(2, 40, 40, dtype=torch.float64), n=64)  # above SYMMETRY_MAX_D: generic
    assert big["symmetry_dim"] == 0 and not big["symmetry_measured"] and big["identifiable"]

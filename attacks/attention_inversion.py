"""Attention-weight inversion (Deng, Song, Xie, Yang 2023, "Unmasking Transformers").

Given W = W_Q^T W_K / sqrt(d_head) (one matrix per head) and observed attention maps
B, recover the layer input X in R^{d x n} (one column per token) by minimising

    L(X) = 1/2 sum_h |softmax(X^T W_h X) - B_h|_F^2 + lam/2 |X|_F^2      (row softmax)

Follows the paper: the objective (abstract, reviews). [derived] (this project's
choices, the paper text was not available): the closed-form gradient below, the
ridge regulariser, summing the loss over heads (several heads share X and pin it
far better than one), and the solvers -- plain gradient descent with backtracking,
and a damped Newton method on the *exact* Hessian (autograd; d*n is small here, so
the paper's leverage-score Hessian sketch is not needed and is not implemented).

Invariances (pitfall): X and -X give the same logits; any R with R^T W_h R = W_h for
all h gives another solution; row shifts of the logits leave the softmax unchanged.
:func:`identifiability` computes the dimension of that R family (d / 2 for one head, 0 for several) and whether
the maps hold enough equations; the attack reports both beside its score (``x_identifiable``).
:func:`score` therefore reports the attention error, the row-centred logit error,
and X errors only after sign and orthogonal-Procrustes alignment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from attacks.base import ATTACKS, Attack, Observation, Reconstruction


def _heads(W: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Promote (W [d,d], B [n,n]) to head-batched (W [H,d,d], B [H,n,n]) and check shapes."""
    W = W.unsqueeze(0) if W.dim() == 2 else W
    B = B.unsqueeze(0) if B.dim() == 2 else B
    if W.dim() != 3 or W.shape[-1] != W.shape[-2]:
        raise ValueError(f"W must be [d, d] or [heads, d, d], got {tuple(W.shape)}")
    if B.dim() != 3 or B.shape[-1] != B.shape[-2] or B.shape[0] != W.shape[0]:
        raise ValueError(f"B must be [n, n] or [heads, n, n] with as many heads as W {tuple(W.shape)}, got {tuple(B.shape)}")
    return W, B


def attention_map(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """softmax(X^T W_h X) per head; X [d, n], W [H, d, d] or [d, d] -> [H, n, n] (or [n, n])."""
    S = X.T @ W @ X  # [H, n, n]: S_ij = x_i^T W x_j
    return torch.softmax(S, dim=-1)  # stabilised (max-subtracted) row softmax


def loss_and_grad(X: torch.Tensor, W: torch.Tensor, B: torch.Tensor, lam: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """L(X) and its closed-form gradient.

    With P = softmax(S), G = P - B, Gamma = P * (G - rowsum(G * P)):
    grad = sum_h (W_h X Gamma_h^T + W_h^T X Gamma_h) + lam X.
    """
    W, B = _heads(W, B)
    P = torch.softmax(X.T @ W @ X, dim=-1)  # [H, n, n]
    G = P - B
    loss = 0.5 * (G**2).sum() + 0.5 * lam * (X**2).sum()
    Gam = P * (G - (G * P).sum(-1, keepdim=True))  # softmax backward, [H, n, n]
    grad = (W @ X @ Gam.transpose(-1, -2) + W.transpose(-1, -2) @ X @ Gam).sum(0) + lam * X
    return loss, grad


def hessian(X: torch.Tensor, W: torch.Tensor, B: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """Exact Hessian of L at X, as a [d*n, d*n] matrix over vec(X) (row-major)."""
    d, n = X.shape
    g = lambda v: loss_and_grad(v.view(d, n), W, B, lam)[1].reshape(-1)  # noqa: E731
    H = torch.func.jacrev(g)(X.reshape(-1).detach())  # Jacobian of the closed-form gradient (vmapped)
    return 0.5 * (H + H.T)


@dataclass
class InversionResult:
    X: torch.Tensor  # [d, n]
    losses: list[float]
    iterations: int
    converged: bool
    seconds: float
    min_hessian_eig: list[float] = field(default_factory=list)  # Newton only: along the path


def _fit(X: torch.Tensor, loss: torch.Tensor, lam: float) -> float:
    """The attention-matching part of the loss (the ridge term taken out)."""
    return float(loss) - 0.5 * lam * float((X**2).sum())


def invert(
    W: torch.Tensor,
    B: torch.Tensor,
    *,
    X0: torch.Tensor | None = None,
    d: int | None = None,
    lam: float = 0.0,
    method: Literal["newton", "gd"] = "newton",
    steps: int = 200,
    lr: float = 1.0,
    damping: float = 1e-3,
    tol: float = 1e-14,
    init_scale: float = 0.25,
    seed: int = 0,
    track_hessian: bool = False,
) -> InversionResult:
    """Minimise L(X) from ``X0`` (or a seeded Gaussian X0, entries of std ``init_scale``).

    Far from X* the problem is non-convex: small random starts (near-uniform attention)
    reach zero loss far more often than unit-scale ones (measured in the benchmark).

    ``method="gd"``: gradient descent with Armijo backtracking from step ``lr``.
    ``method="newton"``: Levenberg-damped Newton, X <- X - (H + mu I)^{-1} grad, the
    damping mu adapted so that every accepted step decreases L.

    ``converged`` tests the data fit, 1/2 sum_h |softmax(X^T W_h X) - B_h|^2 <= ``tol``, not the regularised
    loss: with a ridge ``lam`` > 0 the loss at the true X is already lam/2 |X|^2 (1.5e-5 at lam = 1e-6 on
    the benchmark's problems), so a test on it could never pass and every run spent its restarts (issue 17).
    ``lam`` defaults to 0, which solved 4/4 fresh problems where 1e-6 solved 0/4 (issue 17's measurement).
    """
    W, B = _heads(W, B)
    n = B.shape[-1]
    d = W.shape[-1] if d is None else d
    if W.shape[-1] != d:
        raise ValueError(f"W is {W.shape[-1]}x{W.shape[-1]} but d={d}; pass d equal to W's size or omit it")
    if X0 is None:
        gen = torch.Generator().manual_seed(seed)
        X0 = init_scale * torch.randn(d, n, generator=gen, dtype=W.dtype)  # small: near-uniform attention
    if X0.shape != (d, n):
        raise ValueError(f"X0 must be [{d}, {n}] (d x tokens), got {tuple(X0.shape)}")
    if method not in ("newton", "gd"):
        raise ValueError(f"unknown method {method!r}; use 'newton' or 'gd'")
    X = X0.detach().to(W.dtype).clone()
    t0 = time.perf_counter()
    loss, grad = loss_and_grad(X, W, B, lam)
    losses, eigs, mu, step = [float(loss)], [], damping, lr
    it, converged = 0, _fit(X, loss, lam) <= tol  # a start that already matches the maps is a solution
    for it in range(1, 0 if converged else steps + 1):
        if method == "gd":
            while True:  # Armijo backtracking
                Xn = X - step * grad
                ln, gn = loss_and_grad(Xn, W, B, lam)
                if ln <= loss - 1e-4 * step * (grad**2).sum() or step < 1e-12:
                    break
                step *= 0.5
            step = min(step * 2.0, 1e6)
        else:
            H = hessian(X, W, B, lam)
            if track_hessian:
                eigs.append(float(torch.linalg.eigvalsh(H)[0]))
            eye = torch.eye(H.shape[0], dtype=H.dtype)
            while True:  # Levenberg damping: grow mu until the step decreases L
                delta = torch.linalg.solve(H + mu * eye, grad.reshape(-1)).view_as(X)
                Xn = X - delta
                ln, gn = loss_and_grad(Xn, W, B, lam)
                if ln < loss or mu > 1e12:
                    break
                mu *= 10.0
            mu = max(mu / 10.0, 1e-12)
        if ln >= loss:  # no further progress possible at this precision
            converged = _fit(X, loss, lam) <= tol
            break
        X, loss, grad = Xn, ln, gn
        losses.append(float(loss))
        if _fit(X, loss, lam) <= tol:
            converged = True
            break
    return InversionResult(X=X, losses=losses, iterations=it, converged=converged,
                           seconds=time.perf_counter() - t0, min_hessian_eig=eigs)


SYMMETRY_MAX_D = 32  # above this, identifiability() takes the generic symmetry dimension (d^2 x d^2 is too large)


def identifiability(W: torch.Tensor, n: int) -> dict[str, Any]:
    """Can the maps of n tokens pin X (up to sign)? Two necessary conditions, computed from W [H, d, d] or [d, d]:

    * ``symmetry_dim``: the dimension of {M : M^T W_h + W_h M = 0 for every h}, the Lie algebra of the group
      {R : R^T W_h R = W_h}; when it is > 0, X -> exp(tM) X is a continuous family with the very same maps. For one
      generic head it is d / 2 (measured, d = 4, 8, 16); two heads or more generically make it 0. Computed exactly
      for d <= ``SYMMETRY_MAX_D`` (a d^2 x d^2 rank); above it the generic value is returned
      (``symmetry_measured`` False).
    * the count: H n (n - 1) independent map entries (each row sums to 1) against d n unknowns, i.e. H (n - 1) >= d.

    ``identifiable`` = both hold. benchmarks/bench_attention_inversion.py measures that they are also sufficient on
    its grid: every multi-head problem solved where they hold had its X recovered, none where they fail.
    """
    W = W.unsqueeze(0) if W.dim() == 2 else W
    heads, d = W.shape[0], W.shape[-1]
    if d <= SYMMETRY_MAX_D:
        G = torch.zeros(d * d, d * d, dtype=W.dtype)  # sum_h J_h^T J_h: same null space as the stacked J
        for Wh in W:
            Jh = torch.func.jacrev(lambda M: M.T @ Wh + Wh @ M)(torch.zeros(d, d, dtype=W.dtype))  # noqa: B023
            Jh = Jh.reshape(d * d, d * d)
            G += Jh.T @ Jh
        sym, measured = d * d - int(torch.linalg.matrix_rank(G, hermitian=True)), True
    else:  # d^2 x d^2 too large to factor: the generic value (measured d/2 and 0 for d = 4..32)
        sym, measured = (d // 2 if heads == 1 else 0), False
    enough = heads * (n - 1) >= d
    return {"symmetry_dim": sym, "symmetry_measured": measured, "equations": heads * n * (n - 1),
            "unknowns": d * n, "enough_equations": enough,
            "identifiable": sym == 0 and enough}


def _procrustes(A: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Orthogonal R minimising |R A - T|_F (A, T: [d, n])."""
    U, _, Vh = torch.linalg.svd(T @ A.T)
    return U @ Vh


def score(X_hat: torch.Tensor, X_true: torch.Tensor, W: torch.Tensor, B: torch.Tensor | None = None) -> dict[str, float]:
    """Errors up to the problem's invariances (all relative, in [0, inf)).

    * ``attention_error``: |softmax(X_hat^T W X_hat) - B|_F / |B|_F (B defaults to X_true's map);
    * ``logit_error``: row-centred logits X^T W X compared (invariant to sign, to every
      W-preserving R and to softmax row shifts);
    * ``x_error_sign``: min over s in {+1, -1} of |s X_hat - X_true| / |X_true|;
    * ``x_error_procrustes``: min over orthogonal R of |R X_hat - X_true| / |X_true| (a lower
      bound: R ranges over all orthogonal maps, not only those preserving W).
    """
    W3 = W.unsqueeze(0) if W.dim() == 2 else W  # [H, d, d]
    Bt = attention_map(X_true, W3) if B is None else _heads(W3, B)[1]
    Ph = attention_map(X_hat, W3)

    def centred(X: torch.Tensor) -> torch.Tensor:
        S = X.T @ W3 @ X
        return S - S.mean(-1, keepdim=True)

    St = centred(X_true)
    nx = X_true.norm()
    return {
        "attention_error": float((Ph - Bt).norm() / Bt.norm()),
        "logit_error": float((centred(X_hat) - St).norm() / St.norm().clamp_min(1e-30)),
        "x_error_sign": float(min((X_hat - X_true).norm(), (X_hat + X_true).norm()) / nx),
        "x_error_procrustes": float((_procrustes(X_hat, X_true) @ X_hat - X_true).norm() / nx),
    }


def qk_product(wq: torch.Tensor, wk: torch.Tensor, num_heads: int) -> torch.Tensor:
    """W_h = W_Q,h^T W_K,h / sqrt(d_head) from nn.Linear weights [d_model, d] -> [H, d, d].

    Hugging Face computes q_i = W_Q x_i (+ b_Q), so s_ij = x_i^T W_Q^T W_K x_j / sqrt(d_head)
    when the query/key biases are zero (the attack's ``craft`` zeroes them).
    """
    dm = wq.shape[0]
    if dm % num_heads:
        raise ValueError(f"projection width {dm} is not divisible by num_heads={num_heads}")
    dh = dm // num_heads
    q = wq.view(num_heads, dh, -1)
    k = wk.view(num_heads, dh, -1)
    return q.transpose(1, 2) @ k / dh**0.5


@ATTACKS.register("attention_inversion")
class AttentionInversion(Attack):
    """Recover a layer's input X from shared attention maps and its Q/K weights (seed 6).

    Threat model: the client mode shares attention maps (split learning style) as
    ``obs.shared["attention"]`` ([B, H, n, n] or [H, n, n]); W comes from
    ``obs.shared["W"]`` ([H, d, d]) or from the global Q/K weights named ``q_weight`` /
    ``k_weight``. Malicious variant: :meth:`craft` zeroes the Q/K biases so that the
    logits are exactly X^T W X (otherwise the bias terms are a model mismatch).
    Returns X per example in ``artifacts["X"]`` ([B, d, n]) and the attention error.
    """

    threat_model = "malicious"

    def __init__(self, q_weight: str = "", k_weight: str = "", num_heads: int = 0, method: str = "newton",
                 steps: int = 100, lam: float = 0.0, restarts: int = 3, seed: int = 0) -> None:
        super().__init__()
        if method not in ("newton", "gd"):
            raise ValueError(f"attention_inversion method must be 'newton' or 'gd', got {method!r}")
        if steps < 1 or restarts < 1 or num_heads < 0 or seed < 0:
            raise ValueError(f"attention_inversion needs steps >= 1, restarts >= 1, num_heads >= 0 (0: from the "
                             f"model) and seed >= 0; got {steps}, {restarts}, {num_heads}, {seed}")
        if not (0.0 <= lam < float("inf")):
            raise ValueError(f"attention_inversion lam must be a finite number >= 0, got {lam!r}")
        self.q_weight, self.k_weight, self.num_heads = q_weight, k_weight, num_heads
        self.method, self.steps, self.lam, self.restarts, self.seed = method, steps, lam, restarts, seed

    def _bias_names(self, params: dict[str, torch.Tensor]) -> list[str]:
        q, k = self._names(params)
        return [n.replace("weight", "bias") for n in (q, k) if n]

    def _names(self, params: dict[str, torch.Tensor]) -> tuple[str, str]:
        """The configured Q/K weight names, else the first attention layer's (``*q_proj`` / ``*query``)."""
        if self.q_weight and self.k_weight:
            return self.q_weight, self.k_weight
        q = next((n for n in params if n.endswith(("q_proj.weight", "query.weight"))), "")
        k = q.replace("q_proj.weight", "k_proj.weight").replace("query.weight", "key.weight") if q else ""
        return (q, k) if k in params else ("", "")

    def check_model(self, params: dict[str, torch.Tensor]) -> None:
        """Names given in the config must be the model's; so must the head count divide their width."""
        missing = [n for n in (self.q_weight, self.k_weight) if n and n not in params]
        if missing:
            raise ValueError(f"attention_inversion: {missing} not among the model's trainable parameters; check "
                             "q_weight / k_weight")
        q, k = self._names(params)
        if q and k and self.num_heads and params[q].shape[0] % self.num_heads:
            raise ValueError(f"attention_inversion: {q} has width {params[q].shape[0]}, not divisible by "
                             f"num_heads={self.num_heads}")

    def craft(self, global_params: dict[str, torch.Tensor], server_round: int, partition_id: int) -> dict[str, torch.Tensor]:
        out = dict(global_params)
        for name in self._bias_names(global_params):
            if name in out:
                out[name] = torch.zeros_like(out[name])
        return out

    def _weights(self, obs: Observation) -> torch.Tensor:
        if "W" in obs.shared:
            return obs.shared["W"].double()
        q, k = self._names(obs.global_params)
        if not (q and k):
            raise ValueError("attention_inversion needs obs.shared['W'] or params q_weight/k_weight naming the Q/K weights")
        missing = [n for n in (q, k) if n not in obs.global_params]
        if missing:
            raise ValueError(f"attention_inversion: {missing} not among the model's parameters; check q_weight/k_weight")
        heads = self.num_heads or int(obs.metadata.get("num_heads", 0))
        if heads <= 0:  # the architecture's own head count (a config the server built)
            heads = int(getattr(getattr(obs.model_factory(), "config", None), "num_attention_heads", 0) or 0)
        if heads <= 0:
            raise ValueError("attention_inversion: set params.num_heads (or metadata num_heads)")
        return qk_product(obs.global_params[q].double(), obs.global_params[k].double(), heads)

    def attack(self, obs: Observation) -> Reconstruction:
        if "attention" not in obs.shared:
            raise ValueError("attention_inversion needs obs.shared['attention'] (a client mode that shares attention maps)")
        W = self._weights(obs)
        A = obs.shared["attention"].double()
        A = A.unsqueeze(0) if A.dim() == 3 else A  # [B, H, n, n]
        Xs, errs, t0 = [], [], time.perf_counter()
        for b in range(A.shape[0]):
            best = None
            for r in range(self.restarts):
                res = invert(W, A[b], lam=self.lam, method=self.method, steps=self.steps, seed=self.seed + r)  # type: ignore[arg-type]
                if best is None or res.losses[-1] < best.losses[-1]:
                    best = res
                if best.converged:
                    break
            assert best is not None
            Xs.append(best.X)
            errs.append(float((attention_map(best.X, W) - A[b]).norm() / A[b].norm()))
        ident = identifiability(W, A.shape[-1])
        metrics: dict[str, Any] = {"attention_error": sum(errs) / len(errs), "attack_seconds": time.perf_counter() - t0,
                                   "x_identifiable": float(ident["identifiable"]),
                                   "x_symmetry_dim": float(ident["symmetry_dim"])}
        return Reconstruction(metrics=metrics, artifacts={"X": torch.stack(Xs), "W": W})

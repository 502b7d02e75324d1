"""Random Vector Accelerating (RVA) around any optimizer.

Paper (Deng, Song, Yang, arXiv 2402.01515) names the method; the rule is [derived] (spec 3(a)):
draw a random v_t, flip it so <v_t, grad f> >= 0, and hand the base optimizer

    g_t = grad f + 2 <v_t, grad f> v_t / |v_t|^2            (sign-invariant in v_t)

so that <g_t, grad f> = |grad f|^2 + 2c^2 >= |grad f|^2 with c = <v_t/|v_t|, grad f>
("always accelerating", k = T in the paper's bound). One v per param group (global).

Project choices [derived]:
* subspace. v ~ N(0, I) over all p coordinates (``subspace="full"``) gains only
  E[2c^2]/|grad f|^2 = 2/p, nothing for a network; the default ``subspace="history"`` draws
  v = sum_j z_j h_j, z ~ N(0, I_k), in the span of the last k raw gradients h_j, where the
  gain is large when gradients are correlated (the first step, with no history, is plain).
* gain cap. gain = 2c^2/|grad f|^2 (in [0, 2]) is capped at ``max_gain`` by shrinking the
  added term, which keeps <g, grad f> >= |grad f|^2; |g| <= 3 |grad f| always (spec 3(e):
  large effective steps destabilise training).
* p.grad is restored to the raw gradient after the base step.

Closure-free and closure modes do the same (the closure is evaluated once). Under Opacus the
raw gradient is the privatised one, so the history and v are built from noised gradients.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim import Optimizer

from optimizers.registry import OPTIMIZERS
from optimizers.wrapper import Closure, WrappedOptimizer, group_dot


@OPTIMIZERS.register("rva")
class RandomVectorAccelerating(WrappedOptimizer):
    """Random Vector Accelerating: add the gradient's component along a random direction, twice."""

    name = "rva"

    def __init__(
        self,
        base: Optimizer,
        subspace: Literal["history", "full"] = "history",
        history: int = 2,
        max_gain: float = 1.0,
        seed: int = 0,
    ) -> None:
        if subspace not in ("history", "full"):
            raise ValueError(f"rva: subspace must be 'history' or 'full', got {subspace!r}")
        if history < 1 or max_gain <= 0:
            raise ValueError(f"rva: need history >= 1 and max_gain > 0 (got {history}, {max_gain})")
        super().__init__(base)
        self.subspace, self.history, self.max_gain = subspace, history, max_gain
        self.generator = torch.Generator().manual_seed(seed)
        self.last_gain = 0.0

    def _direction(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if self.subspace == "full":
            return [torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device) for p in params]
        hist = [self.state[p].get("history", []) for p in params]
        k = min(len(h) for h in hist)
        if k == 0:
            return None
        z = torch.randn(k, generator=self.generator).tolist()
        return [sum(zj * h[-1 - j] for j, zj in enumerate(z[:k])) for h in hist]  # type: ignore[misc]

    def _step(self, closure: Closure | None) -> None:
        raw: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            v = self._direction(params)
            gain = 0.0
            if v is not None:
                c, vv, gg = group_dot(v, grads), group_dot(v, v), group_dot(grads, grads)
                if vv > 0 and gg > 0:
                    gain = 2 * c * c / (vv * gg)
                    coef = 2 * c / vv
                    if gain > self.max_gain:
                        coef *= self.max_gain / gain
                        gain = self.max_gain
                    for p, vi in zip(params, v):
                        raw[p] = p.grad
                        p.grad = p.grad.add(vi, alpha=coef)
            self._stats["gain_sum"] += gain
            self._stats["decisions"] += 1
            for p in params:  # remember the raw (e.g. privatised) gradient
                h = self.state[p].setdefault("history", [])
                h.append(raw.get(p, p.grad).detach().clone())
                del h[: -self.history]
        try:
            self.base.step()
        finally:
            for p, g in raw.items():
                p.grad = g
        self._stats["steps"] += 1
        self.last_gain = gain

    def _diagnostics(self) -> dict[str, float]:
        return {"gain": self._rate("gain_sum", "decisions")}

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if "generator" in extra:
            self.generator.set_state(extra["generator"])

"""Delta-bar-delta (DBD) and Regrettable Delta-Bar-Delta (RDBD) around any optimizer.

Paper (Song & Yang, arXiv 2310.11291) [paper, abstract only]: DBD adapts the learning rate
from the agreement between the current gradient and previous updates; it can fail under
mini-batch noise. RDBD "allows prompt correction of biased learning-rate adjustments" and
wraps any optimizer. The algorithm below is [derived] (spec section 7(a)), not the paper's.

Wrapper form. The base optimizer moves x by d_t = x_t - x_{t+1} = eta_t * u_t. Each param
group carries one scalar multiplier rho (``group["lr_scale"]``) so eta_t = rho_t * lr, where
lr is whatever the group (or an LR scheduler) says: schedules and the adaptation compose.
Since d f(x_t) / d eta_{t-1} = -<grad f(x_t), u_{t-1}>, the hypergradient sign is

    h_t = <g_t, d_bar_{t-1}>,  d_bar_t = (1 - theta) d_t + theta d_bar_{t-1}   (global over the group)

    DBD:  rho <- rho * (1 + kappa) if h_t > 0,  rho * (1 - phi) if h_t < 0   (no bounds)
    RDBD: if sign(h_t) contradicts the sign of the last change Delta_{t-1}, first undo it
          (rho <- rho - Delta_{t-1}, the "regret"), then apply the DBD change, clipped to
          [min_scale, max_scale]; Delta_t is that new change alone.

Project choices [derived]: multiplicative increase as well as decrease (Jacobs' DBD adds
kappa), because for Adam u is scale-free and a multiplier is unit-free; one scalar per
param group (global inner product); only rho is reverted, never x, and no base state depends
on rho (torch SGD momentum buffers and Adam moments do not contain the lr), so the revert
needs nothing else undone (spec 7(e)).

Modes. Without a closure (and always under Opacus), h_t uses the gradient of the current
mini-batch at x_t against the previous displacement, so batch-to-batch noise enters the
sign. ``step(closure)`` with ``same_batch=True`` instead re-evaluates the closure once more
after the step and measures h on the *same* mini-batch, <grad f_B(x_{t+1}), d_t>: one extra
forward/backward per step, less noise (spec 7(a) step 1). With kappa = phi = 0 rho stays 1.0
and the wrapper equals the base optimizer bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from optimizers.registry import OPTIMIZERS
from optimizers.wrapper import Closure, WrappedOptimizer, group_dot


class _DeltaBarDeltaBase(WrappedOptimizer):
    regret: bool = False

    def __init__(
        self,
        base: Optimizer,
        kappa: float = 0.05,
        phi: float = 0.3,
        theta: float = 0.7,
        min_scale: float = 0.0,
        max_scale: float = math.inf,
        same_batch: bool = True,
    ) -> None:
        if kappa < 0 or not 0 <= phi < 1 or not 0 <= theta < 1:
            raise ValueError(f"{self.name}: need kappa >= 0, 0 <= phi < 1, 0 <= theta < 1 (got {kappa}, {phi}, {theta})")
        if not 0 <= min_scale <= 1 <= max_scale:
            raise ValueError(f"{self.name}: need 0 <= min_scale <= 1 <= max_scale (got {min_scale}, {max_scale})")
        super().__init__(base)
        self.kappa, self.phi, self.theta = kappa, phi, theta
        self.min_scale, self.max_scale = min_scale, max_scale
        self.same_batch = same_batch
        for group in self.param_groups:
            group.setdefault("lr_scale", 1.0)
            group.setdefault("lr_scale_delta", 0.0)

    # -- the learning-rate rule ---------------------------------------------------------
    def _adapt(self, group: dict[str, Any], h: float) -> None:
        if h == 0.0 or not math.isfinite(h):
            return
        rho, last = group.get("lr_scale", 1.0), group.get("lr_scale_delta", 0.0)
        self._stats["adaptations"] += 1
        if self.regret and last != 0.0 and (h > 0) != (last > 0):
            rho -= last  # regret: undo the previous, now contradicted, change
            self._stats["reverts"] += 1
        new = rho * (1.0 + self.kappa) if h > 0 else rho * (1.0 - self.phi)
        new = min(max(new, self.min_scale), self.max_scale)
        group["lr_scale"], group["lr_scale_delta"] = new, new - rho

    def _measure(self, group: dict[str, Any]) -> float | None:
        """h = <g, d_bar> over the group's params with a gradient and a past step."""
        g, d = [], []
        for p in group["params"]:
            st = self.state.get(p)
            if p.grad is not None and st and "avg_step" in st:
                g.append(p.grad)
                d.append(st["avg_step"])
        return group_dot(g, d) if g else None

    # -- the step ---------------------------------------------------------------------------
    def _step(self, closure: Closure | None) -> None:
        measured_after = closure is not None and self.same_batch
        before: dict[torch.Tensor, torch.Tensor] = {}
        saved_lr = []
        for group in self.param_groups:
            group.setdefault("lr_scale", 1.0)
            group.setdefault("lr_scale_delta", 0.0)
            if not measured_after:
                h = self._measure(group)
                if h is not None:
                    self._adapt(group, h)
            for p in group["params"]:
                if p.grad is not None:
                    before[p] = p.detach().clone()
            saved_lr.append(group["lr"])
            if group["lr_scale"] != 1.0:  # exactly the base when the scale is 1
                group["lr"] = group["lr"] * group["lr_scale"]
        try:
            self.base.step()
        finally:
            for group, lr in zip(self.param_groups, saved_lr):
                group["lr"] = lr
        self._stats["steps"] += 1
        for p, x0 in before.items():
            st = self.state[p]
            d = x0.sub_(p)  # displacement d_t = x_t - x_{t+1}, reusing the snapshot
            if "avg_step" in st and self.theta > 0:
                st["avg_step"].mul_(self.theta).add_(d, alpha=1.0 - self.theta)
            else:
                st["avg_step"] = d
        if measured_after:
            with torch.enable_grad():
                closure()  # same mini-batch, new point: g = grad f_B(x_{t+1})
            for group in self.param_groups:
                h = self._measure(group)
                if h is not None:
                    self._adapt(group, h)

    def _diagnostics(self) -> dict[str, float]:
        g0 = self.param_groups[0]
        scales = [g.get("lr_scale", 1.0) for g in self.param_groups]
        out = {
            "lr_eff": float(g0["lr"]) * g0.get("lr_scale", 1.0),
            "lr_scale": scales[0],
            "lr_scale_min": min(scales),
            "lr_scale_max": max(scales),
        }
        if self.regret:
            out["revert_rate"] = self._rate("reverts", "adaptations")
        return out


@OPTIMIZERS.register("dbd")
class DeltaBarDelta(_DeltaBarDeltaBase):
    """Delta-bar-delta lr adaptation around any optimizer (no regret, no bounds by default)."""

    name = "dbd"
    regret = False


@OPTIMIZERS.register("rdbd")
class RegrettableDeltaBarDelta(_DeltaBarDeltaBase):
    """RDBD: delta-bar-delta that undoes contradicted lr changes, lr scale clipped to bounds."""

    name = "rdbd"
    regret = True

    def __init__(
        self,
        base: Optimizer,
        kappa: float = 0.05,
        phi: float = 0.3,
        theta: float = 0.7,
        min_scale: float = 0.1,
        max_scale: float = 10.0,
        same_batch: bool = True,
    ) -> None:
        super().__init__(base, kappa, phi, theta, min_scale, max_scale, same_batch)

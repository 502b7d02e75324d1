"""Reject Accelerating (RA) around any optimizer.

Paper (Deng, Song, Yang, arXiv 2402.01515) [paper]: write a first-order step as
x_{t+1} = x_t - eta g_t with g_t = grad f_t + (acceleration v_t); steps whose acceleration
points against the gradient (<v_t, grad f_t> < 0) loosen the convergence bound. RA rejects
the acceleration on those steps. The exact rule is [derived] (spec section 3(a)):

1. the base takes its step; its state (momentum, moments) is updated with g_t as usual;
2. v_t = u_t - plain_t, where u_t is the base's direction and plain_t the same base with its
   acceleration switched off, compared in the base's own metric:
     SGD (momentum mu, optional nesterov / dampening / weight decay):
        g^ = g + wd x,  u = buf_t (nesterov: g^ + mu buf_t),  plain = g^,  metric I;
     Adam / AdamW (incl. amsgrad): P = 1 / (sqrt(v_t / bc2) + eps),
        u = P m_t / bc1,  plain = P g^,  <v, g^> = sum P (m_t / bc1 - g^) g^   ("scaled space");
     any other base [project choice, approximate]: plain = g, v = d / lr - g, metric I;
3. if <v_t, g_t> < 0 (one global inner product per param group, ``scope="global"``, or one
   per tensor, ``scope="tensor"``) the parameters are reset to x_t - lr * plain_t (AdamW:
   also the decoupled decay); otherwise the base's step is kept untouched, so steps with no
   rejection equal the base bit for bit. SGD without momentum never rejects (v = 0).

``rule="direction"`` [project choice, spec's "sign(<u_t, grad f_t>)" reading] rejects only when
the base's whole direction u_t opposes the gradient, <u_t, g^> < 0 (same metric). With noisy
gradients the default rule rejects often for EMA-momentum bases: for Adam v ~ beta1 (m_{t-1} - g)
and <m_{t-1} - g, g> < 0 whenever the gradient noise outweighs the drift (see RESULTS.md).

The test needs only the gradient at x_t, which ``p.grad`` already holds: closure-free
``loss.backward(); opt.step()`` and ``step(closure)`` run the same algorithm (the closure is
evaluated once, as in torch). Under Opacus the test uses the privatised gradient, and a
"reject" can be triggered by mini-batch or DP noise (spec 3(e)).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.optim import Optimizer

from optimizers.registry import OPTIMIZERS
from optimizers.wrapper import Closure, WrappedOptimizer


def _as_float(x: object) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)  # type: ignore[arg-type]


@OPTIMIZERS.register("ra")
class RejectAccelerating(WrappedOptimizer):
    """Reject Accelerating: drop the base's acceleration on steps where it opposes the gradient."""

    name = "ra"

    def __init__(
        self,
        base: Optimizer,
        scope: Literal["global", "tensor"] = "global",
        rule: Literal["acceleration", "direction"] = "acceleration",
    ) -> None:
        if scope not in ("global", "tensor"):
            raise ValueError(f"ra: scope must be 'global' or 'tensor', got {scope!r}")
        if rule not in ("acceleration", "direction"):
            raise ValueError(f"ra: rule must be 'acceleration' or 'direction', got {rule!r}")
        super().__init__(base)
        self.scope, self.rule = scope, rule
        self.last_rejected = False
        if isinstance(base, torch.optim.SGD):
            self.family = "sgd"
        elif isinstance(base, torch.optim.Adam):  # AdamW subclasses Adam
            self.family = "adam"
        else:
            self.family = "generic"
        for group in self.param_groups:
            if group.get("maximize", False):
                raise ValueError("ra: maximize=True is not supported; minimise -f instead")

    # -- per-tensor (<v, g^>, plain step) in the base's metric --------------------------
    def _terms(self, group: dict, p: torch.Tensor, g: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(<v, g^> -- or <u, g^> for rule="direction" -- as a 0-dim tensor, new value on rejection)."""
        lr = _as_float(group["lr"])
        st = self.base.state.get(p, {})
        direction = self.rule == "direction"
        if self.family == "sgd":
            mu = group.get("momentum", 0.0)
            if mu == 0 or st.get("momentum_buffer") is None:
                return None
            wd = group.get("weight_decay", 0.0)
            gh = g.add(x0, alpha=wd) if wd != 0 else g
            buf = st["momentum_buffer"]
            u = gh + buf * mu if group.get("nesterov", False) else buf
            v = u if direction else u - gh
            return (v.double() * gh.double()).sum(), x0.add(gh, alpha=-lr)
        if self.family == "adam":
            if "exp_avg" not in st:
                return None
            b1, b2 = group["betas"]
            b1, b2 = _as_float(b1), _as_float(b2)
            t = _as_float(st["step"])
            if t <= 1:  # m_hat_1 = g^: no acceleration yet (skip the round-off-level test)
                return None
            wd, eps = group.get("weight_decay", 0.0), group["eps"]
            decoupled = group.get("decoupled_weight_decay", False)
            gh = g.add(x0, alpha=wd) if (wd != 0 and not decoupled) else g
            sq = st["max_exp_avg_sq"] if group.get("amsgrad", False) else st["exp_avg_sq"]
            denom = (sq.sqrt() / (1 - b2**t) ** 0.5).add_(eps)  # 1/P, as torch.optim.Adam computes it
            m_hat = st["exp_avg"] / (1 - b1**t)
            v = m_hat if direction else m_hat - gh
            dot = (v.double() * gh.double() / denom.double()).sum()
            x_new = x0.mul(1 - lr * wd) if (wd != 0 and decoupled) else x0.clone()
            return dot, x_new.addcdiv_(gh, denom, value=-lr)
        # generic: the base's displacement against an SGD step, identity metric
        u = (x0 - p) / lr
        v = u if direction else u - g
        return (v.double() * g.double()).sum(), x0.add(g, alpha=-lr)

    def _step(self, closure: Closure | None) -> None:
        snap: list[tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    snap.append((group, p, p.grad.detach().clone(), p.detach().clone()))
        self.base.step()
        self._stats["steps"] += 1
        r0 = self._stats["rejections"]
        by_group: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for group, p, g, x0 in snap:
            terms = self._terms(group, p, g, x0)
            if terms is not None:
                by_group.setdefault(id(group), []).append((p, *terms))
        for items in by_group.values():
            if self.scope == "global":
                dot = float(torch.stack([t[1] for t in items]).sum())
                self._stats["decisions"] += 1
                if dot < 0:
                    self._stats["rejections"] += 1
                    for p, _, x_new in items:
                        p.copy_(x_new)
            else:
                for p, dot_t, x_new in items:
                    self._stats["decisions"] += 1
                    if float(dot_t) < 0:
                        self._stats["rejections"] += 1
                        p.copy_(x_new)
        self.last_rejected = self._stats["rejections"] > r0  # did this step reject anything

    def _diagnostics(self) -> dict[str, float]:
        return {"reject_rate": self._rate("rejections", "decisions"), "rejections": self._stats.get("rejections", 0.0)}

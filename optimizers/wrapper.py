"""WrappedOptimizer: a torch Optimizer that drives another one.

The wrapper *is* a :class:`torch.optim.Optimizer` (LR schedulers, Opacus' ``DPOptimizer``,
step hooks and ``zero_grad`` all work on it) but owns no parameters of its own:

* ``param_groups`` and ``defaults`` are the base optimizer's objects (read and written
  through), so a scheduler that sets ``group["lr"]`` sets the base's learning rate;
* ``state`` holds only the wrapper's per-parameter tensors (the base keeps its own);
* ``state_dict()`` is the base's dict plus a ``"wrapper"`` entry, and
  ``load_state_dict`` restores both.

Step protocol. ``step()`` without a closure uses the gradients already in ``p.grad``
(the usual ``loss.backward(); opt.step()`` loop, and the only mode under Opacus, whose
``DPOptimizer`` calls ``original_optimizer.step()`` with no closure after privatising
``p.grad``). ``step(closure)`` first evaluates the closure once, as every torch optimizer
does, and returns its loss; a wrapper may evaluate it again where its docstring says so.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch.optim import Optimizer

Closure = Callable[[], Any]


class WrappedOptimizer(Optimizer):
    """Base class for optimizers that wrap any ``torch.optim`` optimizer."""

    name: ClassVar[str] = "wrapper"

    def __init__(self, base: Optimizer) -> None:
        if not isinstance(base, Optimizer):
            raise ValueError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(base).__name__}")
        self.base = base
        # Optimizer.__init__ resets self.param_groups (our property -> the base's list) to []
        # and re-adds the same group dicts: same dicts, same params, base state untouched.
        super().__init__(list(base.param_groups), base.defaults)
        self._stats: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ shared views
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base.param_groups = groups

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.base.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.base.defaults = defaults

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"

    # ------------------------------------------------------------------ step
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step(closure)
        return loss

    def _step(self, closure: Closure | None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self, reset: bool = False) -> dict[str, float]:
        """Scalars to log (per round); ``reset`` clears the counters afterwards."""
        out = self._diagnostics()
        if reset:
            self._stats = defaultdict(float)
        return {k: float(v) for k, v in out.items()}

    def _diagnostics(self) -> dict[str, float]:
        return {}

    def _rate(self, num: str, den: str) -> float:
        d = self._stats.get(den, 0.0)
        return self._stats.get(num, 0.0) / d if d else 0.0  # nothing counted yet: 0, not NaN (MLflow)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = self.base.state_dict()
        index = {id(p): i for i, p in enumerate(self._params())}
        sd["wrapper"] = {
            "name": self.name,
            "state": {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index and s},
            "stats": dict(self._stats),
            "extra": self._extra_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        sd = dict(state_dict)
        wrapper = sd.pop("wrapper", None)
        if wrapper is not None and wrapper.get("name") != self.name:
            raise ValueError(f"state_dict was saved by optimizer {wrapper.get('name')!r}, not {self.name!r}")
        self.base.load_state_dict(sd)
        self.state = defaultdict(dict)
        self._stats = defaultdict(float)
        if wrapper is None:
            return
        params = list(self._params())
        for i, s in wrapper["state"].items():
            p = params[int(i)]
            self.state[p] = {k: _to_param(v, p) for k, v in s.items()}
        self._stats.update(wrapper.get("stats", {}))
        self._load_extra_state(wrapper.get("extra", {}))

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass


def _to_param(v: Any, p: torch.Tensor) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
    if isinstance(v, list):
        return [_to_param(x, p) for x in v]
    return v


def group_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Global inner product sum_i <a_i, b_i> over a param group (one host sync)."""
    if not a:
        return 0.0
    return float(torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum())

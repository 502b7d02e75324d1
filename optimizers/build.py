"""``build``: the one constructor the config and the FL clients use; ``diagnostics`` for any optimizer."""

from __future__ import annotations

import inspect
from typing import Any

from torch.optim import Optimizer

from optimizers.plain import PLAIN_CLASSES, ParamsT
from optimizers.registry import OPTIMIZERS
from optimizers.wrapper import WrappedOptimizer


def _accepted(fn: Any, skip: int) -> set[str] | None:
    """Keyword names ``fn`` takes after its first ``skip`` positional ones (None: takes **kwargs)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _is_wrapper(entry: Any) -> bool:
    return isinstance(entry, type) and issubclass(entry, WrappedOptimizer)


def _build_plain(name: str, params: ParamsT, lr: float, options: dict[str, Any]) -> Optimizer:
    entry = OPTIMIZERS.get(name)
    if _is_wrapper(entry):
        plain = sorted(n for n in OPTIMIZERS.names() if not _is_wrapper(OPTIMIZERS.get(n)))
        raise ValueError(f"optimizer base {name!r} is itself a wrapper; choose a plain base: {', '.join(plain)}")
    cls = PLAIN_CLASSES.get(name, entry if isinstance(entry, type) else None)
    allowed = _accepted(cls.__init__, 2) if cls is not None else _accepted(entry, 1)
    if allowed is not None:
        allowed.discard("lr")
        if name == "momentum":
            allowed.add("momentum")
        bad = sorted(set(options) - allowed)
        if bad:
            raise ValueError(f"unknown option(s) {', '.join(bad)} for optimizer {name!r}; allowed: {', '.join(sorted(allowed))}")
    return entry(params, lr=lr, **options)


def build(name: str, params: ParamsT, base: str = "adam", lr: float = 0.05, **options: Any) -> Optimizer:
    """Build optimizer ``name`` over ``params``.

    Plain names (sgd, momentum, adam, adamw, or a ``module:Class`` torch optimizer) ignore
    ``base``; wrapper names (dbd, rdbd, ra, rva) build ``base`` with ``lr`` and wrap it.
    ``options`` go to the wrapper when it takes them, otherwise to the base (e.g.
    ``weight_decay``); anything neither takes is a one-line ValueError naming the allowed keys.
    """
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"optimizer lr must be a positive number, got {lr!r}")
    entry = OPTIMIZERS.get(name)
    if not _is_wrapper(entry):
        return _build_plain(name, params, lr, options)
    mine = _accepted(entry.__init__, 2) or set()
    wrapper_opts = {k: v for k, v in options.items() if k in mine}
    base_opts = {k: v for k, v in options.items() if k not in mine}
    try:
        inner = _build_plain(base, params, lr, base_opts)
    except ValueError as exc:
        if str(exc).startswith("unknown option"):
            raise ValueError(f"{exc}; options of {name!r}: {', '.join(sorted(mine))}") from None
        raise
    return entry(inner, **wrapper_opts)


def diagnostics(opt: Any) -> dict[str, float]:
    """Per-round scalars of any optimizer: a wrapper's ``diagnostics()``, {} for plain torch ones.

    Looks through Opacus' ``DPOptimizer`` (``original_optimizer`` is the optimizer it wrapped).
    """
    seen = 0
    while hasattr(opt, "original_optimizer") and seen < 8:
        opt, seen = opt.original_optimizer, seen + 1
    fn = getattr(opt, "diagnostics", None)
    return dict(fn()) if callable(fn) else {}

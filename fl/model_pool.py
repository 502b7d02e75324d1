"""One model per client process, reloaded in place for every train message.

A simulated client (a Ray actor) trains a different partition in every message, but
always the same architecture: building it from the config each time (transformers'
config, init, kernel surgery, adapters; ``from_pretrained`` for a pretrained base)
was up to a quarter of a round's CPU at 100 clients per round (issue 19). The pool
builds it once per (model config, task, seed, device) and, for each message, copies
the state it had when built back into it, parameters and buffers alike (a BatchNorm's
running statistics, a frozen base), before the round's global weights are loaded:
the client starts from exactly what a fresh build gives, so a reused model trains to
the same bits (tested).

A model is *checked out* for the round and *returned* when the round ended normally
(``after_training`` ran, or a defense refused the round before training) and it carries
no hook it did not have when built (Opacus' hooks are removed by ``dp_sgd``); a round
that raised, or left a hook behind, drops it, and the next message builds a fresh one. ``FEDPROBE_MODEL_REUSE=0``
turns reuse off (every message builds).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MAX_MODELS = 1  # models kept per process: a run has one architecture (a sweep runs each point in a process of its own)


class _Entry:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pristine = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
        self.hooks = _hook_count(model)


_POOL: dict[str, _Entry] = {}


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def enabled() -> bool:
    return os.environ.get("FEDPROBE_MODEL_REUSE", "1") != "0"


def checkout(key: str, build: Callable[[], nn.Module]) -> nn.Module:
    """The model for ``key``, as ``build()`` would return it: the pooled one reset in place, or a new build."""
    entry = _POOL.pop(key, None) if enabled() else None
    if entry is None:
        model = build()
        model._fedprobe_pool_entry = _Entry(model)  # type: ignore[attr-defined]
        return model
    model = entry.model
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, value in entry.pristine.items():
            state[name].copy_(value)
    for p in model.parameters():
        p.grad = None
    model._fedprobe_pool_entry = entry  # type: ignore[attr-defined]
    return model


def give_back(key: str, model: nn.Module) -> bool:
    """Return a model after a round that ended normally; False (and dropped) when it is not clean to reuse."""
    entry: Any = getattr(model, "_fedprobe_pool_entry", None)
    if entry is None or not enabled() or _hook_count(model) != entry.hooks:
        return False
    for p in model.parameters():
        p.grad = None
    while len(_POOL) >= MAX_MODELS:
        _POOL.pop(next(iter(_POOL)))
    _POOL[key] = entry
    return True


def clear() -> None:
    _POOL.clear()

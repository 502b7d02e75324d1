"""The optimizer registry: plain torch optimizers and the wrappers around them."""

from __future__ import annotations

from fl.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer", entry_point_group="fedprobe.optimizers")

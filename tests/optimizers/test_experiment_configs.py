"""experiments/opt_*.toml validate and build their optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import optimizers
from fl.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method", ["rdbd", "ra", "rva"])
def test_config_validates_and_builds(method):
    cfg = load_config(ROOT / "experiments" / f"opt_{method}.toml")
    assert cfg.optimizer.name == method and cfg.federation.rounds == 5 and cfg.federation.num_clients == 10
    w = torch.nn.Parameter(torch.zeros(3))
    opt = optimizers.build(cfg.optimizer.name, [w], base=cfg.optimizer.base, lr=cfg.optimizer.lr, **cfg.optimizer.params)
    assert type(opt).name == method and isinstance(opt.base, torch.optim.Adam)

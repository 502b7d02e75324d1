"""Small problems shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn

import optimizers

BASES = ["sgd", "momentum", "adam", "adamw"]
WRAPPERS = ["dbd", "rdbd", "ra", "rva"]
LR = {"sgd": 0.1, "momentum": 0.05, "adam": 0.01, "adamw": 0.01}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, seed: int = 1, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 5, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def train(model: nn.Module, opt: torch.optim.Optimizer, data, closure: bool = False) -> list[float]:
    losses = []
    for x, y in data:
        if closure:
            def fn():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            losses.append(float(opt.step(fn).detach()))
        else:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def build(name: str, model: nn.Module, base: str = "momentum", **options) -> torch.optim.Optimizer:
    lr = LR.get(name, LR[base])  # plain names ignore base
    return optimizers.build(name, model.parameters(), base=base, lr=lr, **options)

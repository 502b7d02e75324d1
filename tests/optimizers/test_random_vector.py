"""Random Vector Accelerating: <g, grad f> >= |grad f|^2 on every step (spec section 3(d) 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optimizers
from tests.optimizers.helpers import batches, tiny_model


class SpySGD(torch.optim.SGD):
    """SGD that records the gradient it is handed."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@pytest.mark.parametrize("subspace, max_gain", [("history", 1.0), ("history", 2.0), ("full", 1.0)])
def test_handed_gradient_always_accelerates(subspace, max_gain):
    m = tiny_model()
    spy = SpySGD(m.parameters(), lr=0.05)
    opt = optimizers.RandomVectorAccelerating(spy, subspace=subspace, max_gain=max_gain, seed=3)
    gains = []
    for x, y in batches(30):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        true = [p.grad.detach().clone() for p in m.parameters()]
        opt.step()
        g = spy.seen[-1]
        inner = sum(float((a.double() * b.double()).sum()) for a, b in zip(g, true))
        sq = sum(float((b.double() ** 2).sum()) for b in true)
        norm_g = sum(float((a.double() ** 2).sum()) for a in g) ** 0.5
        assert inner >= sq * (1 - 1e-6)  # <g, grad f> >= |grad f|^2
        assert norm_g <= 3 * sq**0.5 * (1 + 1e-6)  # and |g| <= 3 |grad f|
        assert inner <= sq * (1 + max_gain) * (1 + 1e-6)  # gain capped
        assert all(torch.equal(p.grad, t) for p, t in zip(m.parameters(), true))  # p.grad restored
        gains.append(inner / sq - 1)
    assert gains[0] == 0.0 or subspace == "full"  # history mode: no history on the first step
    if subspace == "history":
        assert sum(gains) / len(gains) > 0.1  # the span of past gradients carries real gain
        assert opt.diagnostics()["gain"] == pytest.approx(sum(gains) / len(gains), rel=1e-6)
    else:
        assert sum(gains) / len(gains) < 0.1  # a full-space random direction gains E = 2/p = 0.027 here


def test_same_seed_same_trajectory_and_generator_in_state_dict():
    runs = []
    for _ in range(2):
        m = tiny_model()
        opt = optimizers.build("rva", m.parameters(), base="sgd", lr=0.05, seed=7)
        for x, y in batches(5):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in m.parameters()])
        assert "generator" in opt.state_dict()["wrapper"]["extra"]
    assert all(torch.equal(a, b) for a, b in zip(*runs))

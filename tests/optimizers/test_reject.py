"""Reject Accelerating identities (spec section 3(d))."""

from __future__ import annotations

import copy

import pytest
import torch

import optimizers
from tests.optimizers.helpers import batches, params_equal, tiny_model, train

ACCELERATED = [("momentum", {}), ("momentum", {"nesterov": True}), ("adam", {}), ("adamw", {"weight_decay": 0.1}),
               ("adam", {"amsgrad": True, "weight_decay": 0.01})]


def _pair(base, opts, lr=0.01, n=6, **ra_opts):
    torch.manual_seed(0)
    x1 = torch.nn.Parameter(torch.randn(n))
    x2 = torch.nn.Parameter(x1.detach().clone())
    ref = optimizers.build(base, [x1], lr=lr, **opts)
    ra = optimizers.build("ra", [x2], base=base, lr=lr, **opts, **ra_opts)
    return x1, ref, x2, ra


@pytest.mark.parametrize("base, opts", ACCELERATED)
def test_no_rejection_equals_base_bit_for_bit(base, opts):
    """Gradients of one direction and shrinking size never oppose the momentum: RA is the base exactly."""
    x1, ref, x2, ra = _pair(base, opts)
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(6, generator=g)
    for t in range(25):
        grad = direction * 0.9**t
        x1.grad, x2.grad = grad.clone(), grad.clone()
        ref.step()
        ra.step()
        assert not ra.last_rejected
        assert torch.equal(x1, x2)
    assert ra.diagnostics()["reject_rate"] == 0.0


@pytest.mark.parametrize("base, opts", ACCELERATED)
def test_random_gradients_equal_base_until_first_rejection_then_plain_step(base, opts):
    x1, ref, x2, ra = _pair(base, opts)
    g = torch.Generator().manual_seed(2)
    for step in range(50):
        grad = torch.randn(6, generator=g)
        x1.grad, x2.grad = grad.clone(), grad.clone()
        before = x2.detach().clone()
        ref.step()
        ra.step()
        if not ra.last_rejected:
            assert torch.equal(x1, x2)
            continue
        # the rejected step is the base without acceleration, recomputed here independently
        grp, st = ra.param_groups[0], ra.base.state[x2]
        lr, wd = grp["lr"], grp["weight_decay"]
        if base == "momentum":
            expected = before - lr * (grad + wd * before)
        else:
            b1, b2 = grp["betas"]
            t = float(st["step"])
            sq = st["max_exp_avg_sq"] if grp["amsgrad"] else st["exp_avg_sq"]
            denom = sq.sqrt() / (1 - b2**t) ** 0.5 + grp["eps"]
            gh = grad if base == "adamw" else grad + wd * before
            shrink = (1 - lr * wd) if base == "adamw" else 1.0
            expected = before * shrink - lr * gh / denom
        assert torch.allclose(x2, expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(x1, x2)
        assert step >= 1  # the first step has no acceleration to reject
        break
    else:
        pytest.fail("random gradients never triggered a rejection")
    # optimizer state kept following the gradient: base and RA moments are equal
    for k, v in ref.state[x1].items():
        assert torch.equal(v, ra.base.state[x2][k]), k


def test_plain_sgd_never_rejects_and_equals_base():
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    train(m1, optimizers.build("sgd", m1.parameters(), lr=0.1), batches(20))
    ra = optimizers.build("ra", m2.parameters(), base="sgd", lr=0.1)
    train(m2, ra, batches(20))
    assert params_equal(m1, m2)
    assert ra.diagnostics()["rejections"] == 0.0


def _quadratic_run(name: str, steps: int = 150, **opts):
    """Ill-conditioned convex quadratic, exact gradients, heavy-ball SGD (lr 0.9 / L, mu = 0.9)."""
    a = torch.logspace(-2, 0, 20)
    x = torch.nn.Parameter(torch.ones(20))
    opt = optimizers.build(name, [x], base="momentum", lr=0.9, **opts)
    worst, losses = float("inf"), []
    for _ in range(steps):
        x0 = x.detach().clone()
        grad = a * x0
        x.grad = grad.clone()
        opt.step()
        g_eff = (x0 - x.detach()) / 0.9  # the direction actually taken
        worst = min(worst, float(g_eff @ grad / (grad @ grad)))
        losses.append(float(0.5 * (a * x.detach() ** 2).sum()))
    return worst, losses


def test_ra_never_steps_with_less_than_gradient_descent_on_a_quadratic():
    worst_ra, loss_ra = _quadratic_run("ra")
    worst_m, loss_m = _quadratic_run("momentum")
    assert worst_ra >= 1 - 1e-5  # <g_t, grad f> >= |grad f|^2 (1 - tol) on every step
    assert worst_m < 0.5  # heavy ball alone does take such steps here
    assert loss_ra[-1] <= loss_m[-1]  # and RA's loss is no worse at the end


def test_tensor_scope_decides_per_tensor():
    m = tiny_model()
    ra = optimizers.build("ra", m.parameters(), base="adam", lr=0.01, scope="tensor")
    train(m, ra, batches(10))
    # 4 tensors, decided on every step but the first (Adam has no acceleration at t = 1)
    assert ra._stats["decisions"] == 4 * 9 and ra._stats["steps"] == 10


def test_direction_rule_rejects_less_than_acceleration_rule():
    rates = {}
    for rule in ("acceleration", "direction"):
        m = tiny_model()
        ra = optimizers.build("ra", m.parameters(), base="adam", lr=0.01, rule=rule)
        train(m, ra, batches(30))
        rates[rule] = ra.diagnostics()["reject_rate"]
    assert rates["direction"] < rates["acceleration"]

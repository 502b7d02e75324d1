"""DBD / RDBD identities (spec section 7(d))."""

from __future__ import annotations

import copy

import pytest
import torch

import optimizers
from tests.optimizers.helpers import BASES, LR, batches, params_equal, tiny_model, train


@pytest.mark.parametrize("name", ["dbd", "rdbd"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("closure", [False, True])
def test_adaptation_off_equals_base_bit_for_bit(name, base, closure):
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    extra = {"weight_decay": 0.01} if base == "adamw" else {}
    ref = optimizers.build(base, m1.parameters(), lr=LR[base], **extra)
    wrapped = optimizers.build(name, m2.parameters(), base=base, lr=LR[base], kappa=0.0, phi=0.0, **extra)
    data = batches(15)
    train(m1, ref, data, closure=closure)
    train(m2, wrapped, data, closure=closure)
    assert params_equal(m1, m2)
    assert wrapped.param_groups[0]["lr_scale"] == 1.0


def test_adaptation_on_differs_from_base():
    m1, m2 = tiny_model(), tiny_model()
    train(m1, optimizers.build("sgd", m1.parameters(), lr=0.1), batches(15))
    opt = optimizers.build("rdbd", m2.parameters(), base="sgd", lr=0.1)
    train(m2, opt, batches(15))
    assert not params_equal(m1, m2) and opt.param_groups[0]["lr_scale"] != 1.0


def _quadratic(name: str, lr: float, steps: int, closure: bool, a: float = 1.0):
    """f(x) = a x^2 / 2 from x = 1 with exact gradients: (iterates, lr scales)."""
    x = torch.nn.Parameter(torch.ones(1))
    opt = optimizers.build(name, [x], base="sgd", lr=lr, theta=0.0)
    xs, scales = [], []
    for _ in range(steps):
        if closure:
            def fn():
                x.grad = a * x.detach().clone()
                return 0.5 * a * float(x.detach()) ** 2
            opt.step(fn)
        else:
            x.grad = a * x.detach().clone()
            opt.step()
        xs.append(float(x.detach()))
        scales.append(opt.param_groups[0]["lr_scale"])
    return xs, scales


@pytest.mark.parametrize("name", ["dbd", "rdbd"])
@pytest.mark.parametrize("closure", [False, True])
def test_1d_quadratic_grows_lr_on_one_side_and_shrinks_on_overshoot(name, closure):
    xs, scales = _quadratic(name, lr=0.05, steps=20, closure=closure)
    assert all(x > 0 for x in xs)  # iterates stay on one side ...
    assert all(b > a for a, b in zip(scales[1:], scales[2:]))  # ... and eta keeps growing
    assert scales[-1] > 2.0
    xs, scales = _quadratic(name, lr=1.9, steps=6, closure=closure)  # lr * a = 1.9: overshoots
    assert xs[0] < 0 < xs[1]
    assert 0.7 in [pytest.approx(v) for v in scales[:2]]  # eta shrinks by (1 - phi) on the overshoot
    assert max(scales) * 1.9 < 2.0  # and never reaches the unstable lr * a >= 2
    xs, _ = _quadratic(name, lr=1.9, steps=60, closure=closure)
    assert abs(xs[-1]) < 1e-3  # and the iterates then converge


def _sign_noise(name: str, p: float, steps: int = 300, seed: int = 0):
    """Quadratic with condition number 10 whose whole gradient is negated with probability p."""
    g = torch.Generator().manual_seed(seed)
    a = torch.logspace(-1, 0, 10)
    x = torch.nn.Parameter(torch.ones(10))
    opt = optimizers.build(name, [x], base="sgd", lr=0.05, theta=0.0)
    scales = []
    for _ in range(steps):
        grad = a * x.detach()
        x.grad = -grad if torch.rand(1, generator=g) < p else grad
        opt.step()
        scales.append(opt.param_groups[0]["lr_scale"])
    return scales, float(0.5 * (a * x.detach() ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_noise_dbd_drifts_rdbd_stays_in_bounds_and_converges(seed):
    f0 = float(0.5 * torch.logspace(-1, 0, 10).sum())
    dbd_scales, dbd_loss = _sign_noise("dbd", p=0.2, seed=seed)
    rdbd_scales, rdbd_loss = _sign_noise("rdbd", p=0.2, seed=seed)
    assert min(dbd_scales) < 1e-3  # DBD's learning rate collapses: training stalls
    assert dbd_loss > 0.25 * f0
    assert all(0.1 <= s <= 10.0 for s in rdbd_scales)  # RDBD's stays within its bounds
    assert rdbd_loss < 0.1 * f0 and rdbd_loss < 0.5 * dbd_loss


def test_same_batch_closure_cancels_sign_noise():
    """step(closure) measures <grad f_B(x_{t+1}), d_t> on the same (sign-flipped) batch."""
    g = torch.Generator().manual_seed(0)
    a = torch.logspace(-1, 0, 10)
    x = torch.nn.Parameter(torch.ones(10))
    opt = optimizers.build("rdbd", [x], base="sgd", lr=0.05, theta=0.0)
    for _ in range(300):
        flip = -1.0 if torch.rand(1, generator=g) < 0.2 else 1.0

        def closure():
            x.grad = flip * a * x.detach()
            return 0.5 * (a * x.detach() ** 2).sum()

        opt.step(closure)
        assert opt.param_groups[0]["lr_scale"] > 1.0  # never pushed down by the noise
    assert float(0.5 * (a * x.detach() ** 2).sum()) < 1e-6


def test_regret_reverts_a_contradicted_change():
    x = torch.nn.Parameter(torch.ones(1))
    opt = optimizers.build("rdbd", [x], base="sgd", lr=0.1, theta=0.0, kappa=0.5, phi=0.5)
    for grad in (1.0, 1.0):  # second step: <g, d_prev> > 0 -> scale 1.5
        x.grad = torch.tensor([grad])
        opt.step()
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(1.5)
    x.grad = torch.tensor([-1.0])  # contradicts: undo the +0.5, then shrink: 1.0 * 0.5
    opt.step()
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(0.5)
    assert opt.diagnostics()["revert_rate"] == pytest.approx(0.5)
    dbd = optimizers.build("dbd", [x], base="sgd", lr=0.1, theta=0.0, kappa=0.5, phi=0.5)
    for grad in (1.0, 1.0, -1.0):
        x.grad = torch.tensor([grad])
        dbd.step()
    assert dbd.param_groups[0]["lr_scale"] == pytest.approx(0.75)  # no regret: 1.5 * 0.5


def test_effective_lr_diagnostic_follows_scheduler_and_scale():
    x = torch.nn.Parameter(torch.ones(1))
    opt = optimizers.build("rdbd", [x], base="sgd", lr=0.1, theta=0.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for _ in range(3):
        x.grad = x.detach().clone()
        opt.step()
        sched.step()
    d = opt.diagnostics()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert d["lr_eff"] == pytest.approx(opt.param_groups[0]["lr"] * d["lr_scale"]) and d["lr_scale"] > 1

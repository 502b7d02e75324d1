"""Wrappers under Opacus DP-SGD: make_private wraps them and they see the privatised gradient.

Opacus 1.6: ``DPOptimizer(original_optimizer=our wrapper)`` shares the wrapper's
``param_groups``/``state``; its ``step()`` clips per-sample gradients, adds noise, writes the
result to ``p.grad`` and then calls ``original_optimizer.step()`` with no closure.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optimizers

B, C = 32, 0.5  # batch size, max_grad_norm
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _setup(name: str, sigma: float, seed: int = 0):
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    w = torch.randn(20, 10)
    x = torch.randn(128, 20)
    y = (x @ w).argmax(1)
    model = nn.Linear(20, 10)
    opt = optimizers.build(name, model.parameters(), base="momentum", lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, dp_opt, dp_loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=C,
            poisson_sampling=False, noise_generator=torch.Generator().manual_seed(seed),
        )
    return model, opt, dp_model, dp_opt, dp_loader


def _clipped_mean_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Flat per-sample clipping to C, summed, divided by the batch size -- computed by hand."""
    params = [model.weight, model.bias]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        out = x[i : i + 1] @ model.weight.detach().T + model.bias.detach()
        d_out = torch.autograd.grad(nn.functional.cross_entropy(out.requires_grad_(), y[i : i + 1]), [out])[0]  # [1, 10]
        gw, gb = d_out.T @ x[i : i + 1], d_out[0]
        norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
        factor = (C / (norm + 1e-6)).clamp(max=1.0)
        total[0] += factor * gw
        total[1] += factor * gb
    return [t / len(x) for t in total]


@pytest.mark.parametrize("name", ["rdbd", "ra", "rva", "dbd"])
def test_wrapper_sees_the_noised_gradient(name):
    for sigma in (0.0, 1.0):
        model, opt, dp_model, dp_opt, loader = _setup(name, sigma)
        assert dp_opt.original_optimizer is opt  # Opacus wrapped *our* optimizer
        assert dp_opt.param_groups is opt.base.param_groups
        grads: list[list[torch.Tensor]] = []
        opt.register_step_pre_hook(lambda o, a, k: grads.append([p.grad.clone() for p in (model.weight, model.bias)]))
        x, y = next(iter(loader))
        expected = _clipped_mean_grad(model, x, y)
        dp_opt.zero_grad()
        nn.functional.cross_entropy(dp_model(x), y).backward()
        dp_opt.step()
        assert len(grads) == 1
        if sigma == 0.0:
            assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads[0], expected))
        else:
            resid = torch.cat([(g - e).flatten() for g, e in zip(grads[0], expected)])
            assert resid.std().item() == pytest.approx(sigma * C / B, rel=0.2)  # 210 draws of N(0, (sigma C / B)^2)
    assert optimizers.diagnostics(dp_opt) == opt.diagnostics()


@pytest.mark.parametrize("name", ["rdbd", "ra", "rva"])
def test_private_training_learns(name):
    model, opt, dp_model, dp_opt, loader = _setup(name, sigma=0.3)
    xs, ys = loader.dataset.tensors

    def acc():
        with torch.no_grad():
            return (model(xs).argmax(1) == ys).float().mean().item()

    a0 = acc()
    for _ in range(8):
        for x, y in loader:
            dp_opt.zero_grad()
            nn.functional.cross_entropy(dp_model(x), y).backward()
            dp_opt.step()
    assert acc() > a0 + 0.2
    sd = dp_opt.state_dict()
    assert sd["wrapper"]["name"] == name  # checkpoints of the DPOptimizer carry the wrapper state

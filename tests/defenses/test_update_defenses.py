import math

import pytest
import torch

from defenses.accounting import epsilon
from defenses.update import Clip, Prune, UpdateNoise, global_norm
from tests.defenses.helpers import fresh_ctx


def _update(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": scale * torch.randn(64, 64, generator=g), "a.bias": scale * torch.randn(64, generator=g)}


def test_clip_bounds_the_norm_and_keeps_small_updates():
    ctx = fresh_ctx()
    big = _update(scale=1.0)
    out = Clip(max_norm=2.0).transform_update(big, ctx)
    assert global_norm(out) == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(out["a.bias"] / big["a.bias"], torch.full((64,), 2.0 / global_norm(big)))
    assert ctx.metrics["update_clipped"] == 1.0
    small = _update(scale=1e-3)
    out = Clip(max_norm=2.0).transform_update(small, ctx)
    assert all(torch.equal(out[k], small[k]) for k in small)


@pytest.mark.parametrize("mechanism,std_factor", [("gaussian", 1.0), ("laplace", math.sqrt(2))])
def test_noise_has_the_expected_scale(mechanism, std_factor):
    """What the server sees minus the clipped private update has std sigma*C (sqrt(2) b for Laplace)."""
    sigma, C = 0.3, 0.5
    u = _update(scale=1e-4)  # below the clip norm: clipping leaves it unchanged
    ctx = fresh_ctx()
    out = UpdateNoise(noise_multiplier=sigma, clip_norm=C, mechanism=mechanism, seed=0).transform_update(u, ctx)
    diff = torch.cat([(out[k] - u[k]).flatten() for k in u])
    assert diff.std().item() == pytest.approx(std_factor * sigma * C, rel=0.04)
    assert ctx.metrics["update_noise_std"] == pytest.approx(std_factor * sigma * C)
    assert ctx.metrics["update_noise_formal"] == 1.0


def test_gaussian_epsilon_composes_over_rounds():
    d = UpdateNoise(noise_multiplier=2.0, clip_norm=1.0, delta=1e-5, seed=0)
    state: dict = {}
    eps = []
    for rnd in (1, 2, 3):
        ctx = fresh_ctx(state=state, server_round=rnd)
        d.transform_update(_update(), ctx)
        state = ctx.state
        eps.append(ctx.metrics["epsilon"])
    # replace adjacency: sensitivity 2C, accounted noise multiplier sigma / 2, q = 1, one release per round
    assert eps == pytest.approx([epsilon(1.0, 1.0, r, 1e-5) for r in (1, 2, 3)], rel=1e-12)
    ctx = fresh_ctx()
    UpdateNoise(noise_multiplier=2.0, clip_norm=1.0, adjacency="add_remove").transform_update(_update(), ctx)
    assert ctx.metrics["epsilon"] == pytest.approx(epsilon(2.0, 1.0, 1, 1e-5), rel=1e-12)


def test_laplace_clips_l1_and_composes_basic():
    d = UpdateNoise(noise_multiplier=4.0, clip_norm=1.0, mechanism="laplace", seed=0)
    ctx = fresh_ctx()
    for rnd in (1, 2):
        ctx = fresh_ctx(state=ctx.state, server_round=rnd)
        d.transform_update(_update(), ctx)
    assert ctx.metrics["epsilon"] == pytest.approx(2 * (2.0 / 4.0))  # 2 rounds x Delta_1 / b = 2C / (4C)


def test_noise_without_clipping_is_flagged_as_no_guarantee():
    ctx = fresh_ctx()
    out = UpdateNoise(clip_norm=0.0, noise_std=0.1, seed=0).transform_update(_update(), ctx)
    assert ctx.metrics["update_noise_formal"] == 0.0 and math.isinf(ctx.metrics["epsilon"])
    assert not torch.equal(out["a.bias"], _update()["a.bias"])


def test_prune_zeroes_the_smallest_entries():
    u = _update()
    ctx = fresh_ctx()
    out = Prune(sparsity=0.75).transform_update(u, ctx)
    for k in u:
        kept = out[k] != 0
        assert kept.float().mean().item() == pytest.approx(0.25, abs=1 / u[k].numel() + 1e-9)
        assert u[k][kept].abs().min() > u[k][~kept].abs().max()  # kept = largest magnitudes
        assert torch.equal(out[k][kept], u[k][kept])
    assert ctx.metrics["prune_density"] == pytest.approx(0.25, abs=0.01)
    g = Prune(sparsity=0.5, scope="global").transform_update({"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([3.0, 4.0])}, ctx)
    assert g["x"].tolist() == [0.0, 0.0] and g["y"].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("cls,params,match", [
    (UpdateNoise, {"noise_multiplier": -1.0}, "noise_multiplier"),
    (UpdateNoise, {"delta": 0.0}, "delta"),
    (UpdateNoise, {"delta": 1.0}, "delta"),
    (UpdateNoise, {"mechanism": "uniform"}, "mechanism"),
    (UpdateNoise, {"clip_norm": 0.0}, "noise_std"),
    (UpdateNoise, {"accountant": "moments"}, "accountant"),
    (Clip, {"max_norm": 0.0}, "max_norm"),
    (Prune, {"sparsity": 1.0}, "sparsity"),
])
def test_bad_values(cls, params, match):
    with pytest.raises(ValueError, match=match):
        cls(**params)


def test_dlg_recovery_error_grows_with_noise():
    """Spec 5(d)2: DLG on a one-example softmax regression; recovery error increases with sigma.

    Model p = softmax(W a), loss CE; the attacker knows W and the label, observes the noisy
    gradient w.r.t. W (update_noise without clipping) and solves min_a' ||grad(a') - g~||^2.
    """
    torch.manual_seed(0)
    d, k = 6, 3
    W = torch.randn(k, d, dtype=torch.float64)
    a_true = torch.randn(d, dtype=torch.float64)
    y = torch.tensor(1)

    def grad_W(a):
        p = torch.softmax(W @ a, 0)
        return torch.outer(p - torch.nn.functional.one_hot(y, k).double(), a)  # dL/dW [k, d]

    g = grad_W(a_true)
    errors = []
    for sigma in (0.0, 0.01, 0.1, 1.0):
        if sigma == 0:
            g_obs = g
        else:
            ctx = fresh_ctx()
            g_obs = UpdateNoise(clip_norm=0.0, noise_std=sigma, seed=3).transform_update({"W": g}, ctx)["W"]
        best = math.inf
        for start in range(3):
            a = (a_true + 0.5 * torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(start))).requires_grad_()
            opt = torch.optim.LBFGS([a], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = (grad_W(a) - g_obs).pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            best = min(best, (a.detach() - a_true).norm().item())
        errors.append(best)
    assert errors[0] < 1e-6  # spec 5(d)1 on this model: exact recovery without noise
    assert errors == sorted(errors) and errors[-1] > 10 * errors[1]


@pytest.mark.parametrize("name, params, fragment", [
    ("clip", {"max_norm": float("inf")}, "clip max_norm must be a finite number > 0"),
    ("update_noise", {"clip_norm": float("inf")}, "clip_norm must be a finite number >= 0"),
    ("update_noise", {"noise_std": float("inf"), "clip_norm": 0.0}, "noise_std must be a finite number >= 0"),
    ("central_dp", {"clipping_norm": float("inf")}, "clipping_norm must be a finite number > 0"),
])
def test_infinite_norms_and_noise_are_refused(name, params, fragment):
    """Found by the parameter fuzzer: an infinite clip norm has no sensitivity to account, infinite noise no update."""
    import defenses  # noqa: F401  (registers the built-ins)
    from defenses.base import DEFENSES

    with pytest.raises(ValueError, match=fragment):  # the constructor's own check, for library use
        DEFENSES.get(name)(**params)
    key = next(iter(params))
    with pytest.raises(ValueError, match=f"{key} = inf is not a finite number"):  # through a config: the registry's
        DEFENSES.create(name, **params)

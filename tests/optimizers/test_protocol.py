"""Every wrapper behaves as a torch Optimizer: groups, schedulers, checkpoints, hooks, build errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import optimizers
from fl.registry import RegistryError
from tests.optimizers.helpers import BASES, WRAPPERS, batches, build, params_equal, tiny_model, train


def test_registry_lists_all_methods():
    assert set(BASES + WRAPPERS) <= set(optimizers.OPTIMIZERS.names())
    assert optimizers.OPTIMIZERS.entry_point_group == "fedprobe.optimizers"


@pytest.mark.parametrize("name", BASES)
def test_plain_names_build_torch_optimizers_and_ignore_base(name):
    m = tiny_model()
    opt = optimizers.build(name, m.parameters(), base="not-looked-at", lr=0.01)
    assert type(opt).__module__.startswith("torch.optim")
    assert optimizers.diagnostics(opt) == {}
    if name == "momentum":
        assert opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("name", WRAPPERS)
@pytest.mark.parametrize("base", BASES)
def test_wrapper_trains_and_reports_diagnostics(name, base):
    m = tiny_model()
    opt = build(name, m, base=base)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, optimizers.WrappedOptimizer)
    assert opt.param_groups is opt.base.param_groups
    losses = train(m, opt, batches(60))
    assert sum(losses[-10:]) < sum(losses[:10])
    diag = optimizers.diagnostics(opt)
    assert diag and all(isinstance(v, float) and math.isfinite(v) for v in diag.values())


@pytest.mark.parametrize("name", WRAPPERS)
def test_state_dict_round_trip_continues_identically(name):
    data = batches(12)
    m1 = tiny_model()
    o1 = build(name, m1, base="adam")
    train(m1, o1, data[:6])
    sd = copy.deepcopy(o1.state_dict())
    assert "wrapper" in sd and sd["wrapper"]["name"] == name
    m2 = copy.deepcopy(m1)
    o2 = build(name, m2, base="adam")
    o2.load_state_dict(sd)
    assert o2.param_groups is o2.base.param_groups
    train(m1, o1, data[6:])
    train(m2, o2, data[6:])
    assert params_equal(m1, m2)
    assert optimizers.diagnostics(o1) == pytest.approx(optimizers.diagnostics(o2), nan_ok=True)


def test_load_state_dict_rejects_other_method():
    m = tiny_model()
    sd = build("ra", m).state_dict()
    with pytest.raises(ValueError, match="saved by optimizer 'ra'"):
        build("rva", m).load_state_dict(sd)


@pytest.mark.parametrize("name", WRAPPERS)
def test_lr_scheduler_drives_base_lr(name):
    m = tiny_model()
    opt = build(name, m, base="sgd")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert sched.get_last_lr() == [pytest.approx(0.025)]


@pytest.mark.parametrize("name", WRAPPERS)
def test_param_groups_each_get_their_lr(name):
    m = tiny_model()
    groups = [{"params": m[0].parameters(), "lr": 0.0}, {"params": m[2].parameters()}]
    opt = optimizers.build(name, groups, base="sgd", lr=0.1)
    frozen = [p.detach().clone() for p in m[0].parameters()]
    train(m, opt, batches(5))
    assert all(torch.equal(a, b) for a, b in zip(frozen, m[0].parameters()))
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name", WRAPPERS)
def test_closure_step_returns_loss_and_trains(name):
    m = tiny_model()
    opt = build(name, m)
    losses = train(m, opt, batches(60), closure=True)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_step_hooks_run_on_wrapper():
    m = tiny_model()
    opt = build("rdbd", m)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(m, opt, batches(2))
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="nope"), "unknown optimizer 'nope'; choose one of: adam, adamw, dbd"),
        (dict(name="rdbd", kapa=0.1), "unknown option.*kapa.*options of 'rdbd': kappa"),
        (dict(name="sgd", kappa=0.1), "unknown option.*kappa.*for optimizer 'sgd'; allowed: dampening"),
        (dict(name="ra", base="rva"), "base 'rva' is itself a wrapper; choose a plain base"),
        (dict(name="rva", subspace="diag"), "subspace must be 'history' or 'full'"),
        (dict(name="rdbd", min_scale=2.0), "min_scale <= 1 <= max_scale"),
        (dict(name="adam", lr=-1.0), "lr must be a positive number"),
    ],
)
def test_bad_input_gives_one_line_error(kwargs, match):
    kwargs = dict(kwargs)
    name, lr = kwargs.pop("name"), kwargs.pop("lr", 0.01)
    with pytest.raises(ValueError, match=match) as err:
        optimizers.build(name, tiny_model().parameters(), lr=lr, **kwargs)
    assert "\n" not in str(err.value)
    if name == "nope":
        assert isinstance(err.value, RegistryError)


def test_wrapper_options_and_base_options_are_split():
    m = tiny_model()
    opt = optimizers.build("rdbd", m.parameters(), base="adamw", lr=0.01, kappa=0.2, weight_decay=0.5)
    assert opt.kappa == 0.2 and opt.base.param_groups[0]["weight_decay"] == 0.5


def test_plugin_path_base_and_wrapper_of_any_torch_optimizer():
    m = tiny_model()
    opt = optimizers.build("rdbd", m.parameters(), base="torch.optim:RMSprop", lr=0.01, alpha=0.9)
    assert isinstance(opt.base, torch.optim.RMSprop)
    train(m, opt, batches(5))
    ra = optimizers.build("ra", m.parameters(), base="torch.optim:RMSprop", lr=0.01)
    assert ra.family == "generic"
    train(m, ra, batches(5))
    assert math.isfinite(optimizers.diagnostics(ra)["reject_rate"])


def test_diagnostics_reset_clears_counters():
    m = tiny_model()
    opt = build("ra", m, base="adam")
    train(m, opt, batches(5))
    before = opt.diagnostics(reset=True)
    assert before["rejections"] >= 1  # Adam on noisy mini-batches rejects often
    assert opt.diagnostics() == {"reject_rate": 0.0, "rejections": 0.0}

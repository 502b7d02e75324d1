"""fl.model_pool: a client process reuses its model, and trains to the same bits as with a fresh build per message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl import model_pool
from fl.arrays import trainable_state
from fl.config import config_from_dict, load_config


class BatchNormNet(nn.Module):
    """Conv + BatchNorm (running statistics change in training: a buffer the pool must reset) + linear head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # [B, 4, 8, 8]
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))  # [B, classes]


def batchnorm_net(task) -> nn.Module:
    return BatchNormNet(task.num_classes)


def _cfg(tmp_path, family: str | None = None, dp: bool = False):
    cfg = load_config("experiments/quickstart.toml", [
        "federation.num_clients=4", "federation.clients_per_round=4", "federation.local_steps=2",
        "attack.name='none'", f"tracking.output_dir='{tmp_path}'"])
    data = cfg.to_dict()
    if family:
        data["model"] = {"family": family}
    if not dp:
        data["defenses"] = []
    return config_from_dict(data)


def _rounds(cfg) -> list[dict[str, torch.Tensor]]:
    """Clients 0, 1, 0 (round 2 from round 1's client-1 model): what a client process sees over messages."""
    from fl.data import load_federated
    from fl.training import train_client
    from models import build_model, task_for

    data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
    model = build_model(cfg.model, task_for(cfg.model, data.task), seed=cfg.experiment.seed)
    glob = {k: v.detach().clone() for k, v in trainable_state(model).items()}
    states, out, client_state = [], [], {0: {}, 1: {}}
    for rnd, pid in ((1, 0), (1, 1), (2, 0)):
        res = train_client(cfg, pid, glob if rnd == 1 else states[1], rnd, client_state[pid])
        client_state[pid] = res.client_state
        states.append(res.state)
        out += [res.state, {"train_loss": torch.tensor(res.metrics["train_loss"])}]
    return out


def pooled_task(cfg):
    from fl.data import load_federated
    from models import task_for

    return task_for(cfg.model, load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed).task)


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("family,dp", [(None, False), (None, True),
                                       ("tests.fl.test_model_pool:batchnorm_net", False)],
                         ids=["vit", "vit-dp_sgd", "batchnorm"])
def test_reused_model_trains_to_the_same_bits_as_a_fresh_build(tmp_path, monkeypatch, family, dp):
    monkeypatch.setenv("FEDPROBE_CLIENT_SECRET", "pool-test")  # dp_sgd's noise key (fixed: same noise both times)
    cfg = _cfg(tmp_path, family, dp)
    builds = []
    import models

    real = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: builds.append(1) or real(*a, **k))
    model_pool.clear()
    reused = _rounds(cfg)
    assert len(builds) == 2  # one for the test's initial state, one for all three client rounds
    (key, _), = model_pool._POOL.items()
    pooled = model_pool.checkout(key, lambda: None)  # what the next message trains: as built, buffers included
    built = real(cfg.model, pooled_task(cfg), seed=cfg.experiment.seed).state_dict()
    for name, value in pooled.state_dict().items():
        assert torch.equal(value, built[name]), name
    model_pool.clear()
    builds.clear()
    monkeypatch.setenv("FEDPROBE_MODEL_REUSE", "0")
    fresh = _rounds(cfg)
    assert len(builds) == 4  # every round built its own
    _same(reused, fresh)
    model_pool.clear()


def test_a_model_with_a_leftover_hook_or_an_unfinished_round_is_not_reused():
    builds = []

    def build() -> nn.Module:
        builds.append(1)
        return nn.Linear(2, 2)

    model_pool.clear()
    m = model_pool.checkout("k", build)
    handle = m.register_forward_hook(lambda *a: None)
    assert not model_pool.give_back("k", m)  # a hook the build did not have: dropped
    model_pool.checkout("k", build)  # a round that raised never gives its model back
    handle.remove()
    m3 = model_pool.checkout("k", build)
    assert len(builds) == 3
    with torch.no_grad():
        m3.weight.add_(1.0)
    initial = m3._fedprobe_pool_entry.pristine["weight"].clone()
    assert model_pool.give_back("k", m3)
    again = model_pool.checkout("k", build)
    assert again is m3 and len(builds) == 3 and torch.equal(again.weight, initial)  # reset to the built state
    model_pool.clear()

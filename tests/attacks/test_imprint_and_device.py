"""Inverting Gradients on the project's tiny ViT, the malicious imprint attack, attack.device."""

import os

import pytest
import torch

from attacks.base import ATTACKS, Observation, ServerContext, resolve_device
from attacks.harness import run_attack
from fl.config import ModelConfig
from fl.data.federated import load_dataset
from models.build import build_model
from models.tasks import task_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

DATA = load_dataset("digits")
TASK = DATA.task


def calibrated_imprint():
    """imprint calibrated on the server's own digits, handed in as fedprobe's runtime does (attacks.base.ServerContext)."""
    return ATTACKS.create("imprint", calibration="digits").bind(
        ServerContext(public_dataset=lambda name: load_dataset(name).data))


def vit() -> torch.nn.Module:
    return build_model(ModelConfig(family="vit"), TASK, seed=0)  # the project's tiny ViT: 4x4 patches, d=64


def digits(n: int, start: int = 0) -> dict[str, torch.Tensor]:
    items = [DATA.data[i] for i in range(start, start + n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("pixel_values", "labels")}


def observe(batch, start=None, lr=0.1, steps=1, bs=None) -> Observation:
    m = vit()
    if start is not None:
        m.load_state_dict(start, strict=False)
    g0 = {k: v.detach().clone() for k, v in m.named_parameters()}
    n = len(batch["labels"])
    bs = bs or n
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for k in range(steps):
        idx = torch.arange(k * bs, (k + 1) * bs) % n
        opt.zero_grad()
        task_loss(m, {key: v[idx] for key, v in batch.items()}, TASK)[0].backward()
        opt.step()
    md = {"lr": lr, "local_steps": steps, "batch_size": bs, "num_examples": n, "optimizer": "sgd"}
    return Observation(1, 0, 0, g0, {k: v.detach().clone() for k, v in m.named_parameters()}, md, TASK, vit)


def test_inverting_gradients_recovers_a_digit_in_seconds():
    b = digits(1)
    s = run_attack(ATTACKS.create("inverting_gradients", iterations=300, restarts=1, max_seconds=30), observe(b), b)
    assert s["psnr"] > 30 and s["ssim"] > 0.95 and s["label_accuracy"] == 1.0


def test_restarts_keep_the_best_start():
    b = digits(1)
    obs = observe(b)
    one = run_attack(ATTACKS.create("inverting_gradients", iterations=40, restarts=1, seed=3), obs, b)
    three = run_attack(ATTACKS.create("inverting_gradients", iterations=40, restarts=3, seed=3), obs, b)
    assert three["restarts"] == 3
    assert three["grad_distance"] <= one["grad_distance"]  # restart 0 is the same start as the single run


def test_imprint_crafts_and_reads_a_batch_exactly():
    att = ATTACKS.create("imprint")
    assert att.threat_model == "malicious"
    g = {k: v.detach() for k, v in vit().named_parameters()}
    crafted = att.craft(g, 1, 0)
    assert crafted.keys() == g.keys() and all(crafted[k].shape == v.shape and crafted[k].dtype == v.dtype for k, v in g.items())
    b = digits(8, start=10)
    mal = run_attack(att, observe(b, start=crafted), b)
    assert mal["psnr"] > 60 and mal["ssim"] > 0.99  # every image isolated in its own bin
    honest = run_attack(ATTACKS.create("idlg", iterations=40), observe(b), b)  # same victims, honest model
    assert mal["psnr"] > honest["psnr"] + 20


def test_imprint_degrades_gracefully_when_bins_collide():
    att = calibrated_imprint()
    b = digits(64, start=100)  # 64 images into 32 bins: collisions are certain
    s = run_attack(att, observe(b, start=att.craft({k: v.detach() for k, v in vit().named_parameters()}, 1, 0)), b)
    assert s["bins_occupied"] <= 32
    assert 5 < s["psnr"] < 60  # mixtures count against the score


def test_imprint_rejects_other_architectures():
    with pytest.raises(ValueError, match="ViTForImageClassification"):
        ATTACKS.create("imprint").craft({"w": torch.zeros(3)}, 1, 0)


def test_attack_runs_on_the_observation_device():
    b = digits(1)
    obs = observe(b)
    obs.device = "cpu"
    moved = obs.to("cpu")
    assert moved.device == "cpu" and moved.global_params.keys() == obs.global_params.keys()
    rec = ATTACKS.create("idlg", iterations=20).attack(obs)
    assert rec.inputs is not None and rec.inputs.device.type == "cpu"
    with pytest.raises(ValueError, match="attack.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            resolve_device("cuda")


def test_imprint_survives_several_local_steps():
    """FedAvg: 2 SGD steps of one image each; the crafted weights barely move (readout << 1)."""
    att = calibrated_imprint()
    crafted = att.craft({k: v.detach() for k, v in vit().named_parameters()}, 1, 0)
    b = digits(2, start=20)
    obs = observe(b, start=crafted, steps=2, bs=1)
    moved = max(float((obs.client_params[k] - crafted[k]).abs().max()) for k in crafted if "layers.0" in k)
    assert moved < 1e-3
    assert run_attack(att, obs, b)["psnr"] > 60

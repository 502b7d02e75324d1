"""experiments.pretrain_base: pretrain -> save_pretrained -> model.pretrained round trip on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.pretrain_base import pretrain_base
from fl.config import ModelConfig
from fl.data import DATASETS
from models import build_model
from models.adapters import trainable_parameters
from models.build import ModelError


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "vit"
    summary = pretrain_base(out, classes=(0, 1, 2), epochs=2, seed=0)
    assert summary["epochs"] == 2 and summary["train_examples"] + summary["holdout_examples"] == len(
        DATASETS.create("digits_subset", classes=[0, 1, 2]).data)
    assert summary["holdout_accuracy"] > 0.6  # 3 digit classes, chance 0.33: the backbone learned something
    return out


def test_saves_backbone_only_with_summary(base: Path) -> None:
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "vit" and cfg["architectures"] == ["ViTModel"]
    from safetensors.torch import load_file

    assert not any("classifier" in k for k in load_file(base / "model.safetensors"))
    assert json.loads((base / "pretraining.json").read_text())["task"] == "digits_subset classes=[0, 1, 2]"


def test_build_model_loads_backbone_and_fresh_seeded_head(base: Path) -> None:
    from transformers import ViTModel

    task = DATASETS.create("digits_subset", classes=[5, 6, 7, 8, 9]).task  # target task: 5 classes, unseen digits
    model = build_model(ModelConfig(family="vit", pretrained=str(base)), task, seed=3)
    saved = ViTModel.from_pretrained(str(base), add_pooling_layer=False, local_files_only=True)
    loaded = model.vit.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.state_dict().items())
    assert model.classifier.out_features == 5
    again = build_model(ModelConfig(family="vit", pretrained=str(base)), task, seed=3)
    other = build_model(ModelConfig(family="vit", pretrained=str(base)), task, seed=4)
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # server and clients agree
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # the loaded backbone computes what the saved one does
        assert torch.allclose(model.vit(pixel_values=x).last_hidden_state, saved(pixel_values=x).last_hidden_state,
                              atol=1e-5)  # eager vs sdpa attention: rounding only


def test_every_adapter_builds_on_the_pretrained_base_with_its_head_trainable(base: Path) -> None:
    task = DATASETS.create("digits_subset").task
    full = trainable_parameters(build_model(ModelConfig(family="vit", pretrained=str(base)), task))
    counts = {}
    for adapter in ("ntk", "lora", "prefix"):
        model = build_model(ModelConfig(family="vit", pretrained=str(base), adapter=adapter), task)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("classifier" in n for n in names), adapter
        counts[adapter] = trainable_parameters(model)
    head = 64 * 5 + 5
    assert counts["ntk"] == 2 * 4 * (16 * 16 + 16) + head  # layers x heads x (d^2 + d) + head
    assert counts["prefix"] == 2 * 2 * 10 * 64 + head  # layers x (keys, values) x m x hidden + head
    assert counts["lora"] == 2 * 2 * 8 * (64 + 64) + head  # layers x (query, value) x r x (in + out) + head
    assert all(c < full / 10 for c in counts.values())


def test_pretrained_image_size_mismatch_is_one_clear_error(base: Path) -> None:
    task = DATASETS.create("digits_subset", image_size=16).task
    with pytest.raises(ModelError, match="image_size"):
        build_model(ModelConfig(family="vit", pretrained=str(base)), task)

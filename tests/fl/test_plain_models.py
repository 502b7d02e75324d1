"""A plain nn.Module by dotted path (model.family = "module:factory") on an image folder and a pixel CSV."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fl.cli import main
from fl.data.base import DataError
from fl.data.local import pixel_csv
from models.build import ModelError, build_model, check_model, task_for
from models.config import ModelConfig
from models.tasks import TaskSpec, logits_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TASK = TaskSpec(kind="image", num_classes=10, image_shape=(1, 8, 8))


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))  # Ray's workers


def test_plain_factory_builds_and_is_called_positionally(on_path):
    cfg = ModelConfig(family="plain_cnn:small_cnn", params={"width": 4})
    task = task_for(cfg, TASK)
    assert task.call == "positional" and task_for(ModelConfig(), TASK).call == "keywords"
    a, b = build_model(cfg, task, seed=1), build_model(cfg, task, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded
    assert logits_of(a, {"pixel_values": torch.rand(3, 1, 8, 8)}, task).shape == (3, 10)
    check_model(cfg, task)
    with pytest.raises(ModelError, match="do not fit"):
        check_model(ModelConfig(family="plain_cnn:small_cnn", params={"depth": 3}), task)
    with pytest.raises(ModelError, match="model.attention applies to transformers"):
        build_model(ModelConfig(family="plain_cnn:small_cnn", attention="sparse_topk"), task)
    with pytest.raises(ModelError, match="standard library"):
        build_model(ModelConfig(family="os:getcwd"), task)
    with pytest.raises(ModelError, match="cannot import"):
        build_model(ModelConfig(family="no_such_module:f"), task)


def _digits_csv(path: Path, n: int = 300) -> None:
    d = load_digits()
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label"] + [f"p{i}" for i in range(64)])
        for x, y in zip(d.data[:n], d.target[:n]):
            w.writerow([int(y)] + [int(v) for v in x])


def test_pixel_csv_loads_and_refuses_bad_files(tmp_path):
    p = tmp_path / "digits.csv"
    _digits_csv(p, 50)
    data = pixel_csv(str(p), max_value=16)
    x = data.data.tensors["pixel_values"]
    assert x.shape == (50, 1, 8, 8) and data.task.num_classes == 10 and data.task.image_shape == (1, 8, 8)
    assert abs(float(x.mean())) < 1e-5  # normalised with the data's own mean/std, as image_folder
    assert np.array_equal(data.labels, load_digits().target[:50])
    with pytest.raises(DataError, match="does not hold the 64 pixel columns"):
        pixel_csv(str(p), shape=[3, 8, 8])
    with pytest.raises(DataError, match="no 'y' column"):
        pixel_csv(str(p), label_column="y")
    bad = tmp_path / "bad.csv"
    bad.write_text("label,a,b,c\n1,0,1,2\n")
    with pytest.raises(DataError, match="not a square image"):
        pixel_csv(str(bad))


RUN = """
[experiment]
name = "plain-cnn"
seed = 0
[federation]
num_clients = 2
rounds = 2
local_steps = 25
batch_size = 16
[data]
dataset = "{dataset}"
params = {params}
[model]
family = "plain_cnn:small_cnn"
params = {{ width = 8 }}
[optimizer]
name = "adam"
lr = 0.01
[attack]
name = "idlg"
params = {{ iterations = 20 }}
victims = [0]
rounds = [1]
"""


@pytest.mark.parametrize("source", ["pixel_csv", "image_folder"])
def test_fedprobe_run_trains_a_plain_cnn(on_path, tmp_path, monkeypatch, source):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    if source == "pixel_csv":
        _digits_csv(tmp_path / "digits.csv")
        params = '{ path = "digits.csv", max_value = 16 }'
    else:
        d = load_digits()
        for i, (x, y) in enumerate(zip(d.images[:300], d.target[:300])):
            (tmp_path / "images" / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((x * 255 / 16).astype(np.uint8), mode="L").save(tmp_path / "images" / str(y) / f"{i}.png")
        params = '{ path = "images", image_size = 8, mode = "L" }'
    (tmp_path / "run.toml").write_text(RUN.format(dataset=source, params=params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", "run.toml", "--tracking-uri", uri, "--summary-json", "s.json", "--no-progress"]) == 0
    final = json.loads((tmp_path / "s.json").read_text())["final"]
    assert final["accuracy"] > 0.2  # chance is 0.1: the plain CNN learns in 2 rounds
    assert "attack_psnr" in final and final["attack_label_accuracy"] >= 0


def test_pixel_csv_reads_tabular_rows_as_one_by_one_by_f(tmp_path):
    """A tabular CSV (iris: 4 features) is a pixel CSV of shape [1, 1, F]: features [N, 1, 1, 4], for a plain MLP."""
    from sklearn.datasets import load_iris

    d = load_iris()
    p = tmp_path / "iris.csv"
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["species", "sl", "sw", "pl", "pw"])
        for x, y in zip(d.data, d.target):
            w.writerow([d.target_names[y], *x])
    data = pixel_csv(str(p), label_column="species", shape=[1, 1, 4], max_value=8.0)
    assert data.data.tensors["pixel_values"].shape == (150, 1, 1, 4)
    assert data.task.num_classes == 3 and data.task.extra["class_names"] == ["setosa", "versicolor", "virginica"]

"""The README's third-party plugin example runs as documented (dotted paths, PYTHONPATH)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_dotted_path_attack_and_defense_plugins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("""
[federation]
num_clients = 2
rounds = 1
local_steps = 2
[attack]
name = "my_plugins:PositiveFraction"
[[defenses]]
name = "my_plugins:QuantizeUpdate"
params = { step = 0.01 }
""")
    env = dict(os.environ, PYTHONPATH=f"{EXAMPLES}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = subprocess.run([str(Path(sys.executable).parent / "fedprobe"), "run", str(cfg), "--no-progress",
                           "--tracking-uri", uri, "--summary-json", str(tmp_path / "s.json")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert 0.0 < summary["final"]["attack_positive_fraction"] < 1.0
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.data.tags["attack"] == "my_plugins:PositiveFraction"
    assert run.data.tags["defense"] == "my_plugins:QuantizeUpdate"


def test_plugin_classes_behave():
    import importlib.util

    import torch

    # the README puts examples/ on PYTHONPATH; here the module is loaded from its file, leaving sys.path alone
    spec = importlib.util.spec_from_file_location("my_plugins", EXAMPLES / "my_plugins.py")
    my_plugins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(my_plugins)
    out = my_plugins.QuantizeUpdate(step=0.5).transform_update({"w": torch.tensor([0.2, 0.3, -0.9])}, None)
    assert out["w"].tolist() == [0.0, 0.5, -1.0]
    with pytest.raises(ValueError, match="step must be > 0"):
        my_plugins.QuantizeUpdate(step=0)

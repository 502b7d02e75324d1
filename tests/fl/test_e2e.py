"""End to end: a tiny Flower simulation on Ray, tracked in MLflow."""

import json

from mlflow import MlflowClient

from fl.cli import main

TINY = """
[experiment]
name = "tiny-e2e"
seed = 3
[federation]
num_clients = 3
rounds = 2
local_steps = 2
batch_size = 8
[data]
dataset = "digits"
[model]
family = "vit"
size = "tiny"
[optimizer]
name = "adam"
lr = 0.003
[attack]
name = "update_norm"
victims = [0, 2]
"""


def test_tiny_simulation_logs_every_round(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary_path = tmp_path / "summary.json"
    import fl.strategy

    decodes = []  # the aggregation decoding a reply the server hook had already decoded (issue 19: once per reply)
    real = fl.strategy.from_record
    monkeypatch.setattr(fl.strategy, "from_record", lambda record: decodes.append(1) or real(record))
    assert main(["run", "tiny.toml", "--tracking-uri", uri, "--summary-json", str(summary_path), "--no-progress"]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "FINISHED" and summary["rounds_completed"] == 2
    assert decodes == []
    assert {"run_id", "tracking_uri", "final"} <= set(summary)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["federation.num_clients"] == "3"
    for key in ("accuracy", "test_loss", "train_loss", "clients_replied", "bytes_exchanged", "attack_update_norm"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps[-2:] == [1, 2], key
    replied = [m.value for m in client.get_metric_history(run.info.run_id, "clients_replied")]
    assert replied == [3.0, 3.0]
    # the attack ran on the two victims only
    assert client.get_metric_history(run.info.run_id, "per_victim/attack_update_norm/client_0")
    assert not client.get_metric_history(run.info.run_id, "per_victim/attack_update_norm/client_1")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.json", "model"} <= artifacts
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    # what the MLflow UI shows: a training experiment, the headline columns, a description, versions, the commit
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    columns = json.loads(exp.tags["mlflow.sharedViewState.fedprobe"])["selectedColumns"]
    assert columns.index("metrics.`final_accuracy`") < columns.index("metrics.`final_test_loss`")
    assert "tags.`attack`" in columns
    assert run.data.tags["mlflow.note.content"].startswith("tiny-e2e: vit-tiny on digits, 3 clients x 2 rounds")
    assert run.data.params["versions.torch"] and run.data.params["versions.flwr"].startswith("1.42")
    import pathlib
    import subprocess

    import fl

    source = pathlib.Path(fl.__file__).resolve().parent.parent  # the tests run from a checkout (CI clones one)
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run.data.tags["mlflow.source.git.commit"] == head.strip()

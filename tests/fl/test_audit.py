"""fl.audit: a user's own Flower app (examples/flower_app, Flower's quickstart-pytorch shape) audited end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from attacks.gradients import simulate
from fl.arrays import to_record
from fl.audit import _batch_of, _complete_facts, image_task

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "examples" / "flower_app"


@pytest.fixture
def auditapp(monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(APP_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    from auditapp import client_app, server_app, task

    return client_app, server_app, task


def _real_and_replay(task, seed: int, make_opt, lr: float):
    """(real update of the user's train() over 3 examples in batches of 2 for 2 epochs = 4 steps, the last batch of
    each epoch partial; replay(**optimizer facts) -> the largest entry-wise error of the attack's replay)."""
    torch.manual_seed(seed)
    net = task.Net().double()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    data = task.SyntheticImages(3, "train", seed)
    data.images = data.images.double()
    task.train(net, DataLoader(data, batch_size=2, shuffle=False), epochs=2, lr=lr, device="cpu",
               optimizer=make_opt(net.parameters()))
    real = {k: v.detach() - start[k] for k, v in net.named_parameters()}
    spec = image_task(task.NUM_CLASSES, task.IMAGE_SHAPE)
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}

    def replay(**facts):
        out = simulate(task.Net().double(), params, list(params), {"pixel_values": data.images}, data.labels, spec,
                       steps=4, lr=lr, batch_size=2, weight_decay=1e-3, **facts)
        return max(float((out[k] - real[k]).detach().abs().max()) for k in real)

    return max(float(v.abs().max()) for v in real.values()), replay


def test_replay_matches_a_momentum_client_with_a_partial_last_batch(auditapp):
    """The attack's differentiable replay equals the user's real train() with SGD momentum 0.9 and weight decay;
    the wrapping batching ([0,1], [2,0], ...) is a different trajectory, and the test tells them apart."""
    _, _, task = auditapp
    scale, replay = _real_and_replay(task, 0, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
                                     0.1)
    assert replay(momentum=0.9, partial_batches=True) < 1e-10 * max(scale, 1.0)
    assert replay(momentum=0.9, partial_batches=False) > 1e-4 * scale


def test_facts_and_oracle_formats():
    class Reply:  # the part of a Flower Message _complete_facts reads
        class content:  # noqa: N801
            metric_records = {"metrics": {"num-examples": 5}}

    class Ctx:
        node_config = {"partition-id": 3}

    f = _complete_facts({"lr": 0.1, "batch_size": 2, "epochs": 2}, Reply, Ctx)
    assert f["num_examples"] == 5 and f["local_steps"] == 6 and f["partition_id"] == 3 and f["partial_batches"]
    with pytest.raises(ValueError, match="lack batch_size"):
        _complete_facts({"lr": 0.1}, Reply, Ctx)
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    assert set(_batch_of((x, y))) == {"pixel_values", "labels"}
    assert _batch_of([(x[:2], y[:2]), (x[2:], y[2:])])["pixel_values"].shape == (4, 3, 8, 8)
    assert set(_batch_of((torch.arange(6).view(2, 3), y[:2]))) == {"input_ids", "labels"}
    with pytest.raises(ValueError, match="without 'labels'"):
        _batch_of({"img": x})


def _latest_run(uri: str, experiment: str = "auditapp"):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0]


def test_audit_own_flower_app_in_process(auditapp, tmp_path):
    """iDLG on client 0 in round 1 (B = 1) of the user's app, with private_training (DP-SGD), central_dp around
    its FedAvg, and a client that
    poisons its round-2 reply with NaN: the run holds attack_psnr, final_accuracy, a composed epsilon per round,
    the rejection, the images and summary.json; the wrapped FedAvg never sees fedprobe's records."""
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp

    from fl.audit import audit_mod
    from fl.simulation import run_apps

    client_app, server_app, _ = auditapp

    def poison(msg, context, call_next):  # outermost: after audit_mod, as a hostile client would
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) == 2:
            state = reply.content["arrays"].to_torch_state_dict()
            state["fc2.bias"] = state["fc2.bias"] * float("nan")
            reply.content["arrays"] = ArrayRecord(state)
        return reply

    app = ClientApp(mods=[poison, audit_mod(facts=client_app.facts, oracle=client_app.oracle)])
    app.train()(client_app.train)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = {"tracking-uri": uri, "output-dir": str(tmp_path / "out"), "dp-noise": 0.5, "central-dp-noise": 0.5,
          "num-server-rounds": 2}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0},
               "init_args": {"address": "local", "num_cpus": 2, "logging_level": "ERROR", "log_to_driver": True}}
    run_apps(server_app.app, app, 2, backend, run_config=rc)

    client, run = _latest_run(uri)
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert 0 < m["attack_psnr"] < 200 and "final_accuracy" in m and "attack_label_accuracy" in m
    eps = [x.value for x in client.get_metric_history(run.info.run_id, "epsilon")]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] and math.isfinite(eps[1])  # composed over rounds
    central = [x.value for x in client.get_metric_history(run.info.run_id, "central_epsilon")]
    assert len(central) == 2 and 0 < central[0] < central[1]  # central_dp(FedAvg): client-level epsilon per round
    rejected = {x.step: x.value for x in client.get_metric_history(run.info.run_id, "clients_rejected")}
    assert rejected == {1: 0.0, 2: 1.0}
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "events.txt", "attacks"} <= arts
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert summary["status"] == "FINISHED" and any("NaN" in e for e in summary["events"])
    assert not (tmp_path / "out" / "ground-truth").exists() or not any((tmp_path / "out" / "ground-truth").rglob("*.pt"))
    assert run.data.params["attack.name"] == "idlg" and run.data.tags["fedprobe.kind"] == "audit"


@pytest.mark.slow
def test_audit_own_flower_app_under_flwr_run(tmp_path):
    """The same app under `flwr run --stream` (Flower's simulation engine, SuperLink and all)."""
    import psutil

    before = {p.pid for p in psutil.process_iter(["cmdline"]) if "flower-superlink" in " ".join(p.info["cmdline"] or [])}
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], FLWR_HOME=str(tmp_path / "flwr"),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        proc = subprocess.run([shutil.which("flwr", path=env["PATH"]), "run", str(app), "--stream", "--run-config",
                               f"tracking-uri='{uri}' output-dir='{tmp_path / 'out'}'"],
                              capture_output=True, text=True, env=env, timeout=600)
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if "flower-superlink" in " ".join(p.info["cmdline"] or []) and p.pid not in before:
                p.kill()
    assert "auditapp: run" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    _, run = _latest_run(uri)
    assert run.info.status == "FINISHED" and "attack_psnr" in run.data.metrics and "final_accuracy" in run.data.metrics


def test_replay_matches_an_adam_client(auditapp):
    """Adam (bias-corrected, L2 weight decay): the replay is the real update; the same replay read as SGD is not."""
    _, _, task = auditapp
    scale, replay = _real_and_replay(
        task, 1, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3), 0.01)
    assert replay(optimizer="adam", betas=(0.8, 0.99), eps=1e-6, partial_batches=True) < 1e-9 * scale
    assert replay(partial_batches=True) > 1e-3 * scale


def _reply(node: int, weight, record: str = "train_metrics", key: str = "n"):
    import time

    from flwr.app import MessageType, Metadata, MetricRecord, RecordDict
    from flwr.app.message.message import make_message

    meta = Metadata(run_id=0, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="r",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": to_record({"w": torch.full((2,), float(node))}),
                          record: MetricRecord({key: weight} if weight is not None else {"loss": 1.0})})
    return make_message(meta, content)


def test_reply_weights_are_checked_in_any_record_under_the_strategys_key():
    """The audit checks the wrapped strategy's ``weighted_by_key`` (one check with fedprobe's own server,
    fl.replies.check_weight) in whatever metric record the user's app sends; a bad weight is one event."""
    from flwr.serverapp.strategy import FedAvg

    from fl.audit import AuditStrategy

    audit = AuditStrategy(FedAvg(weighted_by_key="n"), attack="idlg", model=lambda: torch.nn.Linear(2, 2),
                          task=image_task(2, (1, 1, 2)), victims=(), rounds=())
    replies = [_reply(1, 3), _reply(2, float("nan")), _reply(3, 0), _reply(4, -1.5), _reply(5, 1.0)]
    arrays, _ = audit.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"]
    assert torch.allclose(w, torch.full((2,), (1 * 3 + 5 * 1.0) / 4.0))  # only nodes 1 and 5, weighted 3 : 1
    assert len(audit.events) == 3 and all("aggregation weight n = " in e for e in audit.events)
    # fedprobe's own replies: the record is "metrics" and num-examples must be there
    from fl.arrays import InvalidUpdate
    from fl.replies import check_weight

    with pytest.raises(InvalidUpdate, match="num-examples is missing"):
        check_weight(_reply(1, 3, record="metrics").content)
    with pytest.raises(InvalidUpdate, match="no 'metrics' record"):
        check_weight(_reply(1, 3).content)
    check_weight(_reply(1, 3, record="metrics", key="num-examples").content)

"""Client-side RICL in the federation: the client handler alone, then end to end on Flower + Ray."""

import json
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from mlflow import MlflowClient

from experiments.ricl_federated import (
    OPTIONS_KEY, FedRICLOptions, client_train, client_val_split, instance_beta, instance_prompt, load_model, simulate,
)
from fl.arrays import from_record, to_record
from models.icl.reweight import ricl_client_weights
from models.icl.tasks import Prompt, sample_prompt


def _train_message(opts: FedRICLOptions, instance: int, prompt: Prompt) -> Message:
    content = RecordDict({"arrays": to_record({"xs": prompt.xs, "ys": prompt.ys}),
                          "config": ConfigRecord({OPTIONS_KEY: opts.to_json(), "instance": instance})})
    # as delivered to a node (Message(..., dst_node_id=...) needs a running Flower task identity)
    meta = Metadata(run_id=0, message_id="m0", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="0",
                    created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return make_message(meta, content)


def _context(pid: int) -> Context:
    return Context(run_id=0, node_id=1, node_config={"partition-id": pid, "num-partitions": 3}, state=RecordDict(),
                   run_config={})


def test_client_splits_are_deterministic_private_and_unbiased():
    opts = FedRICLOptions(model="ridge", dim=2, n_val=500)
    a, b = client_val_split(opts, 0, 0), client_val_split(opts, 0, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = client_val_split(opts, 0, 1)
    assert not torch.allclose(a[0], c[0])
    assert abs((a[1] > 0).float().mean().item() - 0.5) < 0.08  # D_val is class-balanced
    assert not torch.equal(instance_beta(opts, 0), instance_beta(opts, 1))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="model"):
        FedRICLOptions(model="gpt")
    with pytest.raises(ValueError, match="train key"):
        FedRICLOptions(train={"epochs": 3})


def test_client_handler_trains_into_the_cache_once_and_sends_only_m_weights(tmp_path):
    torch.set_num_threads(1)
    opts = FedRICLOptions(model="transformer", dim=2, n_examples=6, n_val=16, steps=5, cache_dir=str(tmp_path),
                          train={"steps": 3, "batch": 8, "n_embd": 16, "n_layer": 1, "n_head": 2})
    beta = instance_beta(opts, 0)
    prompt = sample_prompt(opts.icl_task, "imbalanced", torch.Generator().manual_seed(0), beta=beta)
    replies = [client_train(_train_message(opts, 0, prompt), _context(pid)) for pid in (0, 1)]
    assert len(list(tmp_path.glob("icl-classification-*.pt"))) == 1  # built once, then loaded from the cache
    for pid, reply in enumerate(replies):
        assert sorted(reply.content.keys()) == ["arrays", "metrics"]
        w = from_record(reply.content["arrays"])
        assert list(w) == ["weights"] and w["weights"].shape == (6,)
        assert (w["weights"] > 0).all()
        metrics = reply.content["metrics"]
        assert metrics["partition-id"] == pid and metrics["num-examples"] == 16
        expect = ricl_client_weights(load_model(opts), Prompt(prompt.xs, prompt.ys, torch.zeros(2)),
                                     client_val_split(opts, 0, pid), **opts.method_kwargs())
        assert torch.allclose(w["weights"], expect["weights"], atol=1e-6)
        assert metrics["val_loss"] == pytest.approx(expect["val_loss"], rel=1e-5)
    assert not torch.allclose(from_record(replies[0].content["arrays"])["weights"],
                              from_record(replies[1].content["arrays"])["weights"])


@pytest.mark.slow
def test_three_clients_learn_weights_on_their_own_splits_end_to_end(tmp_path):
    """Real Flower simulation (Ray): imbalanced prompts, the weighted-ridge in-context learner."""
    opts = FedRICLOptions(model="ridge", task="classification", prompt="imbalanced", dim=2, n_examples=20, loss="mse",
                          instances=2, n_val=100, n_test=1000, lam=0.1, steps=60, cache_dir=str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = simulate(opts, num_clients=3, tracking_uri=uri, run_name="test-fed-ricl")
    model = load_model(opts)
    for row in res["instances"]:
        clients = row["clients"]
        assert [c["partition_id"] for c in clients] == [0, 1, 2] and not row["errors"]
        prompt = instance_prompt(opts, row["instance"])
        for c in clients:
            # only the m weights travelled back
            assert c["sent"] == {"records": ["arrays", "metrics"], "arrays": {"weights": [20]}, "numel": 20}
            assert c["num_examples"] == 100 and c["val_loss"] < c["val_loss_uniform"]
            # ... and they are what RICL gives on this client's own split
            own = ricl_client_weights(model, prompt, client_val_split(opts, row["instance"], c["partition_id"]),
                                      **opts.method_kwargs())
            assert torch.allclose(torch.tensor(c["weights"]), own["weights"], atol=1e-4)
        W = torch.tensor([c["weights"] for c in clients])
        assert not torch.allclose(W[0], W[1])  # different splits, different weights
        assert torch.allclose(torch.tensor(row["weights_fed"]), W.mean(0), atol=1e-5)  # equal sizes: plain mean
        assert row["w_major"] < row["w_minor"]  # the over-represented class is down-weighted
        assert row["fed_ricl"]["loss"] < 0.95 * row["icl"]["loss"]  # held-out test loss, w = 1 vs federated w
    s = res["summary"]
    assert s["fed_ricl"]["acc"][0] > s["icl"]["acc"][0]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model"] == "ridge"
    assert sorted(m.step for m in client.get_metric_history(res["run_id"], "fed_ricl.loss")) == [0, 1]
    art = json.loads(Path(client.download_artifacts(res["run_id"], "ricl_federated.json", str(tmp_path))).read_text())
    assert art["summary"]["fed_ricl"]["loss"][0] == pytest.approx(s["fed_ricl"]["loss"][0])


def test_laricl_mode_replies_with_closed_form_weights():
    opts = FedRICLOptions(model="ridge", method="laricl", dim=2, n_examples=20, loss="mse", n_val=200,
                          laricl_lams=[0.1, 1.0, 10.0])
    prompt = instance_prompt(opts, 0)
    reply = client_train(_train_message(opts, 0, prompt), _context(2))
    w = from_record(reply.content["arrays"])["weights"]
    expect = ricl_client_weights(load_model(opts), prompt, client_val_split(opts, 0, 2), **opts.method_kwargs())
    assert torch.allclose(w, expect["weights"].float(), atol=1e-6)
    assert reply.content["metrics"]["val_loss"] < reply.content["metrics"]["val_loss_uniform"]


def test_simulation_runs_on_fedprobes_engine_in_a_private_ray(monkeypatch):
    """The RICL protocol brings only its two app bodies: engine, backend and error reporting are fl.simulation's."""
    import fl.simulation

    seen = {}

    def fake_run_apps(server_app, client_app, num_clients, backend, verbose=False, run_config=None):
        seen.update(client_app=client_app, num_clients=num_clients, backend=backend)

    monkeypatch.setattr(fl.simulation, "run_apps", fake_run_apps)
    with pytest.raises(fl.simulation.SimulationError, match="ended without a result"):
        simulate(FedRICLOptions(model="ridge", instances=1), num_clients=3)
    from experiments.ricl_federated import client_app

    assert seen["client_app"] is client_app and seen["num_clients"] == 3
    assert seen["backend"]["init_args"]["address"] == "local"  # never a cluster `ray start` or RAY_ADDRESS left
    assert seen["backend"]["client_resources"] == {"num_cpus": 1, "num_gpus": 0}

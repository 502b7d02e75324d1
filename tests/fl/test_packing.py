"""Several clients per SuperNode (fl.packing): the same run as one client per node, in fewer messages."""

from __future__ import annotations

import re

import mlflow
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fl import packing
from fl.config import config_from_dict
from fl.recorder import RunOptions


@pytest.fixture
def task_identity(monkeypatch):
    """Messages made outside a Flower run need a run id (Flower sets it for the ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, attr):
            monkeypatch.setattr(TaskIdentity, attr, 1)


class FakeGrid:
    """Real nodes 11, 7, 30; each answers a packed message with one reply per partition it could train."""

    def __init__(self, fail: set[int] = frozenset(), silent: set[int] = frozenset()) -> None:
        self.sent: list[Message] = []
        self.fail, self.silent = fail, silent

    def get_node_ids(self) -> list[int]:
        return [11, 7, 30]

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            if msg.metadata.dst_node_id in self.silent:
                continue
            results = []
            for pid, content in packing.members_of(msg.content):
                if pid in self.fail:
                    results.append((pid, f"ValueError: client {pid} broke"))
                    continue
                x = next(iter(content["arrays"].to_torch_state_dict().values()))
                results.append((pid, RecordDict({
                    "arrays": ArrayRecord({"w": x + pid}), "metrics": MetricRecord({"num-examples": pid + 1}),
                    "meta": ConfigRecord({"round": int(content["config"]["server-round"])})})))
            out.append(Message(packing.reply_content(results), reply_to=_delivered(msg)))
        return out


def _delivered(msg: Message) -> Message:
    """``msg`` as its node receives it (the SuperLink fills in the sender): what a ClientApp replies to."""
    from flwr.app import Metadata

    m = msg.metadata
    meta = Metadata(run_id=m.run_id, message_id="x", src_node_id=1, dst_node_id=m.dst_node_id, reply_to_message_id="",
                    group_id="", created_at=m.created_at, ttl=m.ttl, message_type=m.message_type)
    return Message(msg.content, metadata=meta)


def _messages(grid, pids, crafted=()):
    arrays, config = ArrayRecord({"w": torch.zeros(3)}), ConfigRecord({"server-round": 4})
    out = []
    for pid in pids:
        a = ArrayRecord({"w": torch.full((3,), 100.0)}) if pid in crafted else arrays
        out.append(Message(RecordDict({"arrays": a, "config": config}), dst_node_id=packing.VIRTUAL_BASE + pid,
                           message_type=MessageType.TRAIN))
    return out


@pytest.mark.usefixtures("task_identity")
def test_packed_grid_sends_one_message_per_node_each_record_once_and_unpacks_per_partition():
    real = FakeGrid(fail={4})
    grid = packing.PackedGrid(real, num_clients=9, supernodes=3)
    assert grid.get_node_ids() == [packing.VIRTUAL_BASE + p for p in range(9)]
    # the partition query is answered without a message
    query = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
             for n in grid.get_node_ids()]
    answers = grid.send_and_receive(query)
    assert real.sent == [] and [int(r.content["info"]["partition-id"]) for r in answers] == list(range(9))
    assert [r.metadata.src_node_id for r in answers] == grid.get_node_ids()

    replies = grid.send_and_receive(_messages(grid, [0, 1, 3, 4, 8], crafted={3}))
    # partition p on the (p mod 3)-th node in id order [7, 11, 30]: 0, 3 -> 7; 1, 4 -> 11; 8 -> 30
    assert sorted((m.metadata.dst_node_id, tuple(m.content[packing.PACK_KEY]["partitions"])) for m in real.sent) == \
        [(7, (0, 3)), (11, (1, 4)), (30, (8,))]
    to_7 = next(m for m in real.sent if m.metadata.dst_node_id == 7)
    assert len(to_7.content.array_records) == 2 and len(to_7.content.config_records) == 2  # shared config once
    by_pid = {r.metadata.src_node_id - packing.VIRTUAL_BASE: r for r in replies}
    assert sorted(by_pid) == [0, 1, 3, 4, 8]
    assert by_pid[4].has_error() and "client 4 broke" in by_pid[4].error.reason
    for pid in (0, 1, 8):
        w = by_pid[pid].content["arrays"].to_torch_state_dict()["w"]
        assert torch.equal(w, torch.full((3,), float(pid)))
        assert int(by_pid[pid].content["metrics"]["num-examples"]) == pid + 1
        assert set(by_pid[pid].content.keys()) == {"arrays", "metrics", "meta"}
    assert torch.equal(by_pid[3].content["arrays"].to_torch_state_dict()["w"], torch.full((3,), 103.0))  # crafted


@pytest.mark.usefixtures("task_identity")
def test_the_client_app_parses_a_shared_config_and_global_model_once_per_packed_message(monkeypatch):
    import json

    from flwr.app import Context

    from fl import client_app
    from fl.protocol import CONFIG_KEY
    from fl.training import ClientResult

    parsed, seen = [], []
    real_parse = client_app.config_from_dict
    monkeypatch.setattr(client_app, "config_from_dict", lambda d: parsed.append(1) or real_parse(d))
    decoded = []
    real_decode = client_app.from_record
    monkeypatch.setattr(client_app, "from_record", lambda r: decoded.append(1) or real_decode(r))

    def fake_train(cfg, pid, global_state, server_round, client_state, record_oracle):
        seen.append((pid, id(cfg), id(global_state), float(global_state["w"][0])))
        return ClientResult(state={"w": global_state["w"] + pid}, metrics={"num-examples": 1}, meta={},
                            client_state={})

    monkeypatch.setattr(client_app, "train_client", fake_train)
    cfg_json = json.dumps(config_from_dict({}).model_dump(mode="json"))
    grid = packing.PackedGrid(FakeGrid(), num_clients=9, supernodes=1)
    msgs = _messages(grid, [0, 1, 2, 5], crafted={2})
    for m in msgs:  # one config record object, as the server sends it
        m.content["config"] = msgs[0].content["config"]
    msgs[0].content["config"][CONFIG_KEY] = cfg_json
    packed = packing.pack([(p, m.content) for p, m in zip([0, 1, 2, 5], msgs)], 7, MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = client_app.train(_delivered(packed), ctx)
    assert len(parsed) == 1  # one config for four partitions
    assert len(decoded) == 2  # the global model once, the crafted victim's model once
    assert len({c for _, c, _, _ in seen}) == 1
    assert [(p, w) for p, _, _, w in seen] == [(0, 0.0), (1, 0.0), (2, 100.0), (5, 0.0)]
    assert seen[0][2] == seen[1][2] == seen[3][2] != seen[2][2]
    out = {int(k.rpartition("@")[2]): v for k, v in reply.content.items() if k.startswith("arrays@")}
    assert {p: float(a.to_torch_state_dict()["w"][0]) for p, a in out.items()} == {0: 0.0, 1: 1.0, 2: 102.0, 5: 5.0}


@pytest.mark.usefixtures("task_identity")
def test_a_node_that_fails_or_stays_silent_takes_only_its_own_partitions_with_it():
    real = FakeGrid(silent={30})
    grid = packing.PackedGrid(real, num_clients=6, supernodes=3)
    replies = grid.send_and_receive(_messages(grid, [0, 1, 2, 5]))  # 2, 5 -> node 30
    assert sorted(r.metadata.src_node_id - packing.VIRTUAL_BASE for r in replies) == [0, 1]

    class Failing(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [Message(Error(2, "boom"), reply_to=_delivered(m)) for m in messages]

    replies = packing.PackedGrid(Failing(), num_clients=6, supernodes=3).send_and_receive(_messages(grid, [0, 3]))
    assert [r.has_error() and r.error.reason == "boom" for r in replies] == [True, True]


@pytest.mark.usefixtures("task_identity")
def test_wrap_keeps_the_grid_with_one_node_per_client_and_config_checks():
    real = FakeGrid()
    assert packing.wrap(real, 3, 0) is real and packing.wrap(real, 3, 3) is real
    assert isinstance(packing.wrap(real, 9, 3), packing.PackedGrid)
    with pytest.raises(ValueError, match="federation.supernodes"):
        config_from_dict({"federation": {"num_clients": 3, "supernodes": 4}})


RUN = {
    "experiment": {"seed": 5},
    "federation": {"num_clients": 6, "clients_per_round": 4, "rounds": 2, "local_steps": 2, "batch_size": 8,
                   "failure_rate": 0.2},
    "data": {"dataset": "digits"}, "model": {"family": "vit", "size": "tiny"},
    "optimizer": {"name": "adam", "lr": 0.003},
    "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 0.5, "max_grad_norm": 1.0, "noise_seed": 7}}],
    "attack": {"name": "update_norm", "victims": [1, 4]},
}


def _run(tmp_path, name: str, supernodes: int) -> tuple[dict, dict[str, torch.Tensor]]:
    from fl.simulation import simulate

    data = {**RUN, "federation": {**RUN["federation"], "supernodes": supernodes},
            "tracking": {"output_dir": str(tmp_path / name)}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = simulate(config_from_dict(data), RunOptions(progress=False, tracking_uri=uri))
    path = mlflow.MlflowClient(tracking_uri=uri).download_artifacts(summary["run_id"], "model/global_state.pt",
                                                                    str(tmp_path / f"{name}-model"))
    return summary, torch.load(path)


@pytest.mark.slow  # two Ray simulations (~45 s); the default job keeps the unit tests above (packing, the parse cache)
def test_two_supernodes_give_the_global_model_of_one_node_per_client(tmp_path, monkeypatch):
    one, model_one = _run(tmp_path, "one", 0)
    packs: list[tuple[int, int]] = []  # (node, partitions in its message)
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda members, node, kind: packs.append((node, len(members))) or
                        real_pack(members, node, kind))
    packed, model_packed = _run(tmp_path, "packed", 2)
    assert len({node for node, _ in packs}) == 2 and len(packs) == 4  # 2 nodes x 2 rounds, no partition query
    assert sum(n for _, n in packs) == 8  # 4 clients per round
    assert one["status"] == packed["status"] == "FINISHED" and one["rounds_completed"] == 2
    assert model_one.keys() == model_packed.keys()
    for k in model_one:
        assert torch.equal(model_one[k], model_packed[k]), k
    keys = ("test_loss", "accuracy", "clients_failed", "clients_replied", "epsilon", "attack_update_norm")
    assert {k: one["final"][k] for k in keys} == {k: packed["final"][k] for k in keys}
    assert one["final"]["epsilon"] > 0 and one["final"]["clients_replied"] >= 1
    failed = [re.findall(r"round \d+: client \d+ failed", "\n".join(s["events"])) for s in (one, packed)]
    assert failed[0] == failed[1] and failed[0], failed  # the same clients failed (failure_rate), each alone


@pytest.mark.slow  # three Ray simulations (~80 s)
def test_a_packed_run_stopped_and_resumed_ends_as_the_uninterrupted_one(tmp_path):
    """Each client's DP ledger lives on its SuperNode; after --resume (new nodes) the server hands it back."""
    from fl.simulation import SimulationError, simulate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = {**RUN, "federation": {**RUN["federation"], "supernodes": 2, "rounds": 3, "failure_rate": 0.0},
            "tracking": {"output_dir": str(tmp_path / "out")}}
    cfg = config_from_dict(data)
    full = simulate(cfg, RunOptions(progress=False, tracking_uri=uri))
    started: list[str] = []
    with pytest.raises(SimulationError, match="stop_after_round"):
        simulate(cfg, RunOptions(progress=False, tracking_uri=uri, stop_after_round=1, on_start=started.append))
    resumed = simulate(cfg, RunOptions(progress=False, tracking_uri=uri, resume_run_id=started[0]))
    assert resumed["status"] == "FINISHED" and resumed["rounds_completed"] == 3
    for key in ("epsilon", "test_loss", "accuracy"):
        assert resumed["final"][key] == full["final"][key], key
    assert full["final"]["epsilon"] > 0

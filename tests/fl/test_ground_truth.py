"""Ground truth stays out of band (fl.ground_truth): never in a reply, never in the attack's Observation, read by
the scorer only after the attack returned, and gone after the run."""

from pathlib import Path

import torch

from attacks.base import Attack, Observation, Reconstruction
from fl import ground_truth
from fl.cli import main

SEEN: list[dict] = []  # what the snooping attack found, per call (the ServerApp runs in this process)


class Snoop(Attack):
    """A reconstructing attack that looks everywhere the server's API lets it look for the victim's batch."""

    def attack(self, obs: Observation) -> Reconstruction:
        folder = Path("out") / "ground-truth"
        files = sorted(str(p) for p in folder.rglob("*.pt")) if folder.is_dir() else []
        SEEN.append({"labels": obs.labels, "shared": dict(obs.shared), "meta_keys": sorted(obs.metadata),
                     "files_during_attack": files,
                     "global_abs_sum": sum(float(v.abs().sum()) for v in obs.global_params.values())})
        for t in [*obs.global_params.values(), *obs.client_params.values()]:  # vandalism: it must reach nothing
            t.zero_()
        shape = (int(obs.metadata.get("batch_size", 1)), *obs.task.image_shape)
        return Reconstruction(inputs=torch.zeros(shape), labels=torch.zeros(shape[0], dtype=torch.long))


CFG = """
[experiment]
name = "ground-truth"
[federation]
num_clients = 2
rounds = 1
local_steps = 1
batch_size = 2
[attack]
name = "tests.fl.test_ground_truth:Snoop"
victims = [0, 1]
[tracking]
output_dir = "out"
"""


def test_ground_truth_never_travels_and_is_scored_after_the_attack(tmp_path, monkeypatch):
    from fl import server_hook

    replies_seen: list[list[str]] = []
    inspect = server_hook.ServerHook.inspect

    def spy(self, server_round, sent, messages, replies):
        replies_seen.extend(sorted(r.content.keys()) for r in replies if not r.has_error())
        configs = [dict(m.content["config"].items()) for m in messages]
        assert all(not any(isinstance(v, (bytes, list)) for v in c.values()) for c in configs)
        return inspect(self, server_round, sent, messages, replies)

    monkeypatch.setattr(server_hook.ServerHook, "inspect", spy)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(CFG)
    SEEN.clear()
    assert main(["run", "c.toml", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--no-progress",
                 "--summary-json", "s.json"]) == 0
    assert replies_seen and all("oracle" not in keys for keys in replies_seen), replies_seen
    assert len(SEEN) == 2 and all(s["labels"] is None and s["shared"] == {} for s in SEEN)
    # the victims' files exist while the attack runs (on disk, out of every message), the scorer reads each after
    assert [len(s["files_during_attack"]) for s in SEEN] == [2, 1]
    # victim 0's attack zeroed what it observed in place: victim 1's attack still sees the server's global model
    assert SEEN[0]["global_abs_sum"] > 0 and SEEN[1]["global_abs_sum"] == SEEN[0]["global_abs_sum"]
    import json

    final = json.loads((tmp_path / "s.json").read_text())["final"]
    assert "attack_psnr" in final and "attack_label_accuracy" in final  # scored against the real batch
    assert not (tmp_path / "out" / "ground-truth").exists() or not any((tmp_path / "out" / "ground-truth").rglob("*"))


def test_store_round_trip_is_private_and_read_once(tmp_path):
    token = ground_truth.new_token()
    batch = {"pixel_values": torch.randn(2, 1, 8, 8), "labels": torch.tensor([3, 1])}
    p = ground_truth.write(tmp_path, token, 4, 1, batch)
    assert p.stat().st_mode & 0o777 == 0o600 and p.parent.stat().st_mode & 0o077 == 0
    assert torch.equal(ground_truth.labels(tmp_path, token, 4, 1), batch["labels"])  # granted labels: file stays
    got = ground_truth.read(tmp_path, token, 4, 1)
    assert torch.equal(got["pixel_values"], batch["pixel_values"]) and not p.exists()
    assert ground_truth.read(tmp_path, token, 4, 1) is None
    import pytest

    with pytest.raises(ValueError, match="bad ground-truth token"):
        ground_truth.path(tmp_path, "../x", 1, 0)


class MemorySnoop(Snoop):
    """Walks the server process's whole object graph (``gc``) for data: a client's partition, the whole dataset."""

    def attack(self, obs: Observation) -> Reconstruction:
        import gc
        import json
        import os

        from fl.data import ArrayDataset, FederatedData, LoadedData
        from fl.data.federated import _load_federated, _load_raw

        gc.collect()
        objects = gc.get_objects()
        found = {"federated": sum(isinstance(o, FederatedData) for o in objects),
                 "loaded": sum(isinstance(o, LoadedData) for o in objects),
                 "array_datasets": sorted(len(o) for o in objects if isinstance(o, ArrayDataset)),
                 "cached": _load_federated.cache_info().currsize + _load_raw.cache_info().currsize}
        with open(os.environ["SNOOP_OUT"], "a") as fh:
            fh.write(json.dumps(found) + "\n")
        return super().attack(obs)


def test_the_server_process_holds_no_clients_data(tmp_path):
    """Before (issue 16): the server held the whole dataset and every partition's indices (``run_federation``'s
    ``data``, and ``load_federated``'s cache filled by the preflight); now only a copy of the test split."""
    import json
    import os
    import subprocess
    import sys

    from fl.config import DataConfig
    from fl.data import load_federated

    (tmp_path / "c.toml").write_text(CFG.replace("test_ground_truth:Snoop", "test_ground_truth:MemorySnoop"))
    out = tmp_path / "snoop.jsonl"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, SNOOP_OUT=str(out), PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([str(Path(sys.executable).parent / "fedprobe"), "run", "c.toml", "--no-progress",
                           "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    n_test = len(load_federated(DataConfig(), 2, 0).test)
    assert len(seen) == 2
    for s in seen:
        assert s["federated"] == 0 and s["loaded"] == 0 and s["cached"] == 0, s
        assert s["array_datasets"] and max(s["array_datasets"]) == n_test, s  # the test split, nothing larger

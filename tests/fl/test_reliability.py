"""Issue 16's failures, reproduced and fixed: a poisoned reply, bad input before Ray, plugin names that are not plugins.

(Kills, exactly-once rounds, ground truth out of band, sweep paths and foreign Ray clusters are not covered here yet.)
"""

import json
import math
from pathlib import Path

import pytest
import torch

from fl.replies import harmonise_metrics, outliers, update_norm


# -- 1. one client cannot wreck the global model --------------------------------------------------------------
def test_one_poisoned_client_each_way_cannot_wreck_the_run(tmp_path, monkeypatch):
    from fl.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    import tomli_w

    faults = [{"name": "faulty_update", "params": {"mode": m, "clients": [c]}}
              for m, c in (("huge", 1), ("nan_weight", 2), ("extra_metric", 3))]
    cfg.write_text(tomli_w.dumps({
        "experiment": {"seed": 2}, "federation": {"num_clients": 4, "rounds": 2, "local_steps": 1, "batch_size": 8},
        "data": {"dataset": "digits"}, "model": {"family": "vit", "size": "tiny"}, "defenses": faults}))
    out = tmp_path / "s.json"
    code = main(["run", str(cfg), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--summary-json", str(out),
                 "--no-progress", "--set", f"tracking.output_dir='{tmp_path / 'out'}'"])
    assert code == 0
    s = json.loads(out.read_text())
    events = "\n".join(s["events"])
    assert "rejected client 1: update norm" in events and "max_update_ratio" in events  # 1e30 is finite but fatal
    assert "rejected client 2: aggregation weight num-examples = nan" in events
    assert "client 3 sent metric keys the others did not (surprise_metric): dropped" in events
    assert s["final"]["clients_rejected"] == 2 and s["final"]["clients_replied"] == 2
    assert math.isfinite(s["final"]["test_loss"]) and s["rounds_completed"] == 2


def test_update_norm_and_outliers():
    sent = {"w": torch.zeros(10)}
    assert update_norm({"w": torch.full((10,), 1e30)}, sent) == pytest.approx(1e30 * math.sqrt(10))  # no overflow
    assert outliers([1.0, 1.2, 0.9, 5e30], 1000) == [3]
    assert outliers([1.0, 5e30], 1000) == [1]  # two replies: each is compared with the other
    assert outliers([1.0, 2.0, 900.0], 1000) == []  # heterogeneous but plausible clients stay
    assert outliers([1.0, 5e30], 0) == []  # 0 switches the check off
    assert outliers([3.0], 1000) == []


def test_harmonise_metrics_drops_only_the_extra_keys(monkeypatch):
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, attr):
            monkeypatch.setattr(TaskIdentity, attr, 1)
    instr = Message(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)})}), message_type=MessageType.TRAIN,
                    dst_node_id=1)
    a = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1.0, "loss": 0.5})}), reply_to=instr)
    b = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1.0, "loss": 0.4, "x": 1.0})}), reply_to=instr)
    events = harmonise_metrics(3, [(a, 0), (b, 7)])
    assert events == ["round 3: client 7 sent metric keys the others did not (x): dropped before aggregation"]
    assert sorted(b.content["metrics"].keys()) == ["loss", "num-examples"]


# -- 3. bad input stops before Ray --------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=1e309", "optimizer.lr': Input should be a finite number"),
    ("federation.round_timeout=inf", "round_timeout': Input should be a finite number"),
    ("federation.client_cpus=nan", "client_cpus': Input should be a finite number"),
    ("federation.min_replies=5", "min_replies (5) exceeds the clients sampled per round (4)"),
    ("federation.client_cpus=4096", "exceeds this machine's"),
    ('data.dataset="os:system"', "standard library"),
    ('attack.name="fl.registry:Registry"', "not a subclass of attacks.base.Attack"),
    ("federation.rounds=1\nfederation.num_clients=2", "one assignment per --set"),
    ('defenses=[{name="dp_sgd", params={noise_multiplier=-1.0}}]', "noise_multiplier must be a finite number >= 0"),
    ('defenses=[{name="dp_sgd", params={noise_multiplier=1.0, secure_mode=true}}]', "needs torchcsprng"),
    ('defenses=[{name="clip", params={max_norm=1.0, typo=1}}]', "defenses:"),
])
def test_bad_values_are_one_line_errors_before_ray(tmp_path, monkeypatch, capsys, override, message):
    from fl.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nnum_clients = 4\n[data]\ndataset = \"digits\"\n")
    code = main(["run", str(cfg), "--set", override, "--no-progress", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# -- 6. names never leave the output folder ---------------------------------------------------------------------
def test_sweep_and_report_names_are_single_safe_path_components(tmp_path):
    from pathlib import Path

    from fl.paths import safe_filename

    for name in ("../../..", "../../etc/passwd", "/abs/path", "a/b\\c", "..", ""):
        safe = safe_filename(name)
        assert "/" not in safe and "\\" not in safe and not safe.startswith(".") and safe
        assert (tmp_path / "sweeps" / safe).resolve().parent == (tmp_path / "sweeps").resolve()
    assert safe_filename("privacy_utility-1a2b") == "privacy_utility-1a2b"  # ordinary names are kept
    assert Path(safe_filename("σ=0.5 run")).name == "0.5_run"


# -- 2. kills lose nothing and log nothing twice ------------------------------------------------------------------
def _small(tmp_path):
    from fl.config import config_from_dict

    return config_from_dict({
        "experiment": {"seed": 4}, "federation": {"num_clients": 2, "rounds": 2, "local_steps": 1, "batch_size": 8},
        "data": {"dataset": "digits"}, "model": {"family": "vit", "size": "tiny"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}", "output_dir": str(tmp_path / "out"), "log_model": False},
    })


def _steps(cfg, run_id, key="accuracy"):
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=cfg.tracking.uri).get_metric_history(run_id, key))


def test_kill_between_checkpoint_and_logging_is_logged_exactly_once(tmp_path, monkeypatch):
    from fl.server_app import RunOptions
    from fl.simulation import SimulationError, simulate
    from fl.tracking import Tracker

    cfg = _small(tmp_path)
    real = Tracker.log_metrics
    state = {"killed": False}

    def dies_once_at_round_1(self, metrics, step):
        if step == 1 and not state["killed"] and "round_seconds" in metrics:
            state["killed"] = True
            raise KeyboardInterrupt("killed after round 1's checkpoint, before its metrics were logged")
        return real(self, metrics, step)

    monkeypatch.setattr(Tracker, "log_metrics", dies_once_at_round_1)
    started: list[str] = []
    with pytest.raises((SimulationError, KeyboardInterrupt)):
        simulate(cfg, RunOptions(progress=False, on_start=started.append))
    assert _steps(cfg, started[0]) == [0]
    summary = simulate(cfg, RunOptions(progress=False, resume_run_id=started[0]))
    assert summary["rounds_completed"] == 2
    assert _steps(cfg, started[0]) == [0, 1, 2]  # round 1 repaired from the checkpoint, nothing twice


def test_round_zero_checkpoint_and_resume_refusals(tmp_path, monkeypatch, capsys):
    from fl.cli import main
    from fl.server_app import RunOptions
    from fl.server_hook import ServerHook
    from fl.simulation import SimulationError, simulate

    cfg = _small(tmp_path)
    real = ServerHook.inspect

    def killed_in_round_1(self, server_round, *a, **k):
        if server_round == 1:
            raise KeyboardInterrupt("killed in round 1")
        return real(self, server_round, *a, **k)

    monkeypatch.setattr(ServerHook, "inspect", killed_in_round_1)
    started: list[str] = []
    with pytest.raises((SimulationError, KeyboardInterrupt)):
        simulate(cfg, RunOptions(progress=False, on_start=started.append))
    monkeypatch.setattr(ServerHook, "inspect", real)
    rid = started[0]
    toml = tmp_path / "c.toml"
    import tomli_w

    toml.write_text(tomli_w.dumps(cfg.to_dict()))
    base = ["run", str(toml), "--no-progress", "--resume", rid]
    assert main(base + ["--set", "optimizer.lr=0.5"]) == 2  # a changed config is refused, before Ray
    assert "config differs from the run's (optimizer.lr)" in capsys.readouterr().err
    assert main(base) == 0  # killed in round 1, before any round's checkpoint: resumable from round 0
    assert _steps(cfg, rid) == [0, 1, 2]
    assert main(base) == 2  # a finished run has nothing to resume
    assert "nothing to resume" in capsys.readouterr().err
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=cfg.tracking.uri).get_run(rid).info.status == "FINISHED"  # untouched


@pytest.mark.parametrize("body, message", [
    ('[attack]\nname = "idlg"\nvictims = [42]\n', "attack.victims [42] are not partitions"),
    ('[attack]\nname = "idlg"\nrounds = [9]\n', "attack.rounds [9] are outside 1..3"),
    ('[model]\nparams = { hidden_size = "x" }\n', "model (vit, params {'hidden_size': 'x'})"),
    ("[tracking]\noutput_dir = '/proc/fedprobe-cannot-write'\n", "is not writable"),
    ("a = " + "[" * 1000 + "]" * 1000 + "\n", "nests arrays or tables too deeply"),
])
def test_more_bad_configs_fail_in_one_line(tmp_path, monkeypatch, capsys, body, message):
    from fl.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nnum_clients = 4\n" + body if not body.startswith("a = ") else body)
    assert main(["run", str(cfg), "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("line, message", [
    ('parallel = "abc"', "sweep.parallel must be an integer"),
    ("grid = 5", "sweep.grid must be a table"),
    ("set = 5", "sweep.set must be a table"),
    ("name = 5", "sweep.name must be a string"),
])
def test_malformed_sweep_files_fail_in_one_line(tmp_path, capsys, line, message):
    from fl.cli import main

    (tmp_path / "base.toml").write_text("[federation]\nnum_clients = 4\n")
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'[sweep]\nbase = "base.toml"\n{line}\n')
    assert main(["sweep", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# -- 7. Ray start-up failures are one line, in seconds ---------------------------------------------------------------
def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{closed}", "nothing listens there (Connection refused)"),  # before: SystemExit after 323 s
    ("127.0.0.1", "is not host:port"),
    ("ray://127.0.0.1:99999", "is not host:port"),
])
def test_a_ray_address_nobody_answers_is_refused_before_the_run(tmp_path, monkeypatch, capsys, address, message):
    from fl.cli import main

    monkeypatch.chdir(tmp_path)
    address = address.format(closed=_free_port())
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nnum_clients = 4\n[data]\ndataset = \"digits\"\n")
    code = main(["check", str(cfg), "--set", f"federation.ray_address='{address}'"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and repr(address) in err
    assert len(err.strip().splitlines()) == 1


def test_a_listener_that_is_not_ray_fails_the_probe_in_bounded_time():
    """Something else on the port (here a socket that accepts and says nothing): Ray's own init would retry for
    minutes and then end the process; the probe's subprocess gives up after its short GCS timeouts."""
    import socket
    import threading

    from fl.config import ConfigError
    from fl.ray_probe import probe_cluster

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(ConfigError, match="no Ray cluster there") as info:
            probe_cluster(address, timeout_s=120)
        assert address in str(info.value) and "\n" not in str(info.value)
    finally:
        server.close()


def test_a_local_ray_that_cannot_start_is_one_line_and_nothing_runs(tmp_path):
    """Before: three chained tracebacks, and the process lived on for minutes (the ServerApp thread waited)."""
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nnum_clients = 2\nrounds = 1\nlocal_steps = 1\n")
    env = dict(__import__("os").environ, RAY_TMPDIR=str(tmp_path / "missing" / "tmp"))
    (tmp_path / "missing").write_text("a file, so no folder can be made under it")
    proc = subprocess.run([str(Path(sys.executable).parent / "fedprobe"), "run", str(cfg), "--no-progress",
                           "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Ray did not start locally" in errors[0] and "nothing was started" in errors[0]
    assert "Traceback" not in proc.stderr

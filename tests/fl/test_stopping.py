"""Ctrl-C on a running ``fedprobe run``: out within seconds, no Ray process left, the MLflow run KILLED."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from mlflow import MlflowClient

LONG = """
[experiment]
name = "sigint"
[federation]
num_clients = 2
rounds = 500
local_steps = 2
batch_size = 8
[data]
dataset = "digits"
[model]
family = "vit"
size = "tiny"
[tracking]
output_dir = "out"
"""


def _ray_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in proc.children(recursive=True) if "ray" in " ".join(p.cmdline()).lower()]
    except psutil.Error:
        return []


def _live(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return out


def test_sigint_stops_run_kills_ray_and_marks_killed(tmp_path):
    (tmp_path / "long.toml").write_text(LONG)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fl.cli", "run", "long.toml", "--tracking-uri", uri, "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    deadline = time.monotonic() + 240
    seen: list[psutil.Process] = []
    while time.monotonic() < deadline and proc.poll() is None:  # wait until clients train in Ray actors
        seen = _ray_children(ps)
        if any("ClientAppActor" in " ".join(p.cmdline()) for p in seen if p.is_running()):
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(3)
    seen = _ray_children(ps) or seen
    assert seen, "no Ray processes were found under the run"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert took < 15, f"exit took {took:.1f} s\n{out}"
    assert proc.returncode == 130, out
    time.sleep(1)
    assert _live(seen) == [], f"Ray processes left: {_live(seen)}"
    runs = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("fedprobe").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"], out
    run_id = runs[0].info.run_id
    assert f"--resume {run_id}" in out and "Traceback" not in out, out


@pytest.mark.parametrize("sig, inherited, code", [
    (signal.SIGINT, signal.SIG_IGN, 130),  # as `kill -INT` to a background job of a shell without job control
    (signal.SIGTERM, signal.SIG_DFL, 143),  # as a scheduler stops a job
])
def test_a_signal_to_a_sweep_stops_its_point_and_marks_parent_and_child_killed(tmp_path, sig, inherited, code):
    (tmp_path / "long.toml").write_text(LONG)
    (tmp_path / "sweep.toml").write_text('[sweep]\nname = "s"\nbase = "long.toml"\n[sweep.grid]\n'
                                         '"optimizer.lr" = [0.01, 0.02]\n')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # SIGINT started ignored: a shell's background job (`cmd &` without job control) inherits it so, and a Python
    # started that way never raises KeyboardInterrupt unless the sweep installs its own handler (it does)
    proc = subprocess.Popen([sys.executable, "-m", "fl.cli", "sweep", "sweep.toml", "--tracking-uri", uri,
                             "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    ps = psutil.Process(proc.pid)
    deadline = time.monotonic() + 240
    seen: list[psutil.Process] = []
    while time.monotonic() < deadline and proc.poll() is None:
        seen = _ray_children(ps)
        if any("ClientAppActor" in " ".join(p.cmdline()) for p in seen if p.is_running()):
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()
    seen = _ray_children(ps) or seen
    sent = time.monotonic()
    proc.send_signal(sig)  # to the sweep alone, as `kill` would: it passes SIGINT on to its point
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 20, out
    assert proc.returncode == code and "Traceback" not in out and "finished points are skipped" in out, out
    time.sleep(1)
    assert _live(seen) == [], f"Ray processes left: {_live(seen)}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedprobe").experiment_id])
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"], out  # the parent and the running point


def test_the_handler_marks_and_prints_before_it_kills_and_exits_right_after(monkeypatch, capsys):
    """Once Ray's raylet is SIGKILLed, Ray's C++ may end the process with status 1 at its next poll: the MLflow mark
    and the resume line must come before the kill, and nothing (no wait) between the kill and ``os._exit``."""
    import mlflow

    from fl import stopping

    calls: list[tuple] = []

    class Exited(BaseException):
        pass

    class FakeClient:
        def __init__(self, tracking_uri: str) -> None:
            calls.append(("client", tracking_uri))

        def set_terminated(self, run_id: str, status: str) -> None:
            calls.append(("mark", run_id, status))

    def fake_exit(code: int) -> None:
        calls.append(("exit", code))
        raise Exited

    monkeypatch.setattr(stopping, "descendants", lambda: calls.append(("list",)) or ["raylet", "gcs"])
    monkeypatch.setattr(stopping, "kill_tree", lambda procs, wait_s=3.0: calls.append(("kill", tuple(procs), wait_s)))
    monkeypatch.setattr(mlflow, "MlflowClient", FakeClient)
    monkeypatch.setattr(stopping.os, "_exit", fake_exit)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(stopping, "requested", threading.Event())
    stop = stopping.StopOnSignal("sqlite:///x.db", lambda run_id: f"fedprobe run c.toml --resume {run_id}")
    stop.on_start("r1")
    try:
        with pytest.raises(Exited):
            stop._handle(signal.SIGINT, None)
    finally:
        logging.disable(logging.NOTSET)
    assert [c[0] for c in calls] == ["list", "client", "mark", "kill", "exit"], calls
    assert calls[2] == ("mark", "r1", "KILLED") and calls[3] == ("kill", ("raylet", "gcs"), 0.0)
    assert calls[4] == ("exit", 130) and stopping.requested.is_set()
    assert "--resume r1" in capsys.readouterr().err

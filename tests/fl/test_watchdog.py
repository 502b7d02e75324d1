"""fl.watchdog: what a SIGKILLed driver started does not outlive it (issue 16, point 2)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_a_sigkilled_drivers_grandchildren_are_ended(tmp_path):
    """A driver starts the watchdog and a child that starts a grandchild (as the raylet starts its agents), prints
    the grandchild's pid and is SIGKILLed: the grandchild, reparented to init, is ended all the same."""
    driver = (
        "import subprocess, sys, time\n"
        "from fl.watchdog import watch_descendants\n"
        "watch_descendants()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
        "p = subprocess.Popen([\"sleep\", \"300\"]); print(p.pid, flush=True); time.sleep(300)'], stdout=sys.stdout)\n"
        "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    grandchild = int(proc.stdout.readline())
    time.sleep(2.5)  # the watchdog notes descendants every second
    assert _alive(grandchild)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait(lambda: not _alive(grandchild), 20), "the grandchild outlived its SIGKILLed driver"


def test_a_process_that_is_not_a_descendant_is_left_alone():
    """Only the driver's descendants (pid and start time as noted) are ended: a bystander is never signalled."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        driver = "from fl.watchdog import watch_descendants\nimport time\nwatch_descendants()\ntime.sleep(1.5)\n"
        subprocess.run([sys.executable, "-c", driver], check=True, cwd=Path(__file__).resolve().parents[2],
                       timeout=60)
        time.sleep(5)  # the watchdog's grace period has passed
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def _session(sid: int) -> list[str]:
    """Command lines of the live processes of session ``sid`` (the run's, started with ``start_new_session``)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(p.cmdline())[:80])
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.slow
def test_sigkill_of_a_run_leaves_no_ray_process(tmp_path):
    """Before: ray::DashboardAgent and ray::RuntimeEnvAgent stayed alive for good after `kill -9` of the run."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nnum_clients = 2\nrounds = 50\nlocal_steps = 1\n")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedprobe"), "run", str(cfg), "--no-progress",
                             "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait(lambda: any("ClientAppActor" in c for c in _session(proc.pid)), 300), _session(proc.pid)
        assert any("RuntimeEnvAgent" in c for c in _session(proc.pid))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _wait(lambda: not _session(proc.pid), 60), _session(proc.pid)
